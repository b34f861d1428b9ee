"""The directory watcher, with real files on a node on the real reactor, and
a crash test that SIGKILLs real node processes."""

import json
import os
import random
import signal
import time

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from msgd.config import ConfigError, parse_text
from tests.helpers import eventually, make_node
from tests.process import NodeProcess

APP = '''
from msgd import api
seen = []

async def take(item: dict):
    data = item["content"] if item["content"] is not None else item["file"].read()
    seen.append((item["name"], data, item["file"] is not None))
    if item["name"].startswith("bad"):
        raise api.AppError("cannot take " + item["name"])
    if item["name"].startswith("slow"):
        await api.sleep(0.3)
    return len(data)
'''


def ini(**keys):
    lines = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return f"""
[interface:drop]
type = dirwatch
directory = in
handler = t.take
poll_interval = 0.1
{lines}
"""


def pause(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class DirWatchTests(unittest.TestCase):
    def node(self, start=True, **keys):
        self.n = make_node(self, ini(**keys), {"t.py": APP}, start=False)
        self.iface = self.n.interfaces["drop"]
        self.dir = self.iface.options.directory
        os.makedirs(self.dir, exist_ok=True)
        if start:
            self.start()
        return self.n

    def start(self):
        self.n.privilegedStartService()
        self.n.startService()
        self.addCleanup(lambda: self.n.stopService() if self.n.running else None)
        self.seen = self.n.apps.modules["t"].module.seen

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def listing(self, sub=""):
        return sorted(n for n in os.listdir(self.path(sub)) if os.path.isfile(self.path(sub, n)))

    def put(self, name, data=b"x", old=False):
        with open(self.path(name), "wb") as f:
            f.write(data)
        if old:
            os.utime(self.path(name), (time.time() - 3600, time.time() - 3600))

    def metric(self, what):
        return self.n.metrics.value(f"msgd_ingest_{what}", {"interface": "drop"}) or 0

    @defer.inlineCallbacks
    def test_files_present_at_startup(self):
        self.node(start=False)
        for i in range(5):
            self.put(f"a{i}.json", b"%d" % i, old=True)
        self.start()
        yield eventually(lambda: len(self.listing("done")) == 5)
        self.assertEqual(sorted(self.seen), [(f"a{i}.json", b"%d" % i, False) for i in range(5)])
        self.assertEqual(self.listing(), [])
        self.assertEqual(self.listing("processing"), [])
        self.assertEqual((self.metric("taken_total"), self.metric("succeeded_total")), (5, 5))
        self.assertEqual(self.n.metrics.value("msgd_ingest_lag_seconds_count", {"interface": "drop"}), 5)
        self.assertEqual(self.iface.mode, "inotify")

    @defer.inlineCallbacks
    def slow_writes(self):
        """Files written in chunks, with pauses longer than a poll, are
        taken only whole."""
        names = [f"w{i}.dat" for i in range(3)]
        files = [open(self.path(n), "wb") for n in names]
        try:
            for chunk in range(6):
                for f in files:
                    f.write(b"%d" % chunk * 1000)
                    f.flush()
                yield pause(0.15)
                self.assertEqual(self.seen, [])
        finally:
            for f in files:
                f.close()
        yield eventually(lambda: len(self.listing("done")) == 3)
        whole = b"".join(b"%d" % c * 1000 for c in range(6))
        self.assertEqual(sorted(self.seen), [(n, whole, False) for n in names])

    def test_slow_writes_inotify(self):
        self.node(settle="30s")
        return self.slow_writes()

    def test_slow_writes_polling(self):
        self.node(watch="poll", settle="2s")
        self.assertEqual(self.iface.mode, "poll")
        return self.slow_writes()

    @defer.inlineCallbacks
    def test_moved_in_and_ignored_names(self):
        self.node(settle="0s")
        for name in (".hidden", "a.tmp", "b.part", "c~", ".d.json.tmp"):
            self.put(name)
        with open(self.path(".d.json.tmp"), "wb") as f:
            f.write(b"moved")
        os.rename(self.path(".d.json.tmp"), self.path("d.json"))
        yield eventually(lambda: self.listing("done") == ["d.json"])
        self.assertEqual(self.seen, [("d.json", b"moved", False)])
        yield pause(0.3)   # several polls: the ignored names stay where they are
        self.assertEqual(sorted(os.listdir(self.dir)),
                         sorted([".hidden", "a.tmp", "b.part", "c~", "processing", "done", "failed"]))

    @defer.inlineCallbacks
    def test_failures_go_to_failed_with_reason(self):
        self.node()
        self.put("bad-1.json", b"{")
        self.put("good.json", b"{}")
        yield eventually(lambda: self.listing("failed") == ["bad-1.json", "bad-1.json.error"]
                    and self.listing("done") == ["good.json"])
        with open(self.path("failed", "bad-1.json.error")) as f:
            self.assertEqual(f.read(), "application_error (-32000): cannot take bad-1.json\n")
        with open(self.path("failed", "bad-1.json"), "rb") as f:
            self.assertEqual(f.read(), b"{")
        self.put("bad-1.json", b"again")   # the same name again: nothing is overwritten
        yield eventually(lambda: len(self.listing("failed")) == 4)
        self.assertIn("bad-1.json.1.error", self.listing("failed"))
        self.assertEqual((self.metric("failed_total"), self.metric("succeeded_total")), (2, 1))

    @defer.inlineCallbacks
    def test_recovers_processing_at_start(self):
        self.node(start=False)
        os.makedirs(self.path("processing"))
        self.put(os.path.join("processing", "left.json"), b"half-done")
        self.put("left.json", b"newer one, same name", old=True)
        self.start()
        yield eventually(lambda: len(self.listing("done")) == 2)
        self.assertEqual(self.seen[0], ("left.json", b"half-done", False))
        self.assertEqual(self.seen[1], ("left.json", b"newer one, same name", False))
        self.assertEqual(self.listing("done"), ["left.json", "left.json.1"])

    @defer.inlineCallbacks
    def test_done_marker_delete_and_large_files(self):
        self.node(done_marker=".ready", on_success="delete", max_inline="10", settle="0s")
        self.put("big.bin", b"0123456789ABCDEF")
        yield pause(0.3)
        self.assertEqual(self.seen, [])        # no marker yet
        self.put("big.bin.ready", b"")
        yield eventually(lambda: len(self.seen) == 1 and not os.listdir(self.path("processing")))
        self.assertEqual(self.seen, [("big.bin", b"0123456789ABCDEF", True)])
        self.assertEqual(self.listing(), [])
        self.assertEqual(self.listing("done"), [])

    @defer.inlineCallbacks
    def test_order_and_concurrency(self):
        self.node(start=False, concurrency="1", order="mtime")
        for i, name in enumerate(["c", "a", "b"]):
            self.put(name, old=True)
            os.utime(self.path(name), (1000 + i, 1000 + i))
        self.start()
        yield eventually(lambda: len(self.seen) == 3)
        self.assertEqual([s[0] for s in self.seen], ["c", "a", "b"])

    @defer.inlineCallbacks
    def test_concurrency_limit(self):
        self.node(start=False, concurrency="2")
        for i in range(5):
            self.put(f"slow-{i}", old=True)
        self.start()
        most = []
        yield eventually(lambda: most.append(self.metric("in_flight")) or len(self.listing("done")) == 5)
        self.assertEqual(max(most), 2)
        self.assertEqual(sorted(s[0] for s in self.seen), [f"slow-{i}" for i in range(5)])

    @defer.inlineCallbacks
    def test_stop_takes_no_new_files(self):
        self.node(start=False, concurrency="1")
        self.put("slow-1", old=True)
        self.put("slow-2", old=True)
        self.start()
        yield eventually(lambda: self.listing("processing") == ["slow-1"])
        yield self.n.stopService()
        self.assertEqual(self.listing("done"), ["slow-1"])
        self.assertEqual(self.listing(), ["slow-2"])

    def test_unusable_directory_fails_ready(self):
        self.node(start=False)
        with open(self.path("processing"), "w") as f:   # a file where a directory must be
            f.write("")
        self.start()
        f = self.failureResultOf(self.iface.ready)
        self.assertIn("[interface:drop] cannot watch", str(f.value))

    def test_config_errors(self):
        bad = "[interface:d]\ntype = dirwatch\ndirectory = x\nhandler = t.take\ndone_marker = a/b\n"
        e = self.assertRaises(ConfigError, parse_text, bad, "n.ini")
        self.assertIn("[interface:d] done_marker", str(e))
        e = self.assertRaises(ConfigError, parse_text, bad.replace("done_marker = a/b", "order = size"), "n.ini")
        self.assertIn("order", str(e))


CRASH_APP = '''
import os
import random
from msgd import api

async def take(item: dict):
    await api.sleep(random.uniform(0, 0.01))
    with open(os.path.join(os.path.dirname(__file__), "..", "handled.log"), "a") as f:
        f.write(item["name"] + "\\n")
    return None
'''

CRASH_INI = """
[node]
name = crash
drain_timeout = 1s

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1

[interface:drop]
type = dirwatch
directory = in
handler = t.take
concurrency = 8
poll_interval = 0.2
"""


class CrashTests(unittest.TestCase):
    """SIGKILL a node processing a stream of files at random moments: every
    file ends in done/ exactly once, each was handed to the handler at
    least once, and nothing is left in processing/."""

    timeout = 120

    @defer.inlineCallbacks
    def test_sigkill_loses_nothing(self):
        rng = random.Random(os.environ.get("MSGD_CRASH_SEED", time.time_ns()))
        node = NodeProcess(self.mktemp(), CRASH_INI, {"t.py": CRASH_APP})
        self.addCleanup(node.stop)
        incoming = os.path.join(node.base, "in")
        os.makedirs(incoming)
        names = []

        def feed(n):
            for _ in range(n):
                name = f"f{len(names):05d}.json"
                tmp = os.path.join(incoming, "." + name)
                with open(tmp, "w") as f:
                    json.dump({"n": len(names)}, f)
                os.rename(tmp, os.path.join(incoming, name))
                names.append(name)

        def left():
            return len([n for n in os.listdir(incoming) if n.endswith(".json")]) + \
                len(os.listdir(os.path.join(incoming, "processing")))

        feed(150)
        interrupted = 0
        for _ in range(4):
            node.start()
            for _ in range(rng.randint(1, 5)):
                feed(30)
                yield pause(rng.uniform(0.01, 0.15))
            node.signal(signal.SIGKILL)
            node.wait()
            node.stop()
            interrupted += left() > 0
        self.assertGreater(interrupted, 0, "no kill happened while files were waiting")
        feed(50)
        node.start()
        done = os.path.join(incoming, "done")
        yield eventually(lambda: len(os.listdir(done)) >= len(names), timeout=60, step=0.1)
        yield pause(0.3)
        self.assertEqual(sorted(os.listdir(done)), sorted(names))   # exactly once each, no .1 copies
        self.assertEqual(os.listdir(os.path.join(incoming, "processing")), [])
        self.assertEqual(os.listdir(os.path.join(incoming, "failed")), [])
        self.assertEqual(sorted(n for n in os.listdir(incoming) if not os.path.isdir(os.path.join(incoming, n))), [])
        with open(os.path.join(node.base, "handled.log")) as f:
            handled = f.read().split()
        self.assertEqual(set(handled), set(names))       # at least once each
        Logger().info("crash test: {files} files, {kills} kills mid-stream, {again} handed again",
                      files=len(names), kills=interrupted, again=len(handled) - len(names))
        for name in names:
            with open(os.path.join(done, name)) as f:
                self.assertEqual(json.load(f), {"n": int(name[1:6])})
