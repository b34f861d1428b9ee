"""The HTTP Site without a node or a socket: its options assembled from the
mounts', what its mounts share, ``/health``, ``/metrics`` and ``/targets`` on
an :class:`~msgd.testing.AppHarness`, and ``/admin`` on a fake
:class:`msgd.services.Control` — over in-memory HTTP (the interface's own
Site over a ``StringTransport``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msgd.config import describe
from msgd.interfaces import admin, appstatic, http, poll, soap, sse, websocket, xmlrpc
from msgd.interfaces.base import StartupError
from msgd.logging import BadLevel
from msgd.security import SecurityOptions
from msgd.services import Control
from msgd.testing import AppHarness
from tests.helpers import ROOT, write

PARTS = (http.SiteOptions, websocket.WebSocketOptions, xmlrpc.XMLRPCOptions, soap.SOAPOptions,
         appstatic.AppStaticOptions, sse.SSEOptions, poll.PollOptions, admin.AdminOptions)

# the keys and defaults of type = http before the mounts declared their own
DEFAULTS = {
    "jsonrpc": True, "health": True, "metrics": True, "max_body": 1048576, "max_batch": 100,
    "request_timeout": None, "idle_timeout": 120.0, "xmlrpc": True, "xmlrpc_allow_none": False, "xmlrpc_i8": False,
    "soap": True, "soap_address": "", "xml_max_depth": 64, "websocket": True, "ws_max_message": 1048576,
    "ws_max_pending": 1048576, "ws_max_subscriptions": 1000, "ws_ping_interval": 30.0, "ws_ping_timeout": 10.0,
    "close_timeout": 10.0, "ws_origins": ("*",), "apps_static": True, "apps_static_max_age": 0.0, "sse": True,
    "poll": True, "poll_wait": 25.0, "poll_idle": 60.0, "poll_max_queue": 1048576, "poll_max_sessions": 10000,
    "sse_ping": 15.0, "status": False, "status_interval": 1.0, "admin": False, "admin_allow": ("127.0.0.1", "::1"),
    "admin_token": "", "forwarded_header": "x-forwarded-for",
}


def _reference():
    """docs/_ext/msgd_options.py, which renders the key reference."""
    spec = importlib.util.spec_from_file_location("msgd_options", os.path.join(ROOT, "docs", "_ext",
                                                                               "msgd_options.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OptionsTests(unittest.TestCase):
    def test_every_key_declared_once(self):
        owners: dict[str, list] = {}
        for part in PARTS + (SecurityOptions,):
            for f in dataclasses.fields(part):
                if part is SecurityOptions or f.name in vars(part)["__annotations__"]:
                    owners.setdefault(f.name, []).append(part.__name__)
        self.assertEqual({k: v for k, v in owners.items() if len(v) > 1}, {})
        self.assertEqual(sorted(f.name for f in dataclasses.fields(http.Options)), sorted(owners))

    def test_defaults_unchanged(self):
        options = http.Options(endpoint="tcp:0")
        self.assertEqual({k: getattr(options, k) for k in DEFAULTS}, DEFAULTS)
        self.assertEqual(set(DEFAULTS) | {"endpoint"} | {f.name for f in dataclasses.fields(SecurityOptions)},
                         {f.name for f in dataclasses.fields(http.Options)})

    def test_every_mount_is_switched_by_a_key_of_its_own_module(self):
        for mount in http.MOUNTS:
            owner = [p for p in PARTS if mount.key in vars(p)["__annotations__"]]
            self.assertEqual(len(owner), 1, mount.key)
            self.assertIs(dataclasses.fields(owner[0])[0].metadata["parse"].__name__, "boolean")

    def test_reference_shows_every_key_once(self):
        ref = _reference()
        tables = ref.parts("type = http", http.Options)
        self.assertEqual([cls for _, cls, _ in tables], list(PARTS))
        shown = [key for _, cls, skip in tables for key, _, _ in describe(cls) if key not in skip]
        self.assertEqual(sorted(shown), sorted([*DEFAULTS, "endpoint"]))
        self.assertEqual(sorted(shown), sorted(set(shown)))

    def test_configuration_lists_every_key_once(self):
        with open(os.path.join(ROOT, "docs", "configuration.rst"), encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("type = http\n~~~"):text.index("type = dirwatch\n~~~")]
        listed = [line.split("``")[1] for line in section.splitlines() if re.match(r"``[a-z_0-9]+``  ", line)]
        self.assertEqual(sorted(listed), sorted([*DEFAULTS, "endpoint"]))


APP = '''
def add(a: int, b: int) -> int:
    return a + b
'''


class ControlledHarness(AppHarness):
    """An AppHarness that is also the node's :class:`~msgd.services.Control`:
    it records reloads; its log levels are a dict."""

    def __init__(self, apps_dir):
        super().__init__(apps_dir, interface="web")
        self.reloads: list[defer.Deferred] = []
        self.last_reload = None
        self.logs = FakeLogs()

    def reload(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.reloads.append(d)
        return d


class FakeLogs:
    def __init__(self):
        self.levels_ = {"*": "info"}

    def levels(self) -> dict:
        return dict(self.levels_)

    def set_level(self, namespace: str, level: str) -> None:
        if level not in ("debug", "info", "warn", "error"):
            raise BadLevel(f"no log level {level!r}")
        self.levels_[namespace] = level


class Site(unittest.TestCase):
    """An HTTP interface on a harness, and requests through its Site."""

    def build(self, harness_class=AppHarness, **options):
        apps = os.path.abspath(self.mktemp())
        write(os.path.join(apps, "m.py"), APP)
        self.harness = harness_class(apps) if harness_class is not AppHarness else AppHarness(apps, interface="web")
        self.interface = http.HTTPInterface("web", http.Options(endpoint="tcp:0", **options), self.harness)
        return self.interface

    def connect(self, peer: str = "127.0.0.1"):
        """A connection to the interface's own Site: (channel, transport)."""
        channel = self.interface.site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def get(self, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b""):
        """One request through the interface's own Site: (status, headers, body)."""
        channel, transport = self.connect()
        channel.dataReceived(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (method, path, len(body), headers, body))
        return self.parse(transport.value())

    @staticmethod
    def parse(raw: bytes):
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:]) if lines[0] else {}
        if headers.get(b"transfer-encoding") == b"chunked":
            chunks, rest = [], body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                chunks.append(rest[:int(size, 16)])
                rest = rest[int(size, 16) + 2:]
            body = b"".join(chunks)
        return (int(lines[0].split()[1]) if lines[0] else None), headers, body


class SiteTests(Site):

    def test_health_metrics_targets_on_a_harness(self):
        self.build()
        status, headers, body = self.get(b"GET", b"/health")
        self.assertEqual((status, headers[b"content-type"]), (200, b"application/json"))
        self.assertEqual(json.loads(body), self.harness.health())
        self.assertEqual(self.get(b"GET", b"/metrics")[0], 200)
        status, _, body = self.get(b"GET", b"/metrics")
        self.assertIn(b'msgd_http_responses_total{code="200",interface="web"} 2.0', body)
        status, _, body = self.get(b"GET", b"/targets")
        self.assertEqual(status, 200)
        self.assertIn(b"<code>m.add</code>", body)
        self.assertIn(b"msgd node harness", body)      # services.settings.name

    def test_health_down_is_503(self):
        self.build()
        self.harness.health = lambda: {"status": "down"}        # type: ignore[method-assign]
        self.assertEqual(self.get(b"GET", b"/health")[0], 503)

    def test_switched_off(self):
        self.build(health=False, metrics=False, poll=False, sse=False, websocket=False, soap=False)
        self.assertEqual(self.get(b"GET", b"/health")[0], 404)
        self.assertEqual(self.get(b"GET", b"/metrics")[0], 404)
        self.assertIsNone(self.interface.shared.poll_sessions)
        self.assertIsNone(self.interface.shared.websocket)
        self.assertEqual(self.interface.refusals, [xmlrpc.refuse])

    def test_poll_and_sse_share_the_sessions(self):
        iface = self.build()
        sessions = iface.shared.poll_sessions
        self.assertIsInstance(sessions, poll.Sessions)
        for segment in (b"poll", b"sse"):
            self.assertIs(iface.root.children[segment].inner.registry, sessions)    # behind the guard
        status, _, body = self.get(b"GET", b"/sse?session=nope")
        self.assertEqual(status, 404)
        self.assertIsInstance(self.build(poll=False).shared.poll_sessions, poll.Sessions)    # SSE alone

    def test_harness_is_no_control(self):
        self.build()
        self.assertIsNone(self.interface.control)
        self.assertNotIsInstance(self.harness, Control)
        self.assertRaises(StartupError, self.build, admin=True)


class AdminTests(Site):
    """``/admin`` on a fake Control."""

    def setUp(self):
        self.build(ControlledHarness, admin=True)
        self.assertIs(self.interface.control, self.harness)

    JSON = b"Content-Type: application/json\r\n"

    def test_reload_answers(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST /admin/reload HTTP/1.1\r\nHost: x\r\n%sContent-Length: 2\r\n\r\n{}" % self.JSON)
        self.assertEqual((len(self.harness.reloads), transport.value()), (1, b""))    # waiting for the reload
        self.harness.reloads[0].callback({"restarted": ["web"]})
        status, _, body = self.parse(transport.value())
        self.assertEqual((status, json.loads(body)), (200, {"ok": True, "restarted": ["web"]}))
        transport.clear()
        channel.dataReceived(b"POST /admin/reload HTTP/1.1\r\nHost: x\r\n%sContent-Length: 2\r\n\r\n{}" % self.JSON)
        self.harness.reloads[1].errback(ValueError("bad ini"))
        status, _, body = self.parse(transport.value())
        self.assertEqual((status, json.loads(body)), (409, {"ok": False, "error": "bad ini"}))

    def test_reload_needs_json(self):
        self.assertEqual(self.get(b"POST", b"/admin/reload", b"{}")[0], 415)
        self.assertEqual(self.harness.reloads, [])

    def test_log_levels(self):
        status, _, body = self.get(b"POST", b"/admin/log-level", b'{"namespace": "apps", "level": "debug"}',
                                   self.JSON)
        self.assertEqual((status, json.loads(body)), (200, {"levels": {"*": "info", "apps": "debug"}}))
        self.assertEqual(self.get(b"POST", b"/admin/log-level", b'{"namespace": "a", "level": "loud"}',
                                  self.JSON)[0], 400)
        self.assertEqual(json.loads(self.get(b"GET", b"/admin/log-level")[2]),
                         {"levels": {"*": "info", "apps": "debug"}})
        self.harness.logs = None
        self.assertEqual(self.get(b"GET", b"/admin/log-level")[0], 503)

    def test_only_allowed_addresses(self):
        channel, transport = self.connect("10.1.2.3")
        channel.dataReceived(b"POST /admin/reload HTTP/1.1\r\nHost: x\r\n%sContent-Length: 2\r\n\r\n{}" % self.JSON)
        self.assertEqual(self.parse(transport.value())[0], 403)
        self.assertEqual(self.harness.reloads, [])

    def test_status_feed_reads_services_and_control(self):
        self.harness.health = lambda: {"status": "ok", "uptime": 1.0, "interfaces": {}, "adapters": {},
                                       "load_errors": {}}   # type: ignore[method-assign]
        self.harness.last_reload = {"at": 1.0, "ok": True, "error": None}
        feed = admin.StatusFeed(self.harness, self.harness, 1.0)
        snap = feed.snapshot()
        self.assertEqual((snap["node"], snap["status"], snap["last_reload"], snap["log_levels"]),
                         ("harness", "ok", {"at": 1.0, "ok": True, "error": None}, {"*": "info"}))
        self.assertEqual(list(snap["modules"]), ["m"])
