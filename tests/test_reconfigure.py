"""Reconfiguration without restart: SIGHUP to a real node process, and
NodeService.reconfigure in process for the roll-back path."""

import json
import os
import signal
import socket
import struct

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.config import ConfigError, parse_text
from tests.helpers import http, http_port, make_node, rpc
from tests.process import NodeProcess, call
from tests.servers import free_port, port_open
from tests.test_tap import poll
from tests.wsclient import WS

APP = "def ping():\n    return 'pong'\n"

BEFORE = """
[node]
name = rc
drain_timeout = 2s

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1

[interface:old]
type = http
endpoint = tcp:{old}:interface=127.0.0.1

[interface:chg]
type = http
endpoint = tcp:{chg1}:interface=127.0.0.1
"""

AFTER = """
[node]
name = rc
drain_timeout = 2s

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1

[interface:chg]
type = http
endpoint = tcp:{chg2}:interface=127.0.0.1

[interface:new]
type = http
endpoint = tcp:{new}:interface=127.0.0.1
"""


def opened(port):
    return deferToThread(port_open, "127.0.0.1", port)


class SighupTests(unittest.TestCase):
    def setUp(self):
        self.ports = {k: free_port() for k in ("old", "chg1", "chg2", "new")}
        self.node = NodeProcess(os.path.abspath(self.mktemp()), BEFORE.format(port="{port}", **self.ports),
                                {"m.py": APP})
        self.node.start()
        self.addCleanup(self.node.stop)

    def write_ini(self, text):
        with open(self.node.ini, "w") as f:
            f.write(text)

    def reloads(self, words):
        return deferToThread(poll, lambda: self.node.output().count(words), 15)

    @defer.inlineCallbacks
    def assertPorts(self, **expected):
        for name, want in expected.items():
            port = self.node.port if name == "web" else self.ports[name]
            self.assertEqual((yield opened(port)), want, f"{name} ({port}) open should be {want}")

    @defer.inlineCallbacks
    def test_added_removed_changed_and_broken(self):
        ws = yield WS.connect(self.node.port)
        self.addCleanup(ws.close)
        self.assertEqual((yield ws.call("m.ping"))["result"], "pong")
        yield self.assertPorts(web=True, old=True, chg1=True, chg2=False, new=False)

        self.write_ini(AFTER.format(port=self.node.port, **self.ports))
        self.node.signal(signal.SIGHUP)
        self.assertEqual((yield self.reloads("configuration reloaded")), 1, self.node.output())
        yield self.assertPorts(web=True, old=False, chg1=False, chg2=True, new=True)
        self.assertIn("added ['new'], removed ['old'], restarted ['chg']", self.node.output())
        answer = yield deferToThread(call, self.ports["new"], "m.ping")
        self.assertEqual(answer["result"], "pong")
        # the WebSocket on the untouched interface is the same connection
        self.assertEqual((yield ws.call("m.ping"))["result"], "pong")

        self.write_ini(AFTER.format(port=self.node.port, **self.ports) + "endpont = tcp:1\n")
        self.node.signal(signal.SIGHUP)
        self.assertEqual((yield self.reloads("configuration not reloaded")), 1, self.node.output())
        self.assertIn("[interface:new] endpont: unknown key", self.node.output())
        yield self.assertPorts(web=True, old=False, chg1=False, chg2=True, new=True)
        self.assertEqual((yield ws.call("m.ping"))["result"], "pong")
        self.assertIsNone(self.node.proc.poll())


class InProcessTests(unittest.TestCase):
    INI = """
[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
"""

    def config(self, node, text):
        return parse_text("[node]\nname = test\n" + text, node.config.path)

    @defer.inlineCallbacks
    def test_listener_that_cannot_listen_rolls_back(self):
        node = make_node(self, self.INI, {"m.py": APP})
        yield node.ready()
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        before = node.interfaces["web"]
        new = self.config(node, self.INI + f"""
[interface:extra]
type = http
endpoint = tcp:{busy.getsockname()[1]}:interface=127.0.0.1
""")
        yield self.assertFailure(node.reconfigure(new), Exception)
        self.assertEqual(sorted(node.interfaces), ["web"])
        self.assertIs(node.interfaces["web"], before)
        self.assertFalse(node.last_reload["ok"])
        self.assertEqual(node.metrics.value("msgd_config_reloads_total", {"outcome": "failed"}), 1)
        port = before.port.getHost().port
        self.assertEqual((yield rpc(port, {"jsonrpc": "2.0", "id": 1, "method": "m.ping"}))["result"], "pong")

    @defer.inlineCallbacks
    def test_unknown_target_changes_nothing(self):
        node = make_node(self, self.INI, {"m.py": APP})
        yield node.ready()
        new = self.config(node, self.INI + """
[interface:drop]
type = dirwatch
directory = drop
handler = m.nope
""")
        yield self.assertFailure(node.reconfigure(new), ConfigError)
        self.assertEqual(sorted(node.interfaces), ["web"])
        self.assertEqual([c.name for c in node.config.interfaces], ["web"])

    @defer.inlineCallbacks
    def test_node_keys_apply_live_except_restart_ones(self):
        node = make_node(self, self.INI, {"m.py": APP})
        yield node.ready()
        web = node.interfaces["web"]
        seen = []
        node.reconfigured.append(seen.append)
        new = parse_text("[node]\nname = other\nrequest_timeout = 3s\n" + self.INI, node.config.path)
        changes = yield node.reconfigure(new)
        self.assertEqual(changes, {"added": [], "removed": [], "restarted": []})
        self.assertIs(node.interfaces["web"], web)
        self.assertEqual(node.config.node.request_timeout, 3.0)
        self.assertEqual(node.config.node.name, "test")       # only a restart renames a node
        self.assertEqual(seen, [node.config])

    @defer.inlineCallbacks
    def test_outbox_and_dedup_keys(self):
        peer = "[peer:other]\nendpoints = tcp:host=127.0.0.1:port=1\n"
        node = make_node(self, "[node]\noutbox_retry_min = 250ms\noutbox_retry_max = 2m\noutbox_window = 8\n"
                               "dedup_retention = 2d\n" + self.INI + peer, {"m.py": APP})
        yield node.ready()
        self.assertEqual((node.outbox.base_delay, node.outbox.max_delay, node.outbox.window), (0.25, 120.0, 8))
        self.assertEqual(node.received.retention, 2 * 86400)
        new = parse_text("[node]\nname = test\noutbox_retry_max = 10m\noutbox_window = 2\n"
                         "dedup_retention = 30d\n" + self.INI + peer, node.config.path)
        yield node.reconfigure(new)
        self.assertEqual((node.outbox.base_delay, node.outbox.max_delay, node.outbox.window), (1.0, 600.0, 2))
        self.assertEqual(node.received.retention, 30 * 86400)

    @defer.inlineCallbacks
    def test_admin_reload(self):
        ini = self.INI + "admin = yes\n"
        node = make_node(self, ini, {"m.py": APP})
        yield node.ready()
        url = f"http://127.0.0.1:{http_port(node)}/admin/reload"
        with open(node.config.path, "w") as f:
            f.write("[node]\nname = test\n" + ini + "\n[interface:extra]\ntype = http\n"
                    "endpoint = tcp:0:interface=127.0.0.1\n")
        code, _, body = yield http("POST", url, b"{}", {"content-type": "application/json"})
        self.assertEqual((code, json.loads(body)),
                         (200, {"ok": True, "added": ["extra"], "removed": [], "restarted": []}))
        self.assertTrue(node.interfaces["extra"].port)

        with open(node.config.path, "a") as f:
            f.write("max_body = huge\n")
        code, _, body = yield http("POST", url, b"{}", {"content-type": "application/json"})
        self.assertEqual(code, 409)
        self.assertIn("[interface:extra] max_body:", json.loads(body)["error"])
        self.assertEqual(sorted(node.interfaces), ["extra", "web"])
        # a form post (what another site's page could send) is refused
        code, _, _ = yield http("POST", url, b"x=1", {"content-type": "application/x-www-form-urlencoded"})
        self.assertEqual(code, 415)

    @defer.inlineCallbacks
    def test_peers_by_name(self):
        peer = "\n[peer:{name}]\nendpoints = tcp:host=127.0.0.1:port={port}\n"
        a = peer.format(name="a", port=free_port())
        node = make_node(self, self.INI + a, {"m.py": APP})
        yield node.ready()
        old_a = node.peers["a"]
        b = peer.format(name="b", port=free_port())
        changes = yield node.reconfigure(self.config(node, self.INI + a + "ordered = yes\n" + b))
        self.assertEqual(changes, {"added": ["b"], "removed": [], "restarted": ["a"]})
        self.assertIsNot(node.peers["a"], old_a)
        self.assertTrue(node.peers["a"].ordered)
        self.assertIsNone(old_a.parent)
        self.assertIs(node.peers["b"].parent, node)
        changes = yield node.reconfigure(self.config(node, self.INI + b))
        self.assertEqual(changes, {"added": [], "removed": ["a"], "restarted": []})
        self.assertEqual(sorted(node.peers), ["b"])


class GracefulStopTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_drain_closes_websockets_with_going_away(self):
        node = make_node(self, InProcessTests.INI, {"m.py": APP})
        yield node.ready()
        ws = yield WS.connect(http_port(node))
        self.addCleanup(ws.close)
        self.assertEqual((yield ws.call("m.ping"))["result"], "pong")
        closing = deferToThread(ws.ws.recv_data, True)
        yield node.stopService()
        opcode, data = yield closing
        self.assertEqual(opcode, 8)      # a close frame
        self.assertEqual(struct.unpack(">H", data[:2])[0], 1001)
        self.assertEqual(data[2:], b"node going away")
