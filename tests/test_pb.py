"""The PB interface with a plain Python PB client (pb.PBClientFactory().login)."""

import json
import os

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.spread import pb
from twisted.trial import unittest

from msgd.config import ConfigError, parse_text
from msgd.core import errors
from msgd.interfaces.pb import PBError, rebuild
from tests.helpers import make_node

INI = """
[node]
name = pb-test
request_timeout = 5s

[interface:pb]
type = pb
endpoint = tcp:0:interface=127.0.0.1
users = alice:secret bob:pw
"""

APPS = {
    "m.py": '''
from msgd import api
handled = []

def add(a: int, b: int) -> int:
    return a + b

def who():
    return api.request().principal

def whoname():
    p = api.request().principal
    return getattr(p, "name", p)

def fail():
    raise api.AppError("nope", code=-32011, data={"why": "test"})

async def slow(seconds: float):
    await api.sleep(seconds)
    return "done"

def total(values: list[int]) -> int:
    return sum(values)

def take(item):
    handled.append(item)
    return len(handled)

def count():
    return list(handled)
''',
}


class PBTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.node = make_node(self, INI, APPS)
        yield self.node.ready()
        self.port = self.node.interfaces["pb"].port.getHost().port
        self.factories = []

    def tearDown(self):
        for f in self.factories:
            f.disconnect()

    @defer.inlineCallbacks
    def login(self, user="alice", password="secret"):
        factory = pb.PBClientFactory()
        self.factories.append(factory)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        perspective = yield factory.login(UsernamePassword(user.encode(), password.encode()))
        return perspective

    @defer.inlineCallbacks
    def remote_error(self, perspective, *args):
        """Call and return (the failure's JSON value, the rebuilt error)."""
        d = perspective.callRemote(*args)
        d.addCallbacks(lambda r: self.fail(f"expected an error, got {r!r}"), lambda f: [f])
        [failure] = yield d
        self.assertTrue(failure.check(PBError), failure)
        return json.loads(failure.value), rebuild(failure)

    @defer.inlineCallbacks
    def test_login_and_call(self):
        p = yield self.login()
        self.assertEqual((yield p.callRemote("call", "m.add", [2, 3], {})), 5)
        self.assertEqual((yield p.callRemote("call", "m.add", [], {"a": 1, "b": 1}, 2.0)), 2)
        self.assertEqual((yield p.callRemote("call", "m.who")), "alice")

    @defer.inlineCallbacks
    def test_tuple_for_a_list_parameter(self):
        p = yield self.login()
        self.assertEqual((yield p.callRemote("call", "m.total", [(1, 2, 3)], {})), 6)
        self.assertEqual((yield p.callRemote("call", "m.total", (), {"values": (4,)})), 4)

    @defer.inlineCallbacks
    def test_bad_password_refused(self):
        for user, password in (("alice", "wrong"), ("mallory", "secret")):
            d = self.login(user, password)
            d.addCallbacks(lambda r: self.fail("login accepted"), lambda f: [f])
            [failure] = yield d
            self.assertIsInstance(rebuild(failure), errors.Unauthorized)

    @defer.inlineCallbacks
    def test_login_attempts_throttled(self):
        """Five wrong passwords for a name (login_attempts), then even the
        right one is refused for the window, as overloaded."""
        for _ in range(5):
            [failure] = yield self.login("bob", "wrong").addCallbacks(lambda r: self.fail("accepted"), lambda f: [f])
            self.assertIsInstance(rebuild(failure), errors.Unauthorized)
        [failure] = yield self.login("bob", "pw").addCallbacks(lambda r: self.fail("accepted"), lambda f: [f])
        self.assertIsInstance(rebuild(failure), errors.Overloaded)
        p = yield self.login()      # another name is not affected
        self.assertIsNotNone(p)

    @defer.inlineCallbacks
    def test_errors_are_the_taxonomy(self):
        p = yield self.login()
        value, e = yield self.remote_error(p, "call", "m.nothing", [], {})
        self.assertEqual((value["code"], value["name"]), (-32601, "not_found"))
        self.assertIsInstance(e, errors.NotFound)
        value, e = yield self.remote_error(p, "call", "m.add", ["x", 1], {})
        self.assertIsInstance(e, errors.InvalidParams)
        value, e = yield self.remote_error(p, "call", "m.fail", [], {})
        self.assertEqual(value, {"code": -32011, "name": "application_error", "message": "nope",
                                 "data": {"why": "test"}})
        self.assertIsInstance(e, errors.ApplicationError)
        self.assertEqual((e.code, e.data), (-32011, {"why": "test"}))

    @defer.inlineCallbacks
    def test_deadline_enforced_by_callee(self):
        p = yield self.login()
        value, e = yield self.remote_error(p, "call", "m.slow", [30], {}, 0.05)
        self.assertIsInstance(e, errors.Timeout)
        self.assertEqual((yield p.callRemote("call", "m.slow", [0], {}, 5)), "done")
        value, e = yield self.remote_error(p, "call", "m.add", [1, 2], {}, -1)
        self.assertIsInstance(e, errors.InvalidRequest)

    @defer.inlineCallbacks
    def test_publish(self):
        events = []

        class Sub:
            principal = None

            def deliver(self, ev):
                events.append((ev.channel, ev.offset, ev.data))
        yield self.node.pubsub.subscribe("room", Sub())
        p = yield self.login()
        self.assertEqual((yield p.callRemote("publish", "room", {"x": 1})), 1)
        self.assertEqual((yield p.callRemote("publish", "room", "two")), 2)
        self.assertEqual(events, [("room", 1, {"x": 1}), ("room", 2, "two")])
        value, e = yield self.remote_error(p, "publish", "bad channel*", 1)
        self.assertIsInstance(e, errors.InvalidParams)

    @defer.inlineCallbacks
    def test_send_drops_duplicates(self):
        p = yield self.login("bob", "pw")
        first = yield p.callRemote("send", "m.take", ["a"], {}, "msg-1", None)
        self.assertEqual(first, {"message_id": "msg-1", "duplicate": False})
        again = yield p.callRemote("send", "m.take", ["a"], {}, "msg-1", None)
        self.assertTrue(again["duplicate"])
        yield p.callRemote("send", "m.take", ["b"], {}, "msg-2", None)
        self.assertEqual((yield p.callRemote("call", "m.count")), ["a", "b"])

    @defer.inlineCallbacks
    def test_send_concurrent_copies_handled_once(self):
        p = yield self.login()
        results = yield defer.gatherResults([p.callRemote("send", "m.take", ["c"], {}, "same", None)
                                             for _ in range(5)])
        self.assertEqual(sorted(r["duplicate"] for r in results), [False, True, True, True, True])
        self.assertEqual((yield p.callRemote("call", "m.count")), ["c"])

    @defer.inlineCallbacks
    def test_send_failures(self):
        p = yield self.login()
        value, e = yield self.remote_error(p, "send", "m.take", ["x"], {}, "old", 1.0)   # expired in 1970
        self.assertIsInstance(e, errors.Timeout)
        value, e = yield self.remote_error(p, "send", "m.fail", [], {}, "f-1", None)
        self.assertIsInstance(e, errors.ApplicationError)
        value, e = yield self.remote_error(p, "send", "m.take", ["x"], {}, "", None)
        self.assertIsInstance(e, errors.InvalidRequest)
        # a failed handler is not remembered: the retry runs it again
        value, e = yield self.remote_error(p, "send", "m.fail", [], {}, "f-1", None)
        self.assertIsInstance(e, errors.ApplicationError)
        self.assertEqual((yield p.callRemote("call", "m.count")), [])

    @defer.inlineCallbacks
    def test_health_lists_connections(self):
        yield self.login()
        self.assertEqual(self.node.health()["interfaces"]["pb"]["connections"], 1)


class PBConfigTests(unittest.TestCase):

    def test_users_needed(self):
        with self.assertRaises(ConfigError) as e:
            parse_text("[interface:p]\ntype = pb\nendpoint = tcp:0\n")
        self.assertIn("users", str(e.exception))

    def test_bad_user_word(self):
        with self.assertRaises(ConfigError) as e:
            parse_text("[interface:p]\ntype = pb\nendpoint = tcp:0\nusers = alice\n")
        self.assertIn("NAME:PASSWORD", str(e.exception))

    def test_users_file(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("# logins\ncarol:pw3\n")
        node = make_node(self, f"[interface:p]\ntype = pb\nendpoint = tcp:0\nusers_file = {path}\n", start=False)
        self.assertEqual(node.interfaces["p"].checkers()[0].users, {b"carol": b"pw3"})


class GuardLoginTests(unittest.TestCase):
    """``auth = password``: bcrypt logins (and tokens) through the guard, after
    an anonymous PB login; connection limits apply."""

    @defer.inlineCallbacks
    def setUp(self):
        from msgd.security.credentials import set_password
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        passwords = os.path.join(base, "users")
        set_password(passwords, "carol", "s3cret", rounds=4)
        self.node = make_node(self, f"""
            [interface:pb]
            type = pb
            endpoint = tcp:0:interface=127.0.0.1
            auth = password
            auth_file = {passwords}
            token_secret = a-secret-of-enough-length
            max_connections_per_address = 2
            """, APPS)
        yield self.node.interfaces["pb"].ready
        self.port = self.node.interfaces["pb"].port.getHost().port
        self.factories = []
        self.addCleanup(lambda: [f.disconnect() for f in self.factories])

    @defer.inlineCallbacks
    def door(self):
        from twisted.cred.credentials import Anonymous
        factory = pb.PBClientFactory()
        self.factories.append(factory)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        door = yield factory.login(Anonymous())
        return door

    @defer.inlineCallbacks
    def test_bcrypt_login_then_call(self):
        door = yield self.door()
        me = yield door.callRemote("login", "carol", "s3cret")
        self.assertEqual((yield me.callRemote("call", "m.add", [2, 3])), 5)
        self.assertEqual((yield me.callRemote("call", "m.whoname")), "carol")

    @defer.inlineCallbacks
    def test_wrong_password_and_no_calls_at_the_door(self):
        door = yield self.door()
        e = yield door.callRemote("login", "carol", "wrong").addCallbacks(self.fail, rebuild)
        self.assertIsInstance(e, errors.Unauthorized)
        e = yield door.callRemote("call", "m.add", [1, 1]).addCallbacks(self.fail, rebuild)   # the door only logs in
        self.assertIsInstance(e, errors.Unauthorized)

    @defer.inlineCallbacks
    def test_token(self):
        token = self.node.interfaces["pb"].guard.issue_token("dave")["token"]
        door = yield self.door()
        me = yield door.callRemote("token", token)
        self.assertEqual((yield me.callRemote("call", "m.add", [1, 1])), 2)
        door2 = yield self.door()
        e = yield door2.callRemote("token", token[:-2] + "xx").addCallbacks(self.fail, rebuild)
        self.assertIsInstance(e, errors.Unauthorized)

    @defer.inlineCallbacks
    def test_connection_limit(self):
        yield self.door()
        yield self.door()
        factory = pb.PBClientFactory()
        self.factories.append(factory)
        broker = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        lost = defer.Deferred()
        broker.notifyOnDisconnect(lambda: lost.callback(None))
        yield lost.addTimeout(10, reactor)      # the third connection from this address is closed at once
        limited = [s for m in self.node.metrics.registry.collect() if m.name == "msgd_limited"
                   for s in m.samples if s.name == "msgd_limited_total" and s.labels["interface"] == "pb"]
        self.assertEqual(sum(s.value for s in limited), 1)


class WireNameTests(unittest.TestCase):
    def test_the_error_type_on_the_wire_is_unchanged(self):
        """PB sends the qualified name of the error class; clients compare it
        (docs/pb.rst), so it stays put wherever the class is defined."""
        from twisted.python import reflect
        from msgd.cluster import wire
        self.assertIs(wire.PBError, PBError)
        self.assertEqual(reflect.qual(PBError), "msgd.interfaces.pb.PBError")
        self.assertIs(reflect.namedAny("msgd.interfaces.pb.PBError"), PBError)
