"""Presence: the broker's join/leave notices (msgd.core.pubsub), the
cluster-wide store (msgd.cluster.presence) with a fake backend and
task.Clock, its Lua scripts against a real redis-server, and two node
processes sharing one Redis, one of them SIGKILLed."""

from __future__ import annotations

import json
import os
import signal

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.cluster import presence as pr
from msgd.config import parse_text
from msgd.core.pubsub import Broker, Session, presence_notice

from tests import servers
from tests.helpers import eventually
from tests.process import Client, NodeProcess, call, pubsub_connected, wait_for
from tests.test_sharding import ini


class Principal:
    def __init__(self, name):
        self.name = name


class Sub:
    def __init__(self, principal=None, notices=True):
        self.principal = Principal(principal) if principal else None
        self.got = []
        if not notices:
            self.notices = False

    def deliver(self, ev):
        self.got.append(json.loads(ev.notification()))


def methods(sub):
    return [(m["method"], m["params"].get("principal"), m["params"].get("count")) for m in sub.got]


class NoticeTests(unittest.TestCase):
    def setUp(self):
        self.broker = Broker(task.Clock(), gc_interval=0,
                             presence_events=[("chat.quiet", False), ("chat.*", True)])

    def test_config_of_presence_events(self):
        config = parse_text("[channel:chat.quiet]\nhistory_size = 5\n\n[channel:chat.*]\npresence_events = yes\n")
        self.assertEqual([(p, c.presence_events) for p, c in config.channels],
                         [("chat.quiet", None), ("chat.*", True)])
        self.assertTrue(self.broker.announces("chat.lobby"))
        self.assertFalse(self.broker.announces("chat.quiet"))      # the first section that says decides
        self.assertFalse(self.broker.announces("news"))

    def test_joins_and_leaves_reach_the_channels_subscribers(self):
        ann, bob, anon = Sub("ann"), Sub("bob"), Sub()
        stomp, pattern = Sub("carl", notices=False), Sub("dora")
        self.broker.subscribe("chat.*", pattern)
        self.broker.subscribe("chat.lobby", ann)
        self.broker.subscribe("chat.lobby", stomp)
        self.broker.subscribe("chat.lobby", bob)
        self.broker.subscribe("chat.lobby", bob, since=0)          # already there: no second join
        self.broker.subscribe("chat.lobby", anon)
        self.broker.unsubscribe("chat.lobby", bob)
        self.assertEqual(methods(ann), [("rpc.join", "ann", 1), ("rpc.join", "carl", 1), ("rpc.join", "bob", 1),
                                        ("rpc.join", None, 1), ("rpc.leave", "bob", 1)])
        self.assertEqual(ann.got[0]["params"], {"channel": "chat.lobby", "principal": "ann", "count": 1})
        self.assertEqual(stomp.got, [])      # subscribers that take no notices
        self.assertEqual(pattern.got, [])    # pattern subscribers get events, not notices
        self.broker.publish("chat.lobby", "x")
        self.assertEqual(ann.got[-1]["method"], "rpc.event")

    def test_no_notices_without_presence_events(self):
        a, b = Sub("ann"), Sub("bob")
        self.broker.subscribe("chat.quiet", a)
        self.broker.subscribe("chat.quiet", b)
        self.broker.unsubscribe("chat.quiet", b)
        self.assertEqual(a.got, [])

    def test_notice_is_no_event(self):
        n = presence_notice("c", "leave", None, 3)
        self.assertIsNone(n.offset)
        self.assertEqual(json.loads(n.notification()), {"jsonrpc": "2.0", "method": "rpc.leave",
                                                        "params": {"channel": "c", "principal": None, "count": 3}})
        self.assertIs(n.notification(), n.notification())      # encoded once

    def test_local_and_memory_presence(self):
        for s in (Sub("ann"), Sub("ann"), Sub(), Sub("bob")):
            self.broker.subscribe("room", s)
        self.assertEqual(self.broker.local_presence("room"), {"ann": 2, None: 1, "bob": 1})
        self.assertEqual(self.successResultOf(self.broker.cluster_presence("room")),
                         {"channel": "room", "count": 4, "principals": ["ann", "bob"]})


class FakeBackend:
    """The presence store's view of the bridge; scripts are answered by the test."""

    def __init__(self, broker):
        self.connected = True
        self.calls = []
        self.announced = []
        broker.backend = self

    def presence_keys(self, name):
        return [f"p:{name}", f"p:{name}:exp"]

    def preload(self, *scripts):
        pass

    def available(self, name):
        return self.connected

    def run(self, name, script, keys, args):
        d = defer.Deferred()
        self.calls.append((name, "update" if script is pr.UPDATE else "query", args, d))
        return d

    def announce(self, name, action, principal, count):
        self.announced.append((name, action, principal, count))
        return defer.succeed(None)

    def follow(self, name):
        return None

    def unfollow(self, name):
        pass

    def answer(self, reply=()):
        """Answer every script call made so far."""
        calls, self.calls = self.calls, []
        for c in calls:
            c[3].callback(list(reply) if c[1] == "update" else reply)
        return [(c[0], c[1], c[2]) for c in calls]


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.broker = Broker(self.clock, gc_interval=0, presence_events=[("chat.*", True)])
        self.backend = FakeBackend(self.broker)
        self.store = pr.RedisPresence(self.broker, self.backend, self.clock, "n1", ttl=30.0)
        self.store.startService()
        self.node_id = self.store.id

    def test_changes_are_written_once_per_turn(self):
        subs = [Sub("ann"), Sub("ann"), Sub()]
        for s in subs:
            self.broker.subscribe("room", s)
        self.assertEqual(self.backend.calls, [])
        self.clock.advance(0)
        [(name, kind, args)] = self.backend.answer()
        self.assertEqual((name, kind), ("room", "update"))
        self.assertEqual(args, [self.node_id, '[[null,1],["ann",2]]', 30000])
        for s in subs:
            self.broker.unsubscribe("room", s)
        self.clock.advance(0)
        self.assertEqual(self.backend.answer(), [("room", "update", [self.node_id, "", 30000])])
        self.clock.advance(10)      # the refresh does not write a channel that is gone
        self.assertEqual(self.backend.calls, [])

    def test_refresh_every_third_of_the_ttl(self):
        self.broker.subscribe("a", Sub("ann"))
        self.broker.subscribe("b", Sub("bob"))
        self.clock.advance(0)
        self.backend.answer()
        self.clock.advance(9.9)
        self.assertEqual(self.backend.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(sorted(c[0] for c in self.backend.answer()), ["a", "b"])
        self.clock.advance(10)
        self.assertEqual(len(self.backend.answer()), 2)

    def test_a_write_that_failed_is_retried_by_the_refresh(self):
        self.broker.subscribe("a", Sub("ann"))
        self.clock.advance(0)
        self.backend.calls.pop()[3].errback(txredisapi.ConnectionError("lost"))
        self.backend.connected = False
        self.clock.advance(10)
        self.assertEqual(self.backend.calls, [])           # shard away: nothing sent
        self.backend.connected = True
        self.clock.advance(10)
        self.assertEqual([c[0] for c in self.backend.answer()], ["a"])

    def test_expired_entries_removed_by_a_write_are_announced_once(self):
        self.broker.subscribe("chat.x", Sub("ann"))
        self.broker.subscribe("news", Sub("ann"))
        self.clock.advance(0)
        self.backend.announced.clear()          # the joins
        gone = ['[[null,2],["zed",1]]']
        self.backend.answer(gone)
        self.assertEqual(sorted(self.backend.announced, key=repr),
                         [("chat.x", "leave", "zed", 1), ("chat.x", "leave", None, 2)])   # not for news

    def test_query_merges_this_node_with_the_others(self):
        self.broker.subscribe("room", Sub("ann"))
        self.broker.subscribe("room", Sub())
        d = self.store.query("room")
        [call] = [c for c in self.backend.calls if c[1] == "query"]
        call[3].callback([[self.node_id.encode(), b"n2:x", b"n3:y"], [b'[["stale",9]]', b'[[null,1],["bob",2]]', None]])
        self.assertEqual(self.successResultOf(d), {"channel": "room", "count": 5, "principals": ["ann", "bob"]})

    def test_query_without_the_shard_is_partial(self):
        self.broker.subscribe("room", Sub("ann"))
        self.backend.connected = False
        self.assertEqual(self.successResultOf(self.store.query("room")),
                         {"channel": "room", "count": 1, "principals": ["ann"], "partial": True})
        self.backend.connected = True
        d = self.store.query("room")
        [call] = [c for c in self.backend.calls if c[1] == "query"]
        call[3].errback(txredisapi.ConnectionError("lost"))
        self.assertTrue(self.successResultOf(d)["partial"])

    def test_rpc_presence_uses_the_store(self):
        self.broker.subscribe("room", Sub("ann"))
        d = Session(self.broker, Sub("carl")).rpc_presence(None, {"channel": "room"})
        self.assertNoResult(d)
        [call] = [c for c in self.backend.calls if c[1] == "query"]
        call[3].callback([["n2:x"], ['[["bob",1]]']])
        self.assertEqual(self.successResultOf(d)["principals"], ["ann", "bob"])

    def test_stop_says_leave_and_removes_entries_within_a_bound(self):
        self.broker.subscribe("chat.x", Sub("ann"))
        self.broker.subscribe("chat.x", Sub("ann"))
        self.broker.subscribe("news", Sub("bob"))
        self.clock.advance(0)
        self.backend.answer()
        self.backend.announced.clear()
        d = self.store.stopService()
        self.assertEqual(self.backend.announced, [("chat.x", "leave", "ann", 2)])
        self.assertEqual(sorted((c[0], c[2][1]) for c in self.backend.calls), [("chat.x", ""), ("news", "")])
        self.assertNoResult(d)
        self.clock.advance(self.store.stop_timeout)      # Redis never answers: stopping goes on
        self.successResultOf(d)
        self.clock.advance(60)
        self.assertEqual(len(self.backend.calls), 2)     # no refresh after stopping


class Shim:
    """What the presence store needs of a bridge, over one txredisapi
    connection to a real Redis."""

    def __init__(self, conn, broker):
        self.conn = conn
        self.broker = broker
        broker.backend = self

    def announce(self, name, action, principal, count):
        self.broker.notify(presence_notice(name, action, principal, count))     # this "node" only
        return defer.succeed(None)

    def presence_keys(self, name):
        return [f"t:{{{name}}}:presence", f"t:{{{name}}}:presence:exp"]

    def preload(self, *scripts):
        pass                # run() sends the text (EVAL)

    def available(self, name):
        return True

    def follow(self, name):
        return None

    def unfollow(self, name):
        pass

    def run(self, name, script, keys, args):
        return self.conn.execute_command("EVAL", script.text, len(keys), *keys, *args)


class RedisScriptTests(unittest.TestCase):
    """The Lua scripts against a real redis-server: two stores (two
    'nodes'), one of which stops refreshing as a dead node would."""

    @defer.inlineCallbacks
    def setUp(self):
        self.srv = servers.redis()
        self.addCleanup(self.srv.cleanup)
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.srv.port)
        self.stores = []
        for name in ("a", "b"):
            conn = yield connectProtocol(ep, txredisapi.RedisProtocol(convertNumbers=False))
            self.addCleanup(conn.transport.loseConnection)
            broker = Broker(reactor, gc_interval=0, presence_events=[("*", True)])
            Shim(conn, broker)
            store = pr.RedisPresence(broker, broker.backend, reactor, name, ttl=1.0)
            self.stores.append(store)
        self.conn = conn

    @defer.inlineCallbacks
    def test_cluster_wide_answer_and_a_dead_node_expiring(self):
        a, b = self.stores
        watcher = Sub("watcher")
        a.broker.subscribe("room", watcher)
        b.broker.subscribe("room", Sub("bob"))
        b.broker.subscribe("room", Sub())
        yield a._write("room")
        yield b._write("room")
        self.assertEqual((yield a.query("room")), {"channel": "room", "count": 3, "principals": ["bob", "watcher"]})
        self.assertEqual((yield b.query("room"))["count"], 3)
        ttl = yield self.conn.execute_command("PTTL", "t:{room}:presence")
        self.assertTrue(0 < ttl <= 1000, ttl)
        # a lives (refreshes every ttl/3), b is dead (writes no more): once b's entry expired, a's
        # refresh prunes it and says leave, once
        watcher.got.clear()
        a.startService()
        self.addCleanup(a.stopService)
        yield eventually(lambda: len(watcher.got) == 2, timeout=5)
        self.assertEqual(methods(watcher), [("rpc.leave", None, 1), ("rpc.leave", "bob", 1)])
        self.assertEqual((yield a.query("room")), {"channel": "room", "count": 1, "principals": ["watcher"]})
        self.assertEqual((yield self.conn.execute_command("HKEYS", "t:{room}:presence")), [a.id])
        yield a._write("room")
        self.assertEqual(len(watcher.got), 2)
        # the last one leaving removes the keys
        a.broker.unsubscribe("room", watcher)
        yield a._write("room")
        self.assertEqual((yield self.conn.execute_command("EXISTS", "t:{room}:presence", "t:{room}:presence:exp")), 0)


def presence_nodes(case: unittest.TestCase, base: str, redis, ttl: str = "1.5s") -> list[NodeProcess]:
    """Node processes a and b sharing ``redis`` (presence_ttl ``ttl``, presence
    events on room.*), started, connected to Redis, stopped when ``case`` ends."""
    nodes = []
    for name in "ab":
        n = NodeProcess(os.path.join(base, name), ini(name, [f"tcp:host=127.0.0.1:port={redis.port}"],
                        extra=f"presence_ttl = {ttl}\n\n[channel:room.*]\npresence_events = yes\n"))
        case.addCleanup(n.stop)
        nodes.append(n.start())
    pubsub_connected(*nodes, what="connected to Redis")
    return nodes


class TwoNodesTests(unittest.TestCase):
    """Two node processes on one Redis: rpc.presence answers for both from
    either, joins and leaves cross nodes, a SIGKILLed node's subscribers
    are gone (and said to have left) within presence_ttl, a SIGTERMed
    node's at once."""

    timeout = 90

    def test_presence_across_nodes_and_a_killed_node(self):
        self.base = os.path.abspath(self.mktemp())
        return deferToThread(self._scenario)

    def _scenario(self):
        redis = servers.redis()
        self.addCleanup(redis.cleanup)
        a, b = presence_nodes(self, self.base, redis)
        on_a = Client(a)
        on_a.call("rpc.subscribe", {"channel": "room.1"})
        on_b = [Client(b) for _ in range(3)]
        for c in on_b:
            c.call("rpc.subscribe", {"channel": "room.1"})
        self.addCleanup(on_a.close)

        def presence(node):
            return call(node.port, "rpc.presence", "room.1")["result"]
        wait_for(lambda: presence(a)["count"] == 4 and presence(b)["count"] == 4, what="4 subscribers seen")
        self.assertNotIn("partial", presence(a))
        # the client on A heard of its own join and of B's three
        joins = [on_a.event() for _ in range(4)]
        self.assertEqual([j["count"] for j in joins], [1, 1, 1, 1])
        self.assertTrue(all(j["channel"] == "room.1" for j in joins))
        # a clean leave on B reaches A at once
        on_b[0].close()
        self.assertEqual(on_a.event(), {"channel": "room.1", "principal": None, "count": 1})
        wait_for(lambda: presence(a)["count"] == 3, what="the leave counted")
        # B is killed: its two subscribers are gone within presence_ttl, and A's subscriber is told
        b.signal(signal.SIGKILL)
        b.wait(10)
        wait_for(lambda: presence(a)["count"] == 1, timeout=1.5 + 2.0, what="B's entry expired")
        leave = on_a.event()
        self.assertEqual(leave, {"channel": "room.1", "principal": None, "count": 2})

    def test_a_stopped_node_removes_its_entries_at_once(self):
        self.base = os.path.abspath(self.mktemp())
        return deferToThread(self._stopped)

    def _stopped(self):
        # SIGTERM: the node removes its entries before its Redis connections close (the bridge
        # waits for the presence store), so they are gone at once, not presence_ttl later
        redis = servers.redis()
        self.addCleanup(redis.cleanup)
        a, b = presence_nodes(self, self.base, redis, ttl="60s")
        on_a = Client(a)
        self.addCleanup(on_a.close)
        on_a.call("rpc.subscribe", {"channel": "room.1"})
        on_b = [Client(b) for _ in range(2)]
        on_b[0].call("rpc.subscribe", {"channel": "room.1"})
        on_b[1].call("rpc.subscribe", {"channel": "room.2"})

        def entries(channel):
            return int(servers.cli(redis, "hlen", f"test:{{{channel}}}:presence"))
        wait_for(lambda: entries("room.1") == 2 and entries("room.2") == 1, what="both nodes' entries written")
        self.assertEqual([on_a.event()["count"] for _ in range(2)], [1, 1])     # A's join, then B's
        b.signal(signal.SIGTERM)
        self.assertEqual(b.wait(15), 0)
        self.assertEqual((entries("room.1"), entries("room.2")), (1, 0))
        self.assertEqual(call(a.port, "rpc.presence", "room.1")["result"]["count"], 1)
        self.assertEqual(on_a.event(), {"channel": "room.1", "principal": None, "count": 1})   # B's leave
        with open(b.log, errors="replace") as f:
            log = f.read()
        self.assertNotIn("not written to Redis", log)
        self.assertNotIn("Redis connection lost", log)


BROWSER = """
const [urlB, done] = arguments;
const seen = [];
const load = (then) => {
  if (window.msgd) return then();
  const s = document.createElement("script");
  s.src = "/msgd.js";
  s.onload = then;
  document.head.appendChild(s);
};
load(() => {
  const a = msgd.connect(undefined, { transport: "sse" });           // this page's node, A
  a.on("presence", (channel, change) => seen.push([channel, change.action, change.principal, change.count]));
  a.subscribe("room.b", () => {}).then(() => {
    const b = msgd.connect(urlB, { transport: "websocket" });        // node B
    window.presenceTest = { a, b, seen };
    b.subscribe("room.b", () => {}).then(() => done("subscribed"));
  });
});
"""


class BrowserTests(unittest.TestCase):
    """msgd.js raises ``presence`` for rpc.join / rpc.leave: a client on
    node A over SSE hears of a client on node B (over WebSocket) joining
    and leaving."""

    timeout = 90

    def test_msgd_js_presence_event(self):
        from tests.browser import chromium, wait_for as js_wait_for
        redis = servers.redis()
        self.addCleanup(redis.cleanup)
        a, b = presence_nodes(self, os.path.abspath(self.mktemp()), redis)
        driver = chromium(self)
        driver.get(f"http://127.0.0.1:{a.port}/msgd.js")
        self.assertEqual(driver.execute_async_script(BROWSER, f"ws://127.0.0.1:{b.port}/ws"), "subscribed")
        self.assertEqual(driver.execute_script("return presenceTest.a.transport"), "sse")
        self.assertTrue(js_wait_for(driver, "presenceTest.seen.length >= 2"))
        driver.execute_script("presenceTest.b.close()")
        self.assertTrue(js_wait_for(driver, "presenceTest.seen.length >= 3"))
        self.assertEqual(driver.execute_script("return presenceTest.seen"),
                         [["room.b", "join", None, 1], ["room.b", "join", None, 1], ["room.b", "leave", None, 1]])
        self.assertEqual(driver.execute_script("return presenceTest.a.presence('room.b')"),
                         {"channel": "room.b", "count": 1, "principals": []})
