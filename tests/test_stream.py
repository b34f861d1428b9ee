"""JSON-RPC over a unix socket, spoken with plain ``socket`` code (in a
thread, so the reactor keeps serving)."""

import json
import os
import shutil
import socket
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.helpers import SocketTransport, make_node

APPS = {"m.py": '''
from msgd import api

def add(a: int, b: int) -> int:
    return a + b

def announce(channel: str, text: str):
    return api.publish(channel, {"text": text})
'''}


class LineClient:
    """A blocking newline-delimited JSON client; every method runs in a
    thread (see :meth:`run`)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def send(self, obj):
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def lines(self, n: int):
        return [self.line() for _ in range(n)]

    def exchange(self, obj, n: int = 1):
        self.send(obj)
        return self.lines(n)

    def close(self):
        self.sock.close()


def call(method, params, id=1):
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


class Base(unittest.TestCase):
    """Connects LineClients to ``self.path`` (closed at cleanup)."""

    @defer.inlineCallbacks
    def client(self):
        c = yield deferToThread(LineClient, self.path)
        self.addCleanup(c.close)
        return c


class StreamTests(Base):
    def setUp(self):
        # unix socket paths are limited to ~100 bytes: not under _trial_temp
        self.dir = tempfile.mkdtemp(prefix="msgd-stream-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "sub", "msgd.sock")
        self.node = make_node(self, f"""
            [interface:local]
            type = jsonrpc-stream
            endpoint = unix:{self.path}
            max_line = 4KiB
            max_batch = 3
            max_pending = 16KiB
            """, APPS)
        return self.node.interfaces["local"].ready


    @defer.inlineCallbacks
    def test_call_and_errors(self):
        c = yield self.client()
        out = yield deferToThread(c.exchange, call("m.add", [2, 3]))
        self.assertEqual(out, [{"jsonrpc": "2.0", "result": 5, "id": 1}])
        out = yield deferToThread(c.exchange, call("m.add", {"a": 1, "b": "x"}, id="s"))
        self.assertEqual((out[0]["error"]["code"], out[0]["id"]), (-32602, "s"))
        out = yield deferToThread(c.exchange, call("nope.nope", []))
        self.assertEqual(out[0]["error"]["code"], -32601)

    def test_health_names_the_socket(self):
        self.assertEqual(self.node.health()["interfaces"]["local"]["listening"], self.path)

    @defer.inlineCallbacks
    def test_batch(self):
        c = yield self.client()
        out = yield deferToThread(c.exchange, [call("m.add", [1, 1], 1), {"jsonrpc": "2.0", "method": "m.add",
                                                                           "params": [0, 0]},
                                               call("m.add", [2, 2], 2)])
        self.assertEqual(sorted((a["id"], a["result"]) for a in out[0]), [(1, 2), (2, 4)])
        out = yield deferToThread(c.exchange, [call("m.add", [1, 1], i) for i in range(4)])
        self.assertEqual(out[0]["error"]["code"], -32004)

    @defer.inlineCallbacks
    def test_malformed_lines_keep_the_connection(self):
        c = yield self.client()
        yield deferToThread(c.send_raw, b"{not json\r\n\n   \n[]\n")
        out = yield deferToThread(c.lines, 2)
        self.assertEqual([o["error"]["code"] for o in out], [-32700, -32600])
        self.assertEqual([o["id"] for o in out], [None, None])
        out = yield deferToThread(c.exchange, call("m.add", [1, 2]))
        self.assertEqual(out[0]["result"], 3)

    @defer.inlineCallbacks
    def test_line_too_long_closes(self):
        c = yield self.client()
        yield deferToThread(c.send_raw, b'{"x":"' + b"a" * 5000)
        out = yield deferToThread(c.line)
        self.assertEqual(out["error"]["code"], -32004)
        self.assertIsNone((yield deferToThread(c.line)))
        self.assertEqual(self.node.metrics.value("msgd_stream_dropped_total",
                                                 {"interface": "local", "reason": "line_too_long"}), 1)

    @defer.inlineCallbacks
    def test_subscribe_and_events(self):
        a = yield self.client()
        b = yield self.client()
        out = yield deferToThread(a.exchange, call("rpc.subscribe", {"channel": "room"}))
        info = out[0]["result"]
        self.assertEqual((info["channel"], info["offset"], info["recovered"]), ("room", 0, True))
        # b publishes through an app function and through rpc.publish; a gets both events
        out = yield deferToThread(b.exchange, call("m.announce", ["room", "hi"]))
        self.assertEqual(out[0]["result"], 1)
        out = yield deferToThread(b.exchange, call("rpc.publish", {"channel": "room", "data": 7}))
        self.assertEqual(out[0]["result"], {"channel": "room", "offset": 2})
        events = yield deferToThread(a.lines, 2)
        self.assertEqual([e["method"] for e in events], ["rpc.event"] * 2)
        self.assertEqual([(e["params"]["offset"], e["params"]["data"]) for e in events],
                         [(1, {"text": "hi"}), (2, 7)])
        epoch = events[0]["params"]["epoch"]
        # a new connection resumes after offset 1: only event 2 is replayed, before the answer
        c = yield self.client()
        out = yield deferToThread(c.exchange, call("rpc.subscribe", {"channel": "room", "since": 1,
                                                                     "epoch": epoch}), 2)
        self.assertEqual(out[0]["params"]["offset"], 2)
        self.assertTrue(out[1]["result"]["recovered"])
        presence = yield deferToThread(b.exchange, call("rpc.presence", {"channel": "room"}))
        self.assertEqual(presence[0]["result"]["count"], 2)
        out = yield deferToThread(a.exchange, call("rpc.unsubscribe", {"channel": "room"}))
        self.assertTrue(out[0]["result"]["unsubscribed"])

    @defer.inlineCallbacks
    def test_pattern_resume(self):
        a = yield self.client()
        yield deferToThread(a.exchange, call("rpc.publish", {"channel": "p.x", "data": 1}))
        info = (yield deferToThread(a.exchange, call("rpc.subscribe", {"channel": "p.*"})))[0]["result"]
        yield deferToThread(a.close)
        b = yield self.client()
        yield deferToThread(b.exchange, call("rpc.publish", {"channel": "p.x", "data": 2}))
        yield deferToThread(b.exchange, call("rpc.publish", {"channel": "p.y", "data": 1}))
        c = yield self.client()
        out = yield deferToThread(c.exchange, call("rpc.subscribe", {"channel": "p.*", "since": info["offset"],
                                                                     "epoch": info["epoch"]}), 3)
        self.assertEqual([(m["params"]["channel"], m["params"]["offset"]) for m in out[:2]], [("p.x", 2), ("p.y", 1)])
        self.assertTrue(out[2]["result"]["recovered"])
        out = yield deferToThread(c.exchange, call("rpc.subscribe", {"channel": "p.*", "since": {"p.x": 1},
                                                                     "epoch": {"p.x": "lost"}}), 2)
        self.assertFalse(out[1]["result"]["recovered"])

    @defer.inlineCallbacks
    def test_closed_connection_ends_subscriptions(self):
        a = yield self.client()
        yield deferToThread(a.exchange, call("rpc.subscribe", {"channel": "gone"}))
        self.assertEqual(len(self.node.pubsub.channels["gone"].subscribers), 1)
        yield deferToThread(a.close)
        iface = self.node.interfaces["local"]
        for _ in range(200):   # wait (bounded) for the reactor to see the close
            if not iface.connections:
                break
            yield deferToThread(lambda: None)
        self.assertEqual(len(self.node.pubsub.channels["gone"].subscribers), 0)

    def test_slow_consumer_dropped(self):
        """A client whose socket buffer stays full gets its events queued up
        to max_pending, then a last rpc.closing line, then is disconnected;
        other subscribers still get everything."""
        from twisted.internet.testing import StringTransport
        iface = self.node.interfaces["local"]
        slow, fast = iface.factory().buildProtocol(None), iface.factory().buildProtocol(None)
        slow.makeConnection(StringTransport())
        fast.makeConnection(StringTransport())
        slow.connection.session.subscribe("busy")
        fast.connection.session.subscribe("busy")
        slow.pauseProducing()
        self.assertEqual(slow.transport.producerState, "paused")   # its requests are not read either
        for i in range(100):
            self.node.pubsub.publish("busy", "x" * 1000)
        iface.turn.run()
        self.assertTrue(slow.transport.disconnecting)
        last = slow.transport.value().splitlines()[-1]
        self.assertEqual(json.loads(last)["method"], "rpc.closing")
        self.assertEqual(len(fast.transport.value().splitlines()), 100)
        self.assertEqual(self.node.metrics.value("msgd_stream_dropped_total",
                                                 {"interface": "local", "reason": "slow_consumer"}), 1)
        for p in (slow, fast):
            p.connectionLost(None)

    def test_slow_consumer_told_before_what_was_not_sent(self):
        """On a transport that buffers like Twisted's TCP one: the lines the
        socket has begun go whole, the rest is dropped, rpc.closing comes
        next, and the connection closes once that is read (aborted after
        close_timeout otherwise)."""
        iface = self.node.interfaces["local"]
        t = SocketTransport(room=10 ** 9)
        p = t.protocol = iface.factory().buildProtocol(None)
        p.makeConnection(t)
        self.addCleanup(t.abortConnection)
        p.connection.session.subscribe("busy")
        for i in range(3):
            self.node.pubsub.publish("busy", "x" * 1000)
        iface.turn.run()        # the turn's three lines go in one write
        t.room = 1500           # the socket takes one line and a half, then no more
        t.flush()
        for i in range(200):
            self.node.pubsub.publish("busy", "x" * 1000)
        iface.turn.run()
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.node.pubsub.presence("busy")["count"], 0)
        self.assertIn(t, iface._aborts)            # aborted after close_timeout unless it reads
        t.room = 10 ** 9        # it reads again
        t.flush()
        lines = [json.loads(line) for line in t.sent.splitlines()]
        self.assertEqual([m["params"]["offset"] for m in lines[:-1]], [1, 2, 3])
        self.assertEqual(lines[-1]["method"], "rpc.closing")
        self.assertTrue(lines[-1]["params"]["reason"].startswith("slow consumer"))
        self.assertTrue(t.disconnected)
        self.assertNotIn(t, iface._aborts)


class LoginTests(Base):
    """The interface's security keys on a stream: rpc.login with a password
    or a token, anonymous callers refused until then, login throttling,
    connection limits and per-principal rules."""

    def setUp(self):
        from msgd.security.credentials import set_password
        self.dir = tempfile.mkdtemp(prefix="msgd-stream-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "msgd.sock")
        users = os.path.join(self.dir, "users")
        set_password(users, "alice", "wonder", roles=["ops"], rounds=4)
        set_password(users, "bob", "builder", rounds=4)
        self.node = make_node(self, f"""
            [interface:local]
            type = jsonrpc-stream
            endpoint = unix:{self.path}
            auth = password
            auth_file = {users}
            anonymous = no
            token_secret = stream-login-secret
            login_attempts = 2
            max_connections = 2

            [access:ops]
            principals = @ops
            call = m.* who.*
            subscribe = *

            [access:everyone]
            principals = *
            call = who.*
            """, dict(APPS, **{"who.py": "from msgd import api\n\ndef ami():\n"
                                         "    p = api.request().principal\n    return p and p.name\n"}))
        return self.node.interfaces["local"].ready


    def ask(self, c, method, params, id=1):
        return deferToThread(c.exchange, call(method, params, id))

    @defer.inlineCallbacks
    def test_password_login_then_calls_as_that_principal(self):
        c = yield self.client()
        out = yield self.ask(c, "who.ami", [])
        self.assertEqual(out[0]["error"]["code"], -32001)          # not logged in yet
        out = yield self.ask(c, "rpc.subscribe", {"channel": "room"})
        self.assertEqual(out[0]["error"]["code"], -32001)
        out = yield self.ask(c, "rpc.login", {"user": "alice", "password": "wonder"})
        self.assertEqual(out[0]["result"], {"name": "alice", "roles": ["ops"], "via": "password"})
        self.assertEqual((yield self.ask(c, "who.ami", []))[0]["result"], "alice")
        self.assertEqual((yield self.ask(c, "m.add", [2, 3]))[0]["result"], 5)

    @defer.inlineCallbacks
    def test_rules_follow_the_principal(self):
        c = yield self.client()
        yield self.ask(c, "rpc.login", ["bob", "builder"])
        self.assertEqual((yield self.ask(c, "who.ami", []))[0]["result"], "bob")
        self.assertEqual((yield self.ask(c, "m.add", [2, 3]))[0]["error"]["code"], -32001)   # no ops role

    @defer.inlineCallbacks
    def test_token_login(self):
        token = self.node.interfaces["local"].guard.issue_token("carol", roles=["ops"])["token"]
        c = yield self.client()
        out = yield self.ask(c, "rpc.login", {"token": token})
        self.assertEqual(out[0]["result"], {"name": "carol", "roles": ["ops"], "via": "token"})
        out = yield self.ask(c, "rpc.login", {"token": token[:-2] + "xx"})
        self.assertEqual(out[0]["error"]["code"], -32001)
        self.assertEqual((yield self.ask(c, "who.ami", []))[0]["result"], "carol")   # the first login holds

    @defer.inlineCallbacks
    def test_wrong_passwords_are_throttled(self):
        c = yield self.client()
        for _ in range(2):
            out = yield self.ask(c, "rpc.login", {"user": "alice", "password": "nope"})
            self.assertEqual(out[0]["error"]["code"], -32001)
        out = yield self.ask(c, "rpc.login", {"user": "alice", "password": "wonder"})
        self.assertEqual(out[0]["error"]["code"], -32005)          # even the right one, for login_window
        out = yield self.ask(c, "rpc.login", {"user": "alice"})
        self.assertEqual(out[0]["error"]["code"], -32602)

    @defer.inlineCallbacks
    def test_connection_limit(self):
        yield self.client()
        yield self.client()
        third = yield self.client()
        out = yield deferToThread(third.lines, 2)
        self.assertEqual(out[0]["method"], "rpc.closing")
        self.assertIn("too many connections", out[0]["params"]["reason"])
        self.assertIsNone(out[1])                                   # and closed
