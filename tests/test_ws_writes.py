"""How MsgdWebSocket writes (msgd/interfaces/websocket.py over the shared
BoundedWriter), transport-free on a task.Clock: what a reactor turn gives a
connection goes out in one write at the end of the turn, in order; while the
transport is paused it waits, up to ws_max_pending bytes."""

import json
import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msgd.config import parse_text
from msgd.interfaces.websocket import MsgdWebSocketFactory
from msgd.interfaces.writer import BoundedWriter
from msgd.net import write_now
from msgd.node import NodeService
from tests.helpers import server_frames

INI = """
[node]
name = ws-writes
apps = apps
reload_interval = 0

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
ws_max_pending = 2KiB
"""


class CountingTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class WriteTests(unittest.TestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "apps"))
        self.clock = Clock()
        self.node = NodeService(parse_text(INI, os.path.join(base, "node.ini")), self.clock)
        self.node.load_apps()
        self.web = self.node.interfaces["web"]
        from msgd.interfaces import websocket
        websocket.make_resource(self.web)            # the interface's metrics
        self.factory = MsgdWebSocketFactory(self.web)
        self.proto = self.connect()

    def connect(self):
        """An open connection, as onOpen makes it (without the handshake)."""
        proto = self.factory.buildProtocol(None)
        transport = proto.transport = CountingTransport()
        transport.registerProducer(proto, True)
        proto._perMessageCompress = None
        proto.state = proto.STATE_OPEN
        proto.closeHandshakeTimeout = 0     # (its timer would run on the global reactor)
        proto.connection = self.factory.clients.connect(proto.deliver)
        proto.writer = BoundedWriter(lambda data: write_now(transport, data), self.web.options.ws_max_pending,
                                     proto._drop_slow, None, self.web.turn)
        return proto

    def messages(self, proto=None):
        return [(op, json.loads(p) if op == 1 else p)
                for op, p in server_frames((proto or self.proto).transport.value())]

    def test_one_write_per_turn_in_order(self):
        p = self.proto
        p.onMessage(b'{"jsonrpc":"2.0","id":1,"method":"rpc.subscribe","params":{"channel":"c"}}', False)
        self.node.pubsub.publish("c", 1)
        p.onMessage(b'{"jsonrpc":"2.0","id":2,"method":"rpc.publish","params":{"channel":"c","data":2}}', False)
        self.assertEqual(p.transport.writes, 0)            # nothing written during the turn
        self.clock.advance(0)
        self.assertEqual(p.transport.writes, 1)
        got = [m for _, m in self.messages()]
        self.assertEqual([m.get("id") for m in got], [1, None, None, 2])
        self.assertEqual([m["params"]["data"] for m in got if "params" in m], [1, 2])

    def test_paused_waits_then_one_write(self):
        p = self.proto
        self.node.pubsub.subscribe("c", p)
        p.pauseProducing()
        for i in range(5):
            self.node.pubsub.publish("c", i)
        self.clock.advance(0)
        self.assertEqual(p.transport.writes, 0)
        p.resumeProducing()
        self.assertEqual(p.transport.writes, 1)
        self.assertEqual([m["params"]["data"] for _, m in self.messages()], [0, 1, 2, 3, 4])

    def test_past_ws_max_pending_while_paused_closes_1008(self):
        p = self.proto
        other = self.connect()
        self.node.pubsub.subscribe("c", p)
        self.node.pubsub.subscribe("c", other)
        p.pauseProducing()
        for i in range(30):
            self.node.pubsub.publish("c", "x" * 100)       # 30 x ~180 bytes: past 2 KiB
        self.clock.advance(0)
        [(op, payload)] = server_frames(p.transport.value())
        self.assertEqual((op, int.from_bytes(payload[:2], "big")), (8, 1008))
        self.assertEqual(len(self.messages(other)), 30)       # the other one got everything
        self.assertEqual(self.node.metrics.value("msgd_ws_dropped_total",
                                                 {"interface": "web", "reason": "slow_consumer"}), 1)

    def test_autobahn_writes_go_after_what_is_queued(self):
        p = self.proto
        self.node.pubsub.subscribe("c", p)
        self.node.pubsub.publish("c", "last words")
        p.sendClose(1000)
        self.node.pubsub.publish("c", "too late")          # after a close frame: nothing
        self.clock.advance(0)
        self.assertEqual([op for op, _ in server_frames(p.transport.value())], [1, 8])

    def test_rpc_publish_answers_at_once(self):
        """On one node rpc.publish answers without waiting for a Deferred:
        its answer is in the same end-of-turn write as the event."""
        p = self.proto
        self.node.pubsub.subscribe("c", p)
        p.onMessage(b'{"jsonrpc":"2.0","id":7,"method":"rpc.publish","params":{"channel":"c","data":"x"}}', False)
        self.assertEqual(self.node.pubsub.publish_now("c", "y"), 2)
        self.clock.advance(0)
        got = [m for _, m in self.messages()]
        self.assertEqual([(m.get("id"), m.get("result")) for m in got],
                         [(None, None), (7, {"channel": "c", "offset": 1}), (None, None)])
