"""Log lines: JSON lines that parse and carry request ids, text lines, and
per-namespace levels changed while running (in process and through the
admin call of a real node)."""

import io
import json
import os
import urllib.request

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from msgd.core.request import Request, current
from msgd.logging import BadLevel, LogSetup
from tests.process import NodeProcess, call
from tests.test_tap import poll


def emit(setup, namespace="msgd.test", level=LogLevel.info, fmt="hello {who}", **fields):
    Logger(namespace=namespace, observer=setup).emit(level, fmt, **fields)


class FormatTests(unittest.TestCase):
    def lines(self, out):
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_json_line_per_event_with_fields(self):
        out = io.StringIO()
        setup = LogSetup(out, "json")
        emit(setup, who="world", count=3, obj=object())
        (line,) = self.lines(out)
        self.assertEqual(line["message"], "hello world")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["namespace"], "msgd.test")
        self.assertEqual((line["who"], line["count"]), ("world", 3))
        self.assertTrue(line["obj"].startswith("<object object"))
        self.assertNotIn("request_id", line)

    def test_request_id_from_the_current_request(self):
        out = io.StringIO()
        setup = LogSetup(out, "json")
        req = Request(interface="web", clock=None)
        token = current.set(req)
        try:
            emit(setup, who="x")
        finally:
            current.reset(token)
        emit(setup, who="y", request_id="given-1")
        first, second = self.lines(out)
        self.assertEqual(first["request_id"], req.id)
        self.assertEqual(second["request_id"], "given-1")

    def test_failure_has_its_traceback_and_multiline_text_stays_one_event(self):
        out = io.StringIO()
        setup = LogSetup(out, "json")
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(namespace="msgd.test", observer=setup).failure("it broke\nbadly", Failure())
        (line,) = self.lines(out)
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertEqual(line["message"], "it broke\nbadly")

    def test_text_lines(self):
        out = io.StringIO()
        setup = LogSetup(out, "text")
        token = current.set(Request(interface="web", clock=None, id="abc-1"))
        try:
            emit(setup, who="world")
        finally:
            current.reset(token)
        self.assertRegex(out.getvalue(), r"^\S+ \[msgd\.test#info\] hello world \[req abc-1\]\n$")

    def test_levels_per_namespace_changed_at_runtime(self):
        out = io.StringIO()
        setup = LogSetup(out, "json", "info", (("msgd.noisy", "error"),))
        emit(setup, "msgd.noisy.part", fmt="dropped")
        emit(setup, "msgd.other", LogLevel.debug, fmt="dropped too")
        emit(setup, "msgd.other", fmt="kept")
        setup.set_level("msgd.noisy", "debug")
        emit(setup, "msgd.noisy.part", LogLevel.debug, fmt="now kept")
        self.assertEqual([x["message"] for x in self.lines(out)], ["kept", "now kept"])
        self.assertEqual(setup.levels(), {"*": "info", "msgd.noisy": "debug"})
        self.assertRaises(BadLevel, setup.set_level, "msgd", "loud")
        self.assertRaises(BadLevel, setup.set_level, "not a namespace", "info")
        setup.configure("text", "warn")
        self.assertEqual(setup.levels(), {"*": "warn"})

    def test_unwritable_plugin_cache_costs_one_line(self):
        """Twisted's legacy "Unable to write to plugin cache" message, as
        twisted.plugin.getCache logs it on every scan of a stale, unwritable
        cache: the first line per cache file is kept, repeats are dropped."""
        from twisted.logger import LogPublisher
        from twisted.python import log as legacy
        out = io.StringIO()
        setup = LogSetup(out, "text")
        bridge = LogPublisher(setup)
        old_api = legacy.LogPublisher(observerPublisher=bridge, publishPublisher=bridge)
        fmt = "Unable to write to plugin cache %(path)s: error number %(errno)d"
        for path in ("/site/twisted/plugins/dropin.cache", "/site/twisted/plugins/dropin.cache",
                     "/other/twisted/plugins/dropin.cache", "/site/twisted/plugins/dropin.cache"):
            old_api.msg(format=fmt, path=path, errno=13)
        old_api.msg("an ordinary legacy line")
        old_api.msg("an ordinary legacy line")
        lines = out.getvalue().splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in lines], [
            "Unable to write to plugin cache /site/twisted/plugins/dropin.cache: error number 13",
            "Unable to write to plugin cache /other/twisted/plugins/dropin.cache: error number 13",
            "an ordinary legacy line", "an ordinary legacy line"])

    def test_autobahn_debug_lines_exist_only_when_asked_for(self):
        """Autobahn's txaio loggers make no event at all below the levels set
        for ``*`` or ``autobahn``: its per-message debug calls cost nothing."""
        import txaio
        from twisted.logger import globalLogPublisher
        txaio.use_twisted()
        self.addCleanup(txaio.set_global_log_level, "info")
        probe = txaio.make_logger()
        seen = []

        def observer(event):
            if event.get("log_format") == "probe":
                seen.append(event["log_level"])
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        setup = LogSetup(io.StringIO(), "text", "info")
        probe.debug("probe")
        probe.info("probe")
        setup.set_level("autobahn.websocket", "debug")
        probe.debug("probe")
        setup.configure("text", "error")
        probe.info("probe")
        probe.error("probe")
        self.assertEqual(seen, [LogLevel.info, LogLevel.debug, LogLevel.error])


APP = '''
from twisted.logger import Logger
from msgd import api

log = Logger(namespace="apps.audit")

def place(item: str):
    log.info("placing {item}", item=item)
    log.debug("detail of {item}", item=item)
    return api.request().id
'''

INI = """
[node]
name = logs
log_format = json
log_levels = twisted=warn

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
admin = yes
"""


def post_json(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class NodeLogTests(unittest.TestCase):
    def setUp(self):
        self.node = NodeProcess(os.path.abspath(self.mktemp()), INI, {"shop.py": APP}).start()
        self.addCleanup(self.node.stop)

    def lines(self):
        with open(self.node.log) as f:
            return [json.loads(line) for line in f]      # every line is one JSON object

    @defer.inlineCallbacks
    def test_json_lines_carry_request_ids(self):
        port = self.node.port
        rid = (yield deferToThread(call, port, "shop.place", "book"))["result"]
        yield deferToThread(poll, lambda: any(x.get("item") == "book" for x in self.lines()), 10)
        lines = self.lines()
        (placing,) = [x for x in lines if x.get("item") == "book"]
        self.assertEqual(placing["message"], "placing book")
        self.assertEqual(placing["namespace"], "apps.audit")
        self.assertEqual(placing["request_id"], rid)
        self.assertTrue(any(x["message"].startswith("node logs started") for x in lines))
        self.assertFalse(any(x["namespace"].startswith("twisted.") and x["level"] == "info" for x in lines))

        # debug lines of apps.audit appear once the level is lowered through the admin call
        levels = yield deferToThread(post_json, port, "/admin/log-level", {"namespace": "apps.audit",
                                                                           "level": "debug"})
        self.assertEqual(levels["levels"]["apps.audit"], "debug")
        rid2 = (yield deferToThread(call, port, "shop.place", "pen"))["result"]
        yield deferToThread(poll, lambda: any(x["message"] == "detail of pen" for x in self.lines()), 10)
        (detail,) = [x for x in self.lines() if x["message"] == "detail of pen"]
        self.assertEqual((detail["level"], detail["request_id"]), ("debug", rid2))
