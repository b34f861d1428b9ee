"""WebSocket interface against a real client library (websocket-client)."""

import json
import os

import websocket
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.interfaces.websocket import unmask
from tests.helpers import SocketTransport, http, http_port, make_node, open_websocket, server_frames
from tests.wsclient import WS

INI = """
[node]
name = ws-test

[pubsub]
history_size = 5

[channel:short.*]
history_size = 2

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
ws_max_message = 64KiB
ws_origins = http://good.example
"""

APPS = {"m.py": '''
from msgd import api

def add(a: int, b: int) -> int:
    return a + b

def announce(channel: str, text: str):
    return api.publish(channel, {"text": text})
'''}


class WebSocketTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.port = http_port(self.node)
        self.clients = []

    @defer.inlineCallbacks
    def client(self, **kw):
        c = yield WS.connect(self.port, origin=kw.pop("origin", "http://good.example"), **kw)
        self.clients.append(c)
        self.addCleanup(c.close)
        return c

    def closed_with(self, frame: websocket.ABNF, code: int):
        """The node answers a client's ``frame`` with a close frame of ``code``
        (read in memory: on a real socket the close may come as a reset, our
        unread bytes still in flight), then closes on the client's answer."""
        t = SocketTransport(room=10 ** 9)
        proto = open_websocket(self, self.node.interfaces["web"], t)
        proto.dataReceived(frame.format())
        t.flush()
        frames = server_frames(t.sent)
        self.assertTrue(frames, "no frame: the connection was dropped" if t.disconnected else "no frame")
        opcode, payload = frames[-1]
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (8, code))
        proto.dataReceived(websocket.ABNF.create_frame(payload[:2], websocket.ABNF.OPCODE_CLOSE).format())
        t.flush()
        self.assertTrue(t.disconnected)

    @defer.inlineCallbacks
    def test_call_and_batch(self):
        c = yield self.client()
        self.assertEqual(c.ws.subprotocol, "jsonrpc")
        r = yield c.call("m.add", [1, 2])
        self.assertEqual(r["result"], 3)
        yield c.send([{"jsonrpc": "2.0", "id": "a", "method": "m.add", "params": [1, 1]},
                      {"jsonrpc": "2.0", "method": "m.add", "params": [1, 1]},
                      {"jsonrpc": "2.0", "id": "b", "method": "m.nope"}])
        out = yield c.recv()
        self.assertEqual([o["id"] for o in out], ["a", "b"])
        self.assertEqual(out[0]["result"], 2)
        self.assertEqual(out[1]["error"]["code"], -32601)

    @defer.inlineCallbacks
    def test_no_subprotocol_accepted(self):
        c = yield self.client(subprotocols=None)
        r = yield c.call("m.add", [2, 2])
        self.assertEqual(r["result"], 4)

    @defer.inlineCallbacks
    def test_unknown_subprotocol_refused(self):
        with self.assertRaises(websocket.WebSocketBadStatusException):
            yield WS.connect(self.port, subprotocols=["mqtt"], origin="http://good.example")

    @defer.inlineCallbacks
    def test_bad_origin_refused(self):
        with self.assertRaises(websocket.WebSocketBadStatusException):
            yield WS.connect(self.port, origin="http://evil.example")

    @defer.inlineCallbacks
    def test_malformed_input(self):
        c = yield self.client()
        for bad, code in [("{nope", -32700), ('{"jsonrpc":"2.0","method":7,"id":1}', -32600), ("[]", -32600),
                          ('{"jsonrpc":"2.0","id":2,"method":"m.add","params":["x",1]}', -32602),
                          ('{"jsonrpc":"2.0","id":3,"method":"rpc.subscribe","params":{}}', -32602),
                          ('{"jsonrpc":"2.0","id":4,"method":"rpc.publish","params":{"channel":"a b"}}', -32602),
                          ('{"jsonrpc":"2.0","id":5,"method":"rpc.publish","params":{"channel":"x.*"}}', -32602)]:
            yield c.send(bad)
            out = yield c.recv()
            self.assertEqual(out["error"]["code"], code, bad)
        yield deferToThread(c.ws.send_binary, b"\x00\x01")
        out = yield c.recv()
        self.assertEqual(out["error"]["code"], -32600)
        r = yield c.call("m.add", [1, 2])   # still alive
        self.assertEqual(r["result"], 3)

    # Autobahn's failByDrop (True unless the factory's options say otherwise)
    # drops the TCP connection where docs/websocket.rst promises a close frame.
    def test_too_big_message_closes_with_1009(self):
        self.closed_with(websocket.ABNF.create_frame(json.dumps({"x": "a" * 70000}), websocket.ABNF.OPCODE_TEXT), 1009)

    @defer.inlineCallbacks
    def test_other_clients_go_on_after_a_too_big_message(self):
        c = yield self.client()
        yield c.send(json.dumps({"x": "a" * 70000}))
        other = yield self.client()
        r = yield other.call("m.add", [1, 2])
        self.assertEqual(r["result"], 3)

    @defer.inlineCallbacks
    def test_frames_are_unmasked_and_reassembled(self):
        """msgd unmasks client frames itself: a call split in fragments (each
        frame with its own masking key) and one large enough to arrive in
        several reads both come through."""
        c = yield self.client()
        msg = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "m.add", "params": [40, 2]}).encode()
        frames = [websocket.ABNF.create_frame(msg[:11], websocket.ABNF.OPCODE_TEXT, fin=0),
                  websocket.ABNF.create_frame(msg[11:30], websocket.ABNF.OPCODE_CONT, fin=0),
                  websocket.ABNF.create_frame(msg[30:], websocket.ABNF.OPCODE_CONT, fin=1)]
        for f in frames:
            yield deferToThread(c.ws.send_frame, f)
        r = yield c.recv()
        self.assertEqual((r["id"], r["result"]), (7, 42))
        big = "é" * 25000             # 50,000 bytes of UTF-8, not ASCII
        yield c.send(json.dumps({"jsonrpc": "2.0", "id": 8, "method": "rpc.publish",
                                 "params": {"channel": "big", "data": big}}, ensure_ascii=False))
        r = yield c.recv()
        self.assertEqual(r["result"]["offset"], 1)
        sub = yield self.client()
        yield sub.call("rpc.subscribe", {"channel": "big", "since": 0})
        self.assertEqual(sub.pending()[0]["params"]["data"], big)

    def test_text_that_is_not_utf8_closes_with_1007(self):
        bad = b'{"jsonrpc":"2.0","id":1,"method":"m.add","params":["\xff"]}'
        self.closed_with(websocket.ABNF.create_frame(bad, websocket.ABNF.OPCODE_TEXT), 1007)

    @defer.inlineCallbacks
    def test_other_clients_go_on_after_text_that_is_not_utf8(self):
        c = yield self.client()
        bad = b'{"jsonrpc":"2.0","id":1,"method":"m.add","params":["\xff"]}'
        yield deferToThread(c.ws.send_frame, websocket.ABNF.create_frame(bad, websocket.ABNF.OPCODE_TEXT))
        other = yield self.client()
        r = yield other.call("m.add", [1, 2])
        self.assertEqual(r["result"], 3)

    @defer.inlineCallbacks
    def test_subscribe_publish(self):
        a = yield self.client()
        b = yield self.client()
        r = yield a.call("rpc.subscribe", {"channel": "room.1"})
        self.assertEqual((r["result"]["offset"], r["result"]["recovered"]), (0, True))
        epoch = r["result"]["epoch"]
        r = yield b.call("rpc.publish", {"channel": "room.1", "data": {"t": "hi"}})
        self.assertEqual(r["result"], {"channel": "room.1", "offset": 1})
        ev = yield a.next_event()
        self.assertEqual(ev, {"jsonrpc": "2.0", "method": "rpc.event",
                              "params": {"channel": "room.1", "offset": 1, "epoch": epoch, "data": {"t": "hi"}}})
        # app code publishes too, from any interface
        r = yield b.call("m.announce", ["room.1", "from app"])
        self.assertEqual(r["result"], 2)
        ev = yield a.next_event()
        self.assertEqual(ev["params"]["data"], {"text": "from app"})
        # unsubscribe stops delivery
        r = yield a.call("rpc.unsubscribe", {"channel": "room.1"})
        self.assertTrue(r["result"]["unsubscribed"])
        yield b.call("rpc.publish", {"channel": "room.1", "data": 3})
        r = yield a.call("m.add", [0, 0])      # answer comes with no event before it
        self.assertEqual(a.pending(), [])

    @defer.inlineCallbacks
    def test_publish_over_http_reaches_websocket(self):
        a = yield self.client()
        yield a.call("rpc.subscribe", ["feed"])
        code, _, body = yield http("POST", f"http://127.0.0.1:{self.port}/rpc", json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "rpc.publish", "params": {"channel": "feed", "data": 42}}).encode())
        self.assertEqual(json.loads(body)["result"]["offset"], 1)
        ev = yield a.next_event()
        self.assertEqual(ev["params"]["data"], 42)

    @defer.inlineCallbacks
    def test_pattern_subscription(self):
        a = yield self.client()
        r = yield a.call("rpc.subscribe", {"channel": "news.*"})
        self.assertTrue(r["result"]["pattern"])
        yield a.call("rpc.subscribe", {"channel": "news.sport"})   # both match: delivered once
        yield a.call("rpc.publish", {"channel": "news.sport", "data": 1})
        yield a.call("rpc.publish", {"channel": "weather", "data": 2})
        yield a.call("rpc.publish", {"channel": "news.tech", "data": 3})
        r = yield a.call("m.add", [0, 0])
        got = [(e["params"]["channel"], e["params"]["data"]) for e in a.pending()]
        self.assertEqual(got, [("news.sport", 1), ("news.tech", 3)])

    @defer.inlineCallbacks
    def test_presence(self):
        a = yield self.client()
        b = yield self.client()
        yield a.call("rpc.subscribe", {"channel": "lobby"})
        yield b.call("rpc.subscribe", {"channel": "lobby"})
        r = yield a.call("rpc.presence", {"channel": "lobby"})
        self.assertEqual(r["result"]["count"], 2)
        yield b.close()
        for _ in range(100):   # the close reaches the node asynchronously
            r = yield a.call("rpc.presence", {"channel": "lobby"})
            if r["result"]["count"] == 1:
                break
        self.assertEqual(r["result"]["count"], 1)

    @defer.inlineCallbacks
    def test_resume_recovered_true_and_false(self):
        a = yield self.client()
        pub = yield self.client()
        r = yield a.call("rpc.subscribe", {"channel": "c"})
        epoch = r["result"]["epoch"]
        yield pub.call("rpc.publish", {"channel": "c", "data": 1})
        ev = yield a.next_event()
        self.assertEqual(ev["params"]["offset"], 1)
        yield a.close()
        for i in (2, 3, 4):
            yield pub.call("rpc.publish", {"channel": "c", "data": i})
        a2 = yield self.client()
        r = yield a2.call("rpc.subscribe", {"channel": "c", "since": 1, "epoch": epoch})
        self.assertEqual(r["result"], {"channel": "c", "epoch": epoch, "offset": 4, "recovered": True})
        self.assertEqual([e["params"]["offset"] for e in a2.pending()], [2, 3, 4])   # before the answer
        # history of 5: resuming from offset 1 after 10 more events cannot recover
        for i in range(10):
            yield pub.call("rpc.publish", {"channel": "c", "data": i})
        a3 = yield self.client()
        r = yield a3.call("rpc.subscribe", {"channel": "c", "since": 1, "epoch": epoch})
        self.assertFalse(r["result"]["recovered"])
        self.assertEqual(a3.pending(), [])
        # a wrong epoch (history lost, e.g. restart) cannot recover either
        a4 = yield self.client()
        r = yield a4.call("rpc.subscribe", {"channel": "c", "since": 14, "epoch": "other"})
        self.assertFalse(r["result"]["recovered"])
        # per-pattern override: short.* keeps 2
        yield pub.call("rpc.publish", {"channel": "short.x", "data": 1})
        for i in range(3):
            r = yield pub.call("rpc.publish", {"channel": "short.x", "data": i})
        r = yield a4.call("rpc.subscribe", {"channel": "short.x", "since": 1})
        self.assertFalse(r["result"]["recovered"])
        r = yield a4.call("rpc.subscribe", {"channel": "short.x", "since": 2})
        self.assertTrue(r["result"]["recovered"])

    @defer.inlineCallbacks
    def test_pattern_resume_replays_every_matched_channel_or_says_not_recovered(self):
        pub = yield self.client()
        yield pub.call("rpc.publish", {"channel": "a.x", "data": 1})
        a = yield self.client()
        r = (yield a.call("rpc.subscribe", {"channel": "a.*"}))["result"]
        held = {"since": r["offset"], "epoch": r["epoch"]}       # {"a.x": 1}, its epoch
        yield a.close()
        yield pub.call("rpc.publish", {"channel": "a.x", "data": 2})
        yield pub.call("rpc.publish", {"channel": "a.y", "data": 1})    # begun while away
        yield pub.call("rpc.publish", {"channel": "a.x", "data": 3})
        a2 = yield self.client()
        r = (yield a2.call("rpc.subscribe", dict(held, channel="a.*")))["result"]
        self.assertTrue(r["recovered"])
        self.assertEqual([(e["params"]["channel"], e["params"]["offset"]) for e in a2.pending()],
                         [("a.x", 2), ("a.y", 1), ("a.x", 3)])     # before the answer
        self.assertEqual(r["offset"], {"a.x": 3, "a.y": 1})
        # history of 5 no longer covers a.x after offset 1: told, and a.y is still replayed
        for i in range(5):
            yield pub.call("rpc.publish", {"channel": "a.x", "data": i})
        a3 = yield self.client()
        r = (yield a3.call("rpc.subscribe", dict(held, channel="a.*")))["result"]
        self.assertFalse(r["recovered"])
        self.assertEqual([(e["params"]["channel"], e["params"]["offset"]) for e in a3.pending()], [("a.y", 1)])

    @defer.inlineCallbacks
    def test_a_connection_holds_only_what_differs(self):
        """Autobahn's ~40 options live on the interface's protocol class, not
        in each connection; an idle subscribed connection's __dict__ is small."""
        c = yield self.client()
        yield c.call("rpc.subscribe", {"channel": "room.1"})
        iface = self.node.interfaces["web"]
        [proto] = [going_away.__self__ for going_away in iface.goodbyes.values()]
        cls = type(proto)
        self.assertEqual((cls.maxMessagePayloadSize, cls.maxFramePayloadSize), (64 * 1024, 64 * 1024))
        self.assertEqual((cls.autoPingInterval, cls.autoPingTimeout), (30.0, 10.0))
        self.assertEqual(cls.perMessageCompressionAccept(["offer"]), None)     # a function, not a method
        state = vars(proto)
        self.assertEqual([name for name in WebSocketServerProtocol.CONFIG_ATTRS if name in state], [])
        self.assertNotIn("http_headers", state)
        self.assertLessEqual(len(state), 30, sorted(state))
        r = yield c.call("m.add", [1, 2])          # and it still works
        self.assertEqual(r["result"], 3)
        yield c.call("rpc.publish", {"channel": "room.1", "data": "x"})
        ev = yield c.next_event()
        self.assertEqual(ev["params"]["data"], "x")

    @defer.inlineCallbacks
    def test_metrics_count_connections(self):
        yield self.client()
        m = self.node.metrics.value("msgd_ws_connections", {"interface": "web"})
        self.assertEqual(m, 1)


class RefusalTests(unittest.TestCase):
    """A refused login reaches msgd.js in-band (4001), other clients as HTTP 401."""

    @defer.inlineCallbacks
    def test_refused_login_closes_with_4001_for_msgd_js(self):
        node = make_node(self, """
            [interface:web]
            type = http
            endpoint = tcp:0:interface=127.0.0.1
            anonymous = no
            """, APPS)
        port = http_port(node)
        with self.assertRaises(websocket.WebSocketBadStatusException) as e:
            yield WS.connect(port)
        self.assertEqual(e.exception.status_code, 401)
        c = yield WS.connect(port, subprotocols=("jsonrpc", "msgd.refusal"))
        self.addCleanup(c.close)
        yield c.send({"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [1, 2]})
        frame = yield deferToThread(c.ws.recv_data_frame, True)
        self.assertEqual(frame[0], websocket.ABNF.OPCODE_CLOSE)       # no answer: only the close
        self.assertEqual(int.from_bytes(frame[1].data[:2], "big"), 4001)


class UnmaskTests(unittest.TestCase):
    def test_same_as_autobahn_masker_at_any_offset(self):
        key = os.urandom(4)
        for n in (0, 1, 3, 4, 5, 125, 126, 1000, 65537):
            data = os.urandom(n)
            self.assertEqual(unmask(data, key), create_xor_masker(key, n).process(data), n)
            masker = create_xor_masker(key, n)
            pieces, at = [], 0
            for size in (1, 2, 5, 7, n):             # a payload that arrives in several reads
                pieces.append(unmask(data[at:at + size], key, at))
                at += size
            self.assertEqual(b"".join(pieces), masker.process(data), n)
