"""The STOMP listener against a real client (stomp.py, in threads), raw
sockets for what a polite client never sends, and the WebSocket side
(``v12.stomp`` and JSON-RPC subscribers on the same channels)."""

from __future__ import annotations

import json
import os
import queue

import bcrypt
import stomp
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.stomp.codec import Frame, encode
from msgd.interfaces.stomp.session import SessionOptions, StompSession
from tests.helpers import SocketTransport, http_port, make_node, open_websocket, raw_exchange, stomp_frames
from tests.wsclient import WS

APPS = {"calc.py": """
    from msgd import api

    def add(a, b):
        return a + b

    def greet(name="world"):
        return "hello " + name

    def fail():
        raise api.AppError("calc says no", code=-32010)
    """}

INI = """
    [interface:web]
    type = http
    endpoint = tcp:0:interface=127.0.0.1

    [interface:stomp]
    type = stomp
    endpoint = tcp:0:interface=127.0.0.1
    heartbeat = {heartbeat}
    max_unacked = 3
    {extra}
    """

WAIT = 10.0


class _Collect(stomp.ConnectionListener):
    """Every event stomp.py reports, into a queue."""

    def __init__(self, q):
        self.q = q

    def on_connected(self, frame):
        self.q.put(("connected", frame))

    def on_message(self, frame):
        self.q.put(("message", frame))

    def on_receipt(self, frame):
        self.q.put(("receipt", frame))

    def on_error(self, frame):
        self.q.put(("error", frame))

    def on_disconnected(self):
        self.q.put(("disconnected", None))

    def on_heartbeat(self):
        self.q.put(("heartbeat", None))


class Client:
    """A stomp.py connection; each blocking call runs in a thread."""

    classes = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}

    def __init__(self, port, version="1.2", heartbeats=(0, 0)):
        kw = {} if version == "1.0" else {"heartbeats": heartbeats}
        self.conn = self.classes[version]([("127.0.0.1", port)], reconnect_attempts_max=1, **kw)
        self.events = queue.Queue()
        self.conn.set_listener("collect", _Collect(self.events))

    def connect(self, **kw):
        return deferToThread(self.conn.connect, wait=True, **kw)

    def do(self, method, *args, **kw):
        return deferToThread(getattr(self.conn, method), *args, **kw)

    def next(self, kind):
        """The next event of ``kind`` (others before it are skipped, except
        that an unexpected error fails the wait)."""
        def wait():
            while True:
                k, frame = self.events.get(timeout=WAIT)
                if k == kind:
                    return frame
                if k == "error" and kind != "disconnected":
                    raise AssertionError(f"ERROR frame while waiting for {kind}: {frame.headers}")
        return deferToThread(wait)

    def close(self):
        if self.conn.is_connected():
            # the server may close it meanwhile (after an ERROR frame): then there is nothing to disconnect
            return deferToThread(self.conn.disconnect).addErrback(
                lambda f: f.trap(OSError, stomp.exception.StompException))
        return defer.succeed(None)


class ListenerTests(unittest.TestCase):
    def start(self, heartbeat="10s", extra=""):
        self.node = make_node(self, INI.format(heartbeat=heartbeat, extra=extra), APPS)
        self.port = self.node.interfaces["stomp"].port.getHost().port
        self.web = http_port(self.node)
        return self.node

    @defer.inlineCallbacks
    def client(self, version="1.2", **kw):
        c = Client(self.port, version, kw.pop("heartbeats", (0, 0)))
        self.addCleanup(c.close)
        yield c.connect(**kw)
        connected = yield c.next("connected")
        c.version = connected.headers["version"]
        return c

    @defer.inlineCallbacks
    def test_connect_each_version(self):
        self.start()
        for version in ("1.0", "1.1", "1.2"):
            c = yield self.client(version)
            self.assertEqual(c.version, version)
            yield c.do("disconnect", receipt="bye")
            yield c.next("disconnected")

    @defer.inlineCallbacks
    def test_stomp_and_websocket_share_channels(self):
        self.start()
        c = yield self.client()
        yield c.do("subscribe", "/topic/room", id="s1", receipt="sub")
        yield c.next("receipt")
        ws = yield WS.connect(self.web)
        self.addCleanup(ws.close)
        answer = yield ws.call("rpc.subscribe", {"channel": "room"})
        self.assertIn("result", answer)
        wstomp = yield WS.connect(self.web, subprotocols=("v12.stomp",))
        self.addCleanup(wstomp.close)
        yield wstomp.send(encode(Frame("CONNECT", [("accept-version", "1.2"), ("host", "x")])))
        got = yield deferToThread(wstomp.ws.recv)
        self.assertEqual(stomp_frames(got)[0].command, "CONNECTED")
        yield wstomp.send(encode(Frame("SUBSCRIBE", [("destination", "/topic/room"), ("id", "w"),
                                                     ("receipt", "r")])))
        got = yield deferToThread(wstomp.ws.recv)
        self.assertEqual(stomp_frames(got)[0].command, "RECEIPT")

        # STOMP publishes: the other STOMP, the JSON-RPC and the STOMP-over-WS subscribers get it
        yield c.do("send", "/topic/room", json.dumps({"text": "hi"}), content_type="application/json",
                   receipt="pub")
        msg = yield c.next("message")
        self.assertEqual(json.loads(msg.body), {"text": "hi"})
        self.assertEqual((msg.headers["destination"], msg.headers["subscription"], msg.headers["msgd-offset"]),
                         ("/topic/room", "s1", "1"))
        yield c.next("receipt")
        event = yield ws.next_event()
        self.assertEqual(event["params"]["data"], {"text": "hi"})
        got = stomp_frames((yield deferToThread(wstomp.ws.recv)))[0]
        self.assertEqual((got.command, json.loads(got.body)), ("MESSAGE", {"text": "hi"}))

        # JSON-RPC publishes: STOMP gets it
        yield ws.call("rpc.publish", {"channel": "room", "data": [1, 2]})
        msg = yield c.next("message")
        self.assertEqual((json.loads(msg.body), msg.headers["msgd-offset"]), ([1, 2], "2"))

        # a text body is published as a string
        yield c.do("send", "/topic/room", "plain words", content_type="text/plain")
        msg = yield c.next("message")
        self.assertEqual(json.loads(msg.body), "plain words")

        yield c.do("unsubscribe", "s1", receipt="unsub")
        yield c.next("receipt")
        self.assertEqual(self.node.pubsub.presence("room")["count"], 2)

    @defer.inlineCallbacks
    def test_app_call_with_receipt_and_reply_to(self):
        self.start()
        c = yield self.client()
        yield c.do("subscribe", "/temp-queue/answers", id="t")
        yield c.do("send", "/app/calc.add", "[2, 3]", content_type="application/json", receipt="r1",
                   headers={"reply-to": "/temp-queue/answers", "correlation-id": "c1"})
        msg = yield c.next("message")
        self.assertEqual((json.loads(msg.body), msg.headers["destination"], msg.headers["correlation-id"]),
                         (5, "/temp-queue/answers", "c1"))
        receipt = yield c.next("receipt")
        self.assertEqual(receipt.headers["receipt-id"], "r1")

        # keyword arguments, reply to a topic
        yield c.do("subscribe", "/topic/results", id="res", receipt="r2")
        yield c.next("receipt")
        yield c.do("send", "/app/calc.greet", '{"name": "stomp"}', content_type="application/json",
                   headers={"reply-to": "/topic/results"}, receipt="r3")
        msg = yield c.next("message")
        self.assertEqual((json.loads(msg.body), msg.headers["subscription"]), ("hello stomp", "res"))
        yield c.next("receipt")

        # no body: no arguments
        yield c.do("send", "/app/calc.greet", "", headers={"reply-to": "/topic/results"})
        msg = yield c.next("message")
        self.assertEqual(json.loads(msg.body), "hello world")

    @defer.inlineCallbacks
    def test_app_error(self):
        self.start()
        c = yield self.client()
        yield c.do("send", "/app/calc.fail", "", receipt="r1")
        err = yield c.next("error")
        self.assertEqual((err.headers["message"], err.headers["msgd-code"], err.headers["msgd-error"],
                          err.headers["receipt-id"]), ("calc says no", "-32010", "application_error", "r1"))
        yield c.next("disconnected")

    @defer.inlineCallbacks
    def test_app_errors_of_the_taxonomy(self):
        self.start()
        for body, ctype, code in (("[1]", "application/json", "-32602"), ("{", "application/json", "-32700")):
            c = yield self.client()
            yield c.do("send", "/app/calc.add", body, content_type=ctype, receipt="r")
            err = yield c.next("error")
            self.assertEqual(err.headers["msgd-code"], code)
        c = yield self.client()
        yield c.do("send", "/app/calc.nothing", "[]", receipt="r")
        err = yield c.next("error")
        self.assertEqual(err.headers["msgd-error"], "not_found")

    @defer.inlineCallbacks
    def test_heartbeats(self):
        # 500 ms, not less: on a loaded machine a client's own heart-beats can come
        # late enough for the server to drop it as silent (seen once at 100 ms)
        self.start(heartbeat="500ms")
        c = yield self.client(heartbeats=(500, 500))
        for _ in range(3):
            yield c.next("heartbeat")
        self.assertTrue(c.conn.is_connected())

    @defer.inlineCallbacks
    def test_silent_client_is_dropped(self):
        self.start(heartbeat="100ms")
        out = yield deferToThread(raw_exchange, self.port,
                                  encode(Frame("CONNECT", [("accept-version", "1.2"), ("heart-beat", "100,100")])))
        frames = stomp_frames(out)
        self.assertEqual([f.command for f in frames], ["CONNECTED", "ERROR"])
        self.assertIn("heart-beat", frames[-1].get("message"))

    @defer.inlineCallbacks
    def check_ack_mode(self, version, mode):
        c = yield self.client(version)
        yield c.do("subscribe", "/topic/acks", id="a", ack=mode, receipt="s")
        yield c.next("receipt")
        msgs = []
        for i in range(3):
            yield self.node.pubsub.publish("acks", i)
            msgs.append((yield c.next("message")))
        if mode == "auto":
            yield self.node.pubsub.publish("acks", 3)     # no acks needed
            yield c.next("message")
            return
        ack_id = "ack" if version == "1.2" else "message-id"
        if mode == "client":
            ids = [msgs[-1].headers[ack_id]]                # cumulative
        else:
            ids = [m.headers[ack_id] for m in msgs]
        for i, mid in enumerate(ids):
            args = (mid, "a") if version == "1.1" else (mid,)
            yield c.do("ack" if i % 2 == 0 else "nack", *args, receipt=f"a{i}")
            yield c.next("receipt")
        for i in range(3):      # within the bound again
            yield self.node.pubsub.publish("acks", i)
            yield c.next("message")
        yield self.node.pubsub.publish("acks", "too many")
        err = yield c.next("error")
        self.assertIn("unacknowledged", err.headers["message"])

    @defer.inlineCallbacks
    def test_ack_modes(self):
        self.start()
        for version in ("1.1", "1.2"):
            for mode in ("auto", "client", "client-individual"):
                yield self.check_ack_mode(version, mode)

    @defer.inlineCallbacks
    def test_transactions(self):
        self.start()
        c = yield self.client()
        yield c.do("subscribe", "/topic/tx", id="t", receipt="s")
        yield c.next("receipt")
        yield c.do("begin", "tx1")
        yield c.do("send", "/topic/tx", '"one"', transaction="tx1")
        yield c.do("abort", "tx1", receipt="ab")
        yield c.next("receipt")
        yield c.do("begin", "tx2")
        yield c.do("send", "/topic/tx", '"two"', transaction="tx2")
        self.assertEqual(self.node.pubsub.channel("tx").offset, 0)
        yield c.do("commit", "tx2", receipt="co")
        msg = yield c.next("message")
        self.assertEqual(json.loads(msg.body), "two")

    @defer.inlineCallbacks
    def test_malformed_frames(self):
        self.start()
        connect = encode(Frame("CONNECT", [("accept-version", "1.2")]))
        cases = [
            (b"hello there\n\n\0", "invalid command"),
            (encode(Frame("SEND", [("destination", "/topic/x")])), "expected CONNECT"),
            (connect + encode(Frame("SEND", [("destination", "/queue/x")], b"1")), "unknown destination"),
            (connect + b"SEND\ndestination:/topic/x\na:\\t\n\n\0", "escape"),
            (connect + b"SEND\ndestination:/topic/x\ncontent-length:2000000\n\n", "larger"),
            (connect + b"FROB\n\n\0", "unexpected command"),
            (connect + encode(Frame("SUBSCRIBE", [("destination", "/topic/x")])), "needs a id header"),
            (connect + encode(Frame("SEND", [("destination", "/topic/bad channel")], b"1")), "invalid channel"),
            (encode(Frame("CONNECT", [("accept-version", "2.0")])), "versions"),
            (b"\x00\xff\xfe" * 30, "invalid command"),
        ]
        for data, expected in cases:
            out = yield deferToThread(raw_exchange, self.port, data)
            frames = stomp_frames(out)
            self.assertEqual(frames[-1].command, "ERROR", (data, frames))
            self.assertIn(expected, frames[-1].get("message"))
        # the node still serves
        c = yield self.client()
        self.assertEqual(c.version, "1.2")

    @defer.inlineCallbacks
    def test_login(self):
        users = os.path.abspath(self.mktemp())
        with open(users, "w") as f:
            f.write("# test users\nalice:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode() + "\n")
        self.start(extra=f"users = {users}")
        c = yield self.client(username="alice", passcode="secret")
        self.assertEqual(c.version, "1.2")
        out = yield deferToThread(raw_exchange, self.port, encode(Frame("CONNECT", [
            ("accept-version", "1.2"), ("login", "alice"), ("passcode", "wrong")])))
        self.assertEqual(stomp_frames(out)[-1].get("message"), "login failed")
        # frames sent right behind CONNECT wait for the (threaded) login check
        # and then decode in the negotiated version (1.1: no \r escape)
        out = yield deferToThread(raw_exchange, self.port, b"".join([
            encode(Frame("CONNECT", [("accept-version", "1.1"), ("login", "alice"), ("passcode", "secret")])),
            encode(Frame("SEND", [("destination", "/app/calc.greet"), ("content-type", "application/json"),
                                  ("receipt", "a:b")], b'{"name": "x"}'), "1.1"),
            encode(Frame("DISCONNECT", [("receipt", "bye")]), "1.1")]))
        self.assertEqual([(f.command, f.get("receipt-id")) for f in stomp_frames(out)],
                         [("CONNECTED", None), ("RECEIPT", "a:b"), ("RECEIPT", "bye")])


class SessionTests(unittest.TestCase):
    """The transport-free session's bounds, driven directly."""

    def setUp(self):
        self.node = make_node(self, "", {"calc.py": APPS["calc.py"]})
        self.out, self.closed = [], []

    def session(self, **options):
        s = StompSession(self.node, "test", self.out.append, self.closed.append, peer="test",
                         options=SessionOptions(connect_timeout=0, **options))
        s.data_received(encode(Frame("CONNECT", [("accept-version", "1.2")])))
        s.data_received(encode(Frame("SUBSCRIBE", [("destination", "/topic/c"), ("id", "1")])))
        return s

    def test_slow_consumer_is_dropped(self):
        s = self.session(max_pending=1000)
        s.writer.pause()
        written = len(self.out)
        for i in range(20):
            self.node.pubsub.publish("c", "x" * 100)
        self.assertEqual(self.closed, ["slow consumer: more than 1000 bytes unsent"])
        self.assertEqual([f.command for f in stomp_frames(b"".join(self.out[written:]))], ["ERROR"])
        self.assertEqual(self.node.pubsub.presence("c")["count"], 0)

    def test_slow_consumer_told_before_what_was_not_sent(self):
        """On the listener, over a transport that buffers like Twisted's TCP
        one: the frames the socket has begun go whole, the rest is dropped,
        the ERROR comes next, and the connection closes once it is read."""
        node = make_node(self, INI.format(heartbeat="0", extra="max_pending = 4KiB"))
        iface = node.interfaces["stomp"]
        t = SocketTransport(room=10 ** 9)
        p = t.protocol = iface.factory().buildProtocol(None)
        p.makeConnection(t)
        self.addCleanup(t.abortConnection)
        p.dataReceived(encode(Frame("CONNECT", [("accept-version", "1.2")]))
                       + encode(Frame("SUBSCRIBE", [("destination", "/topic/c"), ("id", "1")])))
        for i in range(3):
            node.pubsub.publish("c", "x" * 1000)
        iface.turn.run()                # the turn's frames go in one write
        t.room = len(t.sent) + 1500     # the socket takes CONNECTED, one message and a half, then no more
        t.flush()
        for i in range(200):
            node.pubsub.publish("c", "x" * 1000)
        iface.turn.run()
        self.assertTrue(t.disconnecting)
        self.assertIn(t, iface._aborts)            # aborted after close_timeout unless it reads
        t.room = 10 ** 9                # it reads again
        t.flush()
        got = stomp_frames(t.sent)
        self.assertEqual([(f.command, f.get("msgd-offset")) for f in got],
                         [("CONNECTED", None), ("MESSAGE", "1"), ("MESSAGE", "2"), ("MESSAGE", "3"),
                          ("ERROR", None)])
        self.assertTrue(got[-1].get("message").startswith("slow consumer"))
        self.assertTrue(t.disconnected)
        self.assertNotIn(t, iface._aborts)

    def test_paused_output_is_queued_then_flushed(self):
        s = self.session(max_pending=100000)
        s.writer.pause()
        written = len(self.out)
        for i in range(5):
            self.node.pubsub.publish("c", i)
        self.assertEqual(len(self.out), written)
        s.writer.resume()
        got = stomp_frames(b"".join(self.out[written:]))
        self.assertEqual([json.loads(f.body) for f in got], [0, 1, 2, 3, 4])

    def test_pattern_resume_replays_every_matched_channel_or_says_not_recovered(self):
        node = make_node(self, "[pubsub]\nhistory_size = 3\n")
        out = []

        def subscribe(**headers):
            del out[:]
            s = StompSession(node, "test", out.append, lambda reason: None, options=SessionOptions(connect_timeout=0))
            self.addCleanup(s.connection_lost)
            s.data_received(encode(Frame("CONNECT", [("accept-version", "1.2")])))
            s.data_received(encode(Frame("SUBSCRIBE", [("destination", "/topic/a.*"), ("id", "1"),
                                                       ("receipt", "r")] + list(headers.items()))))
            got = stomp_frames(b"".join(out))[1:]
            return [(f.get("msgd-channel"), f.get("msgd-offset")) for f in got[:-1]], got[-1]

        node.pubsub.publish("a.x", 1)
        _, receipt = subscribe()
        epoch = node.pubsub.channels["a.x"].epoch
        self.assertEqual((receipt.command, receipt.get("msgd-recovered"), receipt.get("msgd-positions")),
                         ("RECEIPT", "true", f"{epoch}:1:a.x"))
        held = receipt.get("msgd-positions")
        node.pubsub.publish("a.x", 2)           # while away; and a channel begins
        node.pubsub.publish("a.y", 1)
        replayed, receipt = subscribe(**{"msgd-since": held})
        self.assertEqual(replayed, [("a.x", "2"), ("a.y", "1")])
        self.assertEqual(receipt.get("msgd-recovered"), "true")
        for i in range(3):                      # history 3: a.x 2 is gone
            node.pubsub.publish("a.x", i)
        replayed, receipt = subscribe(**{"msgd-since": held})
        self.assertEqual(replayed, [("a.y", "1")])
        self.assertEqual(receipt.get("msgd-recovered"), "false")
        self.assertEqual(receipt.get("msgd-positions"), f"{epoch}:5:a.x {node.pubsub.channels['a.y'].epoch}:1:a.y")
        _, receipt = subscribe(**{"msgd-since": "5"})
        self.assertEqual(receipt.command, "ERROR")          # a pattern's msgd-since is a list of positions

    def test_channel_resume_says_whether_it_recovered(self):
        self.node.pubsub.publish("c", 1)
        s = StompSession(self.node, "test", self.out.append, self.closed.append,
                         options=SessionOptions(connect_timeout=0))
        self.addCleanup(s.connection_lost)
        s.data_received(encode(Frame("CONNECT", [("accept-version", "1.2")])))
        s.data_received(encode(Frame("SUBSCRIBE", [("destination", "/topic/c"), ("id", "1"), ("receipt", "r"),
                                                   ("msgd-since", "0"), ("msgd-epoch", "lost")])))
        receipt = stomp_frames(b"".join(self.out))[-1]
        self.assertEqual((receipt.command, receipt.get("msgd-recovered"), receipt.get("msgd-offset")),
                         ("RECEIPT", "false", "1"))

    def test_pattern_subscription_names_the_channel(self):
        s = self.session()
        s.data_received(encode(Frame("SUBSCRIBE", [("destination", "/topic/news.*"), ("id", "2")])))
        written = len(self.out)
        self.node.pubsub.publish("news.sport", 1)
        f = stomp_frames(b"".join(self.out[written:]))[0]
        self.assertEqual((f.get("destination"), f.get("subscription")), ("/topic/news.sport", "2"))

    def test_a_gap_is_a_message_saying_so(self):
        from msgd.core.pubsub import Event
        self.session()
        written = len(self.out)
        ch = self.node.pubsub.channels["c"]
        self.node.pubsub.deliver(Event("c", 7, "E2", None, 0.0, gap=True), ch)
        f = stomp_frames(b"".join(self.out[written:]))[0]
        self.assertEqual((f.command, f.get("msgd-gap"), f.get("msgd-offset"), f.get("msgd-epoch"), f.body),
                         ("MESSAGE", "true", "7", "E2", b""))

    def test_connection_lost_unsubscribes(self):
        s = self.session()
        self.assertEqual(self.node.pubsub.presence("c")["count"], 1)
        s.connection_lost()
        self.assertEqual(self.node.pubsub.presence("c")["count"], 0)


class ClientTests(unittest.TestCase):
    """The broker client (used by the consumer and the adapter) on a fake
    transport and clock."""

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from msgd.stomp.client import StompClient
        self.clock = Clock()
        self.client = StompClient(self.clock, login="u", passcode="p", vhost="/v", heartbeat=1.0)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def sent(self) -> list[Frame]:
        data = self.transport.value()
        self.transport.clear()
        return stomp_frames(data)

    def connected(self, heartbeat="1000,1000"):
        connect = self.sent()[0]
        self.assertEqual((connect.command, connect.get("host"), connect.get("login")), ("CONNECT", "/v", "u"))
        self.client.dataReceived(encode(Frame("CONNECTED", [("version", "1.2"), ("heart-beat", heartbeat)])))
        self.assertTrue(self.client.handshake.called)

    def test_send_fires_on_receipt_only(self):
        self.connected()
        got = []
        self.client.send("/queue/q", b"\0body", [("x", "1")]).addCallback(got.append)
        frame = self.sent()[0]
        self.assertEqual((frame.command, frame.body, frame.get("x")), ("SEND", b"\0body", "1"))
        self.assertEqual(got, [])
        self.client.dataReceived(encode(Frame("RECEIPT", [("receipt-id", frame.get("receipt"))])))
        self.assertEqual(len(got), 1)

    def test_error_fails_pending_receipts_and_stops_sending(self):
        from msgd.stomp.client import BrokerError, NotConnected
        self.connected()
        d = self.client.send("/bad", b"x")
        self.client.dataReceived(encode(Frame("ERROR", [("message", "no such destination")])))
        self.assertIsInstance(self.failureResultOf(d).value, BrokerError)
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.failureResultOf(self.client.send("/q", b"y")).value, NotConnected)

    def test_lost_connection_fails_receipts(self):
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        self.connected()
        d = self.client.send("/queue/q", b"x")
        self.client.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(self.successResultOf(self.client.lost), None)

    def test_heartbeats_and_a_silent_broker(self):
        self.connected()
        self.clock.advance(1.0)
        self.assertEqual(self.transport.value(), b"\n")        # nothing else was written: a heart-beat
        self.client.dataReceived(b"\n")
        self.clock.advance(1.0)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(2.0)                                 # silent for more than twice the interval
        self.assertTrue(self.transport.disconnected)

    def test_ack_and_nack_name_the_message(self):
        self.connected("0,0")
        messages = []
        self.client.subscribe("/queue/q", messages.append, headers=[("prefetch-count", "2")])
        sub = self.sent()[0]
        self.assertEqual((sub.get("ack"), sub.get("prefetch-count")), ("client-individual", "2"))
        self.client.dataReceived(encode(Frame("MESSAGE", [("subscription", sub.get("id")), ("ack", "A1"),
                                                          ("message-id", "m1")], b"hi")))
        self.assertEqual(messages[0].body, b"hi")
        self.assertTrue(self.client.ack(messages[0]))
        self.assertTrue(self.client.nack(messages[0], [("requeue", "false")]))
        ack, nack = self.sent()
        self.assertEqual((ack.command, ack.get("id"), nack.command, nack.get("requeue")),
                         ("ACK", "A1", "NACK", "false"))


class WebSocketBoundsTests(unittest.TestCase):
    def test_sessions_built_by_the_websocket_layer_take_its_bounds(self):
        node = make_node(self, """
            [interface:web]
            type = http
            endpoint = tcp:0:interface=127.0.0.1
            ws_max_message = 64KiB
            ws_max_pending = 200KiB
            request_timeout = 7s
            """)
        t = SocketTransport(room=10 ** 9)
        self.addCleanup(t.abortConnection)
        s = open_websocket(self, node.interfaces["web"], t, subprotocol=b"v12.stomp").stomp
        self.assertEqual((s.options.limits.max_frame, s.options.max_pending, s.options.request_timeout),
                         (65536, 204800, 7.0))
        self.assertEqual((s.hint, s.options.authenticate("claimed", "x")), ("1.2", None))   # the handshake's
