"""End to end, as a user runs it: twistd processes, signals, live edits."""

import os
import socket
import subprocess
import sys
import threading
import time

from twisted.trial import unittest

from tests.helpers import ROOT
from tests.process import TWISTD, NodeProcess, call
from tests.servers import free_port, port_open

INI = """
[node]
name = proc
reload_interval = 0.2s
drain_timeout = 10s

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
"""

APP = '''
from msgd import api

def version():
    return 1

async def slow(seconds: float):
    await api.sleep(seconds)
    return "finished"
'''


def poll(predicate, timeout=10.0, step=0.05):
    """Wait until ``predicate()`` is truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class PluginTests(unittest.TestCase):
    def test_twistd_lists_msgd(self):
        out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, cwd="/", timeout=60)
        self.assertIn("msgd", out.stdout)

    def test_bad_config_is_one_line_and_nothing_listens(self):
        base = os.path.abspath(self.mktemp())
        port = free_port()
        bad = INI + "endpont = tcp:1\n"
        node = NodeProcess(base, bad, port=port)
        node.start(wait=False)
        self.addCleanup(node.stop)
        code = node.wait(30)
        stderr = node.proc.stderr.read().decode().strip()
        self.assertNotEqual(code, 0)
        self.assertEqual(stderr.splitlines(),
                         [f"msgd: {node.ini}: [interface:web] endpont: unknown key (did you mean 'endpoint'?)"])
        self.assertFalse(port_open("127.0.0.1", port))

    def test_check_command(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        ini = os.path.join(base, "n.ini")
        with open(ini, "w") as f:
            f.write("[node]\napps = apps\n[interface:web]\ntype = http\nendpoint = tcp:0\n")
        # the check command validates without starting
        out = subprocess.run([sys.executable, "-m", "msgd", "check", "-c", ini], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        with open(ini, "a") as f:
            f.write("max_body = huge\n")
        out = subprocess.run([sys.executable, "-m", "msgd", "check", "-c", ini], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        self.assertEqual(out.returncode, 1)
        self.assertIn("[interface:web] max_body:", out.stderr)

    def test_exit_status_handler_runs_after_later_atexit_handlers(self):
        # the status of a node that could not start is set late, but the
        # handler that exits with it was registered at makeService: handlers
        # registered after that (apps, libraries) still run before it
        script = ("import atexit, sys\n"
                  "from msgd import tap\n"
                  "tap._register_leave()\n"
                  "atexit.register(lambda: print('later handler ran', flush=True))\n"
                  "tap._exit_status_after_twistd(3)\n")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
        self.assertEqual((out.returncode, out.stdout), (3, "later handler ran\n"), out.stderr)

    def test_command_help_and_version(self):
        import msgd

        def run(*args):
            return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
        out = run("-m", "msgd", "--help")
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertIn("usage: python -m msgd check [-c CONFIG]", out.stdout)
        out = run("-m", "msgd", "--version")
        self.assertEqual((out.returncode, out.stdout), (0, f"msgd {msgd.__version__}\n"))
        out = run("-m", "msgd")
        self.assertEqual(out.returncode, 2)
        self.assertIn("usage: python -m msgd check", out.stderr)
        # the installed console command (setup.py's entry point) names itself
        out = run("-c", "import sys; from msgd.tap import command; sys.exit(command())", "--help")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("usage: msgd check [-c CONFIG]", out.stdout)
        self.assertIn("       msgd passwd FILE USER", out.stdout)
        # and so do its subcommands' --help (exit 0, on stdout)
        out = run("-c", "import sys; from msgd.tap import command; sys.exit(command())", "check", "--help")
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertTrue(out.stdout.startswith("usage: msgd check [-c CONFIG]\n"), out.stdout)
        self.assertIn("Display msgd's version", out.stdout)
        out = run("-c", "import sys; from msgd.tap import command; sys.exit(command())", "check", "--version")
        self.assertEqual((out.returncode, out.stdout), (0, f"msgd {msgd.__version__}\n"))
        out = run("-c", "import sys; from msgd.tap import command; sys.exit(command())", "passwd", "--help")
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertTrue(out.stdout.startswith("usage: msgd passwd FILE USER"), out.stdout)
        out = run("-c", "import sys; from msgd.tap import command; sys.exit(command())", "check", "--bogus")
        self.assertEqual(out.returncode, 2)
        self.assertIn("usage: msgd check [-c CONFIG]", out.stderr)

    def test_port_in_use_stops_startup(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            node = NodeProcess(os.path.abspath(self.mktemp()), INI, {"m.py": APP}, port=port)
            node.start(wait=False)
            self.addCleanup(node.stop)
            self.assertEqual(node.wait(30), 1)
        # one line naming the section and the endpoint, no traceback (docs/operations.rst)
        self.assertEqual(node.proc.stderr.read().decode(), "")
        log = node.output()
        self.assertNotIn("Traceback", log)
        lines = [line for line in log.splitlines() if "#info]" not in line]
        self.assertEqual(len(lines), 1, log)
        self.assertIn("#critical]", lines[0])
        self.assertTrue(lines[0].endswith(f"[interface:web] cannot listen on tcp:{port}:interface=127.0.0.1: "
                                          "Address already in use"), lines[0])

    def test_part_that_fails_after_start_exits_1(self):
        # a part that fails once the reactor runs (here a directory that cannot
        # be made: its parent is a file) stops the node with exit status 1, so
        # that systemd's Restart=on-failure and a supervisor see the failure
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        blocker = os.path.join(base, "not-a-dir")
        open(blocker, "w").close()
        ini = INI + f"""
[interface:drop]
type = dirwatch
directory = {blocker}/inbox
handler = m.version
"""
        node = NodeProcess(base, ini, {"m.py": APP})
        node.start(wait=False)
        self.addCleanup(node.stop)
        self.assertEqual(node.wait(30), 1)
        log = node.output()
        self.assertIn("could not start", log)
        self.assertIn("[interface:drop] cannot watch", log)


class RunningNodeTests(unittest.TestCase):
    def setUp(self):
        self.node = NodeProcess(os.path.abspath(self.mktemp()), INI, {"m.py": APP}).start()
        self.addCleanup(self.node.stop)

    def test_live_reload_syntax_error_and_new_module(self):
        port = self.node.port
        self.assertEqual(call(port, "m.version")["result"], 1)
        self.node.write_app("m.py", APP.replace("return 1", "return 2"))
        self.assertTrue(poll(lambda: call(port, "m.version").get("result") == 2, timeout=5))

        self.node.write_app("m.py", APP.replace("def version():", "def version(:"))
        self.assertTrue(poll(lambda: "failed to load" in self.node.output(), timeout=5))
        self.assertEqual(call(port, "m.version")["result"], 2)     # old version still answers
        self.assertIn(os.path.join(self.node.base, "apps", "m.py") + ":4", self.node.output())

        self.assertEqual(call(port, "extra.hello")["error"]["code"], -32601)
        self.node.write_app("extra.py", "def hello():\n    return 'hi'\n")
        self.assertTrue(poll(lambda: call(port, "extra.hello").get("result") == "hi", timeout=5))

    def test_sigterm_drains_in_flight_requests(self):
        port = self.node.port
        results = []
        t = threading.Thread(target=lambda: results.append(call(port, "m.slow", 1.0, timeout=20)))
        t.start()
        import urllib.request
        def in_flight():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return b'msgd_requests_in_flight{interface="web"} 1.0' in r.read()
        self.assertTrue(poll(in_flight, timeout=5))
        self.node.signal()
        t.join(20)
        self.assertEqual(results, [{"jsonrpc": "2.0", "result": "finished", "id": 1}])
        self.assertEqual(self.node.wait(20), 0)
        self.assertFalse(port_open("127.0.0.1", port))


class DaemonTests(unittest.TestCase):
    def test_daemonizes_with_pidfile_and_logfile(self):
        import signal as _signal
        from tests.helpers import ROOT as _root
        base = os.path.abspath(self.mktemp())
        node = NodeProcess(base, INI, {"m.py": APP})
        pidfile, logfile = os.path.join(base, "msgd.pid"), os.path.join(base, "msgd.log")
        env = dict(os.environ, PYTHONPATH=_root)
        out = subprocess.run([TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "msgd", "-c", node.ini],
                             cwd=base, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)          # the parent returns once the daemon runs
        self.assertTrue(poll(lambda: port_open("127.0.0.1", node.port), timeout=15))
        pid = int(open(pidfile).read())
        self.addCleanup(lambda: os.kill(pid, _signal.SIGKILL) if os.path.exists(f"/proc/{pid}") else None)
        self.assertEqual(call(node.port, "m.version")["result"], 1)
        os.kill(pid, _signal.SIGTERM)
        self.assertTrue(poll(lambda: not os.path.exists(pidfile), timeout=15))
        with open(logfile) as f:
            self.assertIn("node proc started", f.read())

    def test_port_in_use_as_a_daemon(self):
        """The parent that waits for the daemon hears why it failed (a plain
        SystemExit in the daemon would leave it waiting for ever), and the pid
        file goes away."""
        base = os.path.abspath(self.mktemp())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            node = NodeProcess(base, INI, {"m.py": APP}, port=s.getsockname()[1])
            pidfile, logfile = os.path.join(base, "msgd.pid"), os.path.join(base, "msgd.log")
            out = subprocess.run([TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "msgd", "-c", node.ini],
                                 cwd=base, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                                 timeout=60)
        self.assertEqual(out.returncode, 1)
        self.assertIn("[interface:web] cannot listen on", out.stderr)
        self.assertFalse(os.path.exists(pidfile))
        with open(logfile) as f:
            self.assertNotIn("Traceback", f.read())
