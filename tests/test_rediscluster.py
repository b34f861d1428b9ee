"""msgd.cluster.rediscluster: slots, replies and routing with fakes
(task.Clock, StringTransport, scripted connections); then the real thing, a
three-master Redis Cluster from tests/servers.py, including a slot migration
that answers ASK and then MOVED, and sharded pub/sub following its slot."""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, reactor
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThread
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from msgd.cluster import rediscluster as rc
from msgd.cluster.redis_pubsub import SCRIPTS, Script, SubscriberProtocol, _Factory

from tests import servers
from tests.helpers import eventually


class SlotTests(unittest.TestCase):
    def test_crc16(self):
        self.assertEqual(rc.crc16(b"123456789"), 0x31C3)    # the XMODEM check value
        self.assertEqual(rc.crc16(b""), 0)

    def test_key_slot(self):
        self.assertEqual(rc.key_slot("foo"), 12182)         # the cluster spec's example
        self.assertEqual(rc.key_slot(b"foo"), 12182)
        self.assertEqual(rc.key_slot("123456789"), 0x31C3 % 16384)

    def test_hash_tags(self):
        same = rc.key_slot("{user1000}.following")
        self.assertEqual(rc.key_slot("{user1000}.followers"), same)
        self.assertEqual(rc.key_slot("user1000"), same)
        self.assertEqual(rc.key_slot("foo{}{bar}"), rc.key_slot("foo{}{bar}".encode()))
        self.assertEqual(rc.hash_tag(b"foo{}{bar}"), b"foo{}{bar}")     # empty tag: the whole key
        self.assertEqual(rc.hash_tag(b"foo{{bar}}zap"), b"{bar")
        self.assertEqual(rc.hash_tag(b"foo{bar}{zap}"), b"bar")
        self.assertEqual(rc.hash_tag(b"foo{bar"), b"foo{bar")
        self.assertEqual(rc.hash_tag(b"x}{y}"), b"y")


class ReplyTests(unittest.TestCase):
    def test_redirect(self):
        err = txredisapi.ResponseError
        self.assertEqual(rc.redirect(err("MOVED 3999 127.0.0.1:6381")), ("MOVED", 3999, "127.0.0.1", 6381))
        self.assertEqual(rc.redirect(err("ASK 12 ::1:7000")), ("ASK", 12, "::1", 7000))
        self.assertEqual(rc.redirect(err("MOVED 5 :7001")), ("MOVED", 5, "", 7001))
        self.assertIsNone(rc.redirect(err("WRONGTYPE Operation against a key")))
        self.assertIsNone(rc.redirect(err("MOVED garbage")))
        self.assertIsNone(rc.redirect(err()))
        self.assertEqual(rc.error_kind(err("NOSCRIPT No matching script")), "NOSCRIPT")

    def test_parse_slots(self):
        reply = [[0, 5460, ["10.0.0.1", 7000, "id1"], ["10.0.0.4", 7003, "id4"]],
                 [5461, 10922, [b"", 7001, "id2"]],
                 [10923, 16383, ["?", 7002, "id3"]]]
        self.assertEqual(rc.parse_slots(reply, "10.0.0.9"),
                         [(0, 5460, "10.0.0.1", 7000), (5461, 10922, "10.0.0.9", 7001),
                          (10923, 16383, "10.0.0.9", 7002)])


class EndpointTests(unittest.TestCase):
    def test_keyword(self):
        self.assertEqual(rc.endpoint_for("tcp:host=10.0.0.1:port=7000:timeout=3", "10.0.0.2", 7001),
                         "tcp:host=10.0.0.2:port=7001:timeout=3")
        self.assertEqual(rc.address_of("tcp:host=10.0.0.1:port=7000:timeout=3"), ("10.0.0.1", 7000))

    def test_positional(self):
        self.assertEqual(rc.endpoint_for("tcp:10.0.0.1:7000", "10.0.0.2", 7001), "tcp:10.0.0.2:7001")
        self.assertEqual(rc.address_of("tcp:10.0.0.1:7000"), ("10.0.0.1", 7000))

    def test_ipv6_and_tls_options(self):
        ep = rc.endpoint_for(r"tls:host=a.example:port=7000:trustRoots=/etc/ca\:x", "::1", 7002)
        self.assertEqual(ep, r"tls:host=\:\:1:port=7002:trustRoots=/etc/ca\:x")
        self.assertEqual(rc.address_of(ep), ("::1", 7002))


class FakeConn:
    """A command connection whose replies are scripted per command name."""

    def __init__(self, replies=None):
        self.calls = []
        self.replies = replies or {}

    def execute_command(self, *args):
        self.calls.append(args)
        script = self.replies.get(args[0], "OK")
        reply = script.pop(0) if isinstance(script, list) else script
        if callable(reply):
            reply = reply(args)
        if isinstance(reply, defer.Deferred):
            return reply
        return defer.fail(reply) if isinstance(reply, Exception) else defer.succeed(reply)


def moved(slot, port):
    return txredisapi.ResponseError(f"MOVED {slot} 127.0.0.1:{port}")


class FakeBridge:
    """What the cluster calls on the pub/sub bridge, recorded."""

    scripts = list(SCRIPTS)
    keepalive = 0

    def __init__(self):
        self.calls = []
        self.messages = []
        self.resubscribed_ = []

    def shard_up(self, shard):
        self.calls.append("up")

    def shard_down(self, shard):
        self.calls.append("down")

    def pushed(self, shard, channel, payload):
        self.messages.append((channel.decode(), payload.decode()))

    def resubscribed(self, shard, channels):
        self.resubscribed_.append(list(channels))


def make_cluster(testcase, ranges=((0, 8191, 7000), (8192, 16383, 7001))):
    """A RedisCluster that is not started (no sockets): its nodes get fake
    command connections (and the tests' subscriber connections)."""
    clock = MemoryReactorClock()
    bridge = FakeBridge()
    cluster = rc.RedisCluster(bridge, "cluster", ["tcp:host=127.0.0.1:port=7000"], "", clock)
    cluster._apply([(a, b, "127.0.0.1", port) for a, b, port in ranges])
    return cluster, clock, bridge


def up(node, command=None):
    """``node`` with a fake command connection and connected."""
    node.command = command or FakeConn()
    node.connected = True
    node.error = None
    return node.command


class RoutingTests(unittest.TestCase):
    def setUp(self):
        self.cluster, self.clock, self.bridge = make_cluster(self)
        self.a = self.cluster.nodes[("127.0.0.1", 7000)]
        self.b = self.cluster.nodes[("127.0.0.1", 7001)]
        up(self.a)
        up(self.b)
        self.key_a = next(k for k in ("a", "b", "c", "d", "e") if rc.key_slot(k) <= 8191)
        self.key_b = next(k for k in ("a", "b", "c", "d", "e") if rc.key_slot(k) > 8191)

    def test_routes_by_slot(self):
        self.cluster.execute(self.key_a, "GET", self.key_a)
        self.cluster.execute(self.key_b, "GET", self.key_b)
        self.assertEqual(self.a.command.calls, [("GET", self.key_a)])
        self.assertEqual(self.b.command.calls, [("GET", self.key_b)])

    def test_moved_updates_map_retries_and_refreshes(self):
        slot = rc.key_slot(self.key_a)
        self.a.command.replies = {"GET": moved(slot, 7001),
                                  "CLUSTER": [[[0, 16383, ["127.0.0.1", 7001, "b"]]]]}
        self.b.command.replies = {"GET": "value", "CLUSTER": [[[0, 16383, ["127.0.0.1", 7001, "b"]]]]}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        self.assertEqual(self.successResultOf(d), "value")
        self.assertIn(("GET", self.key_a), self.b.command.calls)
        self.assertEqual(self.cluster.redirections, {"MOVED": 1, "ASK": 0})
        # the refresh asked for the whole map, and node a (no master any more) is gone
        self.assertTrue(any(c == ("CLUSTER", "SLOTS") for c in self.a.command.calls + self.b.command.calls))
        self.assertIs(self.cluster.node_for_key(self.key_a), self.b)
        self.assertEqual(list(self.cluster.nodes), [("127.0.0.1", 7001)])

    def test_ask_sends_asking_and_keeps_the_map(self):
        slot = rc.key_slot(self.key_a)
        self.a.command.replies = {"GET": txredisapi.ResponseError(f"ASK {slot} 127.0.0.1:7001")}
        self.b.command.replies = {"GET": "there"}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        self.assertEqual(self.successResultOf(d), "there")
        self.assertEqual(self.b.command.calls, [("ASKING",), ("GET", self.key_a)])
        self.assertIs(self.cluster.node_for_slot(slot), self.a)
        self.assertNotIn(("CLUSTER", "SLOTS"), self.a.command.calls)

    def test_redirect_to_an_unknown_node_waits_for_its_connection(self):
        slot = rc.key_slot(self.key_a)
        self.a.command.replies = {"GET": txredisapi.ResponseError(f"ASK {slot} 127.0.0.1:7005")}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        self.assertNoResult(d)
        c = self.cluster.nodes[("127.0.0.1", 7005)]
        up(c, FakeConn({"GET": "late"}))
        self.cluster.shard_up(c)
        self.assertEqual(self.successResultOf(d), "late")

    def test_redirect_to_a_node_that_never_connects_times_out(self):
        slot = rc.key_slot(self.key_a)
        self.a.command.replies = {"GET": txredisapi.ResponseError(f"ASK {slot} 127.0.0.1:7005")}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        self.clock.advance(self.cluster.timeout)
        self.failureResultOf(d, rc.ClusterError)
        self.assertEqual(self.cluster.nodes[("127.0.0.1", 7005)]._waiting, [])

    def test_noscript_loads_the_script_and_retries(self):
        script = Script("return KEYS[1]")
        self.a.command.replies = {"EVALSHA": [txredisapi.ResponseError("NOSCRIPT No matching script."), "k"],
                                  "SCRIPT": script.sha}
        d = self.cluster.run(script, [self.key_a], ["arg"])
        self.assertEqual(self.successResultOf(d), "k")
        self.assertEqual(self.a.command.calls, [("EVALSHA", script.sha, 1, self.key_a, "arg"),
                                                ("SCRIPT", "LOAD", script.text),
                                                ("EVALSHA", script.sha, 1, self.key_a, "arg")])

    def test_tryagain_pauses_then_retries(self):
        self.a.command.replies = {"GET": [txredisapi.ResponseError("TRYAGAIN Multiple keys request"), "ok"]}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        self.assertNoResult(d)
        self.clock.advance(self.cluster.retry_delay)
        self.assertEqual(self.successResultOf(d), "ok")

    def test_redirections_are_bounded(self):
        slot = rc.key_slot(self.key_a)
        self.a.command.replies = {"GET": moved(slot, 7001), "CLUSTER": defer.Deferred()}
        self.b.command.replies = {"GET": moved(slot, 7000), "CLUSTER": defer.Deferred()}
        d = self.cluster.execute(self.key_a, "GET", self.key_a)
        f = self.failureResultOf(d, rc.ClusterError)
        self.assertIn("after 5 redirections", f.getErrorMessage())
        gets = [c for c in self.a.command.calls + self.b.command.calls if c[0] == "GET"]
        self.assertEqual(len(gets), self.cluster.max_redirects + 1)

    def test_other_errors_are_the_callers(self):
        self.a.command.replies = {"INCR": txredisapi.ResponseError("WRONGTYPE Operation")}
        self.failureResultOf(self.cluster.execute(self.key_a, "INCR", self.key_a), txredisapi.ResponseError)
        self.assertEqual(len(self.a.command.calls), 1)

    def test_a_master_down_fails_at_once_and_the_cluster_is_down(self):
        self.cluster._state()
        self.assertEqual(self.bridge.calls, ["up"])
        self.a.lost("command", Failure(ConnectionError("gone")))
        f = self.failureResultOf(self.cluster.execute(self.key_a, "GET", self.key_a), rc.ClusterError)
        self.assertIn("127.0.0.1:7000", f.getErrorMessage())
        self.assertFalse(self.cluster.connected)
        self.assertEqual(self.bridge.calls, ["up", "down"])
        self.assertIn("127.0.0.1:7000", self.cluster.describe()["nodes"])
        self.assertIn("connection lost", self.cluster.error)

    def test_unknown_map_fails(self):
        cluster = rc.RedisCluster(FakeBridge(), "c", ["tcp:host=127.0.0.1:port=7000"], "", MemoryReactorClock())
        f = self.failureResultOf(cluster.execute("k", "GET", "k"), rc.ClusterError)
        self.assertIn("not known yet", f.getErrorMessage())
        self.assertFalse(cluster.connected)

    def test_no_patterns(self):
        self.failureResultOf(self.cluster.subscribe([], ["news.*"]), rc.ClusterError)


def resp(*items) -> bytes:
    out = b"*%d\r\n" % len(items)
    for i in items:
        if isinstance(i, int):
            out += b":%d\r\n" % i
        else:
            i = i.encode() if isinstance(i, str) else i
            out += b"$%d\r\n%s\r\n" % (len(i), i)
    return out


class ShardSubscriberTests(unittest.TestCase):
    """The cluster's sharded subscriptions over (msgd.cluster.redis_pubsub's)
    subscriber protocol, fed RESP through a StringTransport."""

    def setUp(self):
        self.cluster, self.clock, self.bridge = make_cluster(self)
        self.a = self.cluster.nodes[("127.0.0.1", 7000)]
        self.b = self.cluster.nodes[("127.0.0.1", 7001)]
        for n in (self.a, self.b):
            n.command = FakeConn({"CLUSTER": defer.Deferred(), "SCRIPT": "sha"})

    def connect(self, node):
        p = _Factory(node, "subscriber", SubscriberProtocol).buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        node._ready("subscriber", p)
        return p, t

    def lose(self, node, p):
        p.connectionLost(Failure(ConnectionError("gone")))

    def test_confirmations_messages_and_errors(self):
        p, t = self.connect(self.a)
        d1 = p.send("SSUBSCRIBE", ["x", "y"], True)
        d2 = p.send("SSUBSCRIBE", ["z"], True)
        self.assertEqual(t.value(), resp("SSUBSCRIBE", "x", "y") + resp("SSUBSCRIBE", "z"))
        p.dataReceived(resp("ssubscribe", "x", 1))
        self.assertNoResult(d1)
        # an unsolicited sunsubscribe (the slot moved) in between is no confirmation
        p.dataReceived(resp("ssubscribe", "y", 2) + resp("smessage", "x", '{"o":1}') + resp("sunsubscribe", "q", 1)
                       + resp("ssubscribe", "z", 1))
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(self.bridge.messages, [("x", '{"o":1}')])
        d3 = p.send("SSUBSCRIBE", ["w"], True)
        p.dataReceived(b"-MOVED 1 127.0.0.1:7001\r\n")
        self.assertEqual(rc.redirect(self.failureResultOf(d3, txredisapi.ResponseError).value)[0], "MOVED")

    def test_lost_connection_fails_pending(self):
        p, t = self.connect(self.a)
        d = p.send("SSUBSCRIBE", ["x"], True)
        self.lose(self.a, p)
        self.failureResultOf(d, ConnectionError)

    def place(self, channel, node):
        return next(c for c in (f"{channel}{i}" for i in range(100))
                    if self.cluster.node_for_key(c) is node)

    def test_wanted_channels_are_placed_by_slot_and_resubscribed(self):
        ca, cb = self.place("ch", self.a), self.place("ch", self.b)
        d = self.cluster.subscribe([ca, cb])     # nothing connected yet: remembered
        pa, ta = self.connect(self.a)
        self.assertEqual(ta.value(), resp("SSUBSCRIBE", ca))
        pa.dataReceived(resp("ssubscribe", ca, 1))
        self.assertNoResult(d)
        pb, tb = self.connect(self.b)
        self.assertEqual(tb.value(), resp("SSUBSCRIBE", cb))
        pb.dataReceived(resp("ssubscribe", cb, 1))
        self.successResultOf(d)
        self.assertEqual(self.bridge.calls, ["up"])                  # the whole cluster is connected
        self.assertEqual(self.cluster.subscriptions, 2)
        self.assertEqual(self.bridge.resubscribed_, [])               # first subscriptions: the Deferred
        self.successResultOf(self.cluster.subscribe([ca]))           # confirmed already
        self.assertEqual(ta.value(), resp("SSUBSCRIBE", ca))        # and not sent again
        # a reconnected subscriber subscribes again, and says so
        self.lose(self.a, pa)
        self.assertIsNone(self.a.subscriber)
        self.assertEqual(self.bridge.calls, ["up", "down"])
        self.assertEqual(self.cluster.confirmed, {cb})
        pa2, ta2 = self.connect(self.a)
        self.assertEqual(ta2.value(), resp("SSUBSCRIBE", ca))
        pa2.dataReceived(resp("ssubscribe", ca, 1))
        self.assertEqual(self.bridge.resubscribed_, [[ca]])
        self.assertEqual(self.bridge.calls, ["up", "down", "up"])
        # unsubscribing
        self.cluster.unsubscribe([ca])
        self.assertEqual(ta2.value(), resp("SSUBSCRIBE", ca) + resp("SUNSUBSCRIBE", ca))
        self.assertNotIn(ca, self.a.placed)
        self.assertEqual(self.cluster.subscriptions, 1)

    def test_waiters_fail_when_the_connection_is_lost(self):
        ca = self.place("ch", self.a)
        pa, ta = self.connect(self.a)
        d = self.cluster.subscribe([ca])
        self.lose(self.a, pa)
        self.failureResultOf(d, txredisapi.ConnectionError)
        self.assertIn(ca, self.a.placed)          # still wanted: subscribed when a is back
        pa2, ta2 = self.connect(self.a)
        self.assertEqual(ta2.value(), resp("SSUBSCRIBE", ca))

    def test_a_moved_slot_moves_the_subscription(self):
        ca = self.place("ch", self.a)
        pa, ta = self.connect(self.a)
        pb, tb = self.connect(self.b)
        d = self.cluster.subscribe([ca])
        pa.dataReceived(resp("ssubscribe", ca, 1))
        self.successResultOf(d)
        # the server drops the subscription by itself: its slot went to b
        refresh = defer.Deferred()
        self.a.command.replies = {"CLUSTER": refresh}
        pa.dataReceived(resp("sunsubscribe", ca, 0))
        self.assertNotIn(ca, self.a.placed)
        refresh.callback([[0, 16383, [b"127.0.0.1", 7001, b"b"]]])
        self.assertEqual(tb.value(), resp("SSUBSCRIBE", ca))
        self.assertIs(self.cluster.channels[ca], self.b)
        pb.dataReceived(resp("ssubscribe", ca, 1))
        self.assertEqual(self.bridge.resubscribed_, [[ca]])         # events may have been missed

    def test_ssubscribe_refused_with_moved_is_placed_again(self):
        ca = self.place("ch", self.a)
        pa, ta = self.connect(self.a)
        pb, tb = self.connect(self.b)
        refresh = defer.Deferred()
        self.a.command.replies = {"CLUSTER": refresh}
        self.cluster.subscribe([ca])
        pa.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % rc.key_slot(ca))
        self.assertEqual(tb.value(), b"")
        refresh.callback([[0, 16383, [b"127.0.0.1", 7001, b"b"]]])
        self.assertEqual(tb.value(), resp("SSUBSCRIBE", ca))

    def test_a_changed_map_moves_subscriptions(self):
        ca = self.place("ch", self.a)
        pa, ta = self.connect(self.a)
        pb, tb = self.connect(self.b)
        self.cluster.subscribe([ca])
        self.cluster._apply([(0, 16383, "127.0.0.1", 7001)])
        self.assertEqual(ta.value(), resp("SSUBSCRIBE", ca))     # a is no master: dropped, connections closed
        self.assertEqual(tb.value(), resp("SSUBSCRIBE", ca))
        self.assertEqual(list(self.cluster.nodes), [("127.0.0.1", 7001)])


def fast_retries(attempt):
    return 0.05


class RealClusterTests(unittest.TestCase):
    """Against a private three-master Redis Cluster."""

    timeout = 60

    def setUp(self):
        self.servers = servers.redis_cluster()
        self.addCleanup(self.servers.cleanup)

    def client(self) -> rc.RedisCluster:
        seed = self.servers.nodes[0]
        c = rc.RedisCluster(FakeBridge(), "cluster", [f"tcp:host={seed.host}:port={seed.port}"], "", reactor,
                            retry_policy=fast_retries)
        c.startService()
        self.addCleanup(c.stopService)
        return c

    def spublish(self, c, channel, message):
        return c.execute(channel, "SPUBLISH", channel, message)

    def node_id(self, server) -> str:
        return servers.cli(server, "cluster", "myid")

    def owner(self, slot: int):
        """The Server that the cluster (asked directly, CLUSTER NODES) says
        owns ``slot``."""
        for line in servers.cli(self.servers.nodes[0], "cluster", "nodes").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rpartition(":")[2])
            for r in fields[8:]:
                first, _, last = r.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    return next(s for s in self.servers.nodes if s.port == port)

    @defer.inlineCallbacks
    def test_commands_go_to_each_slots_master(self):
        c = self.client()
        yield eventually(lambda: c.connected)
        self.assertEqual(len(c.masters), 3)
        self.assertEqual(c.bridge.calls, ["up"])
        keys = [f"key{i}" for i in range(30)]
        for k in keys:
            self.assertEqual((yield c.execute(k, "SET", k, k.upper())), "OK")
        for k in keys:
            self.assertEqual((yield c.execute(k, "GET", k)), k.upper().encode())
            owner = self.owner(rc.key_slot(k))
            self.assertEqual(servers.cli(owner, "get", k), k.upper())   # it lives where the slot is
        # one script touching two keys under one hash tag
        script = Script("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])")
        owner = self.owner(rc.key_slot("{tag}"))
        servers.cli(owner, "script", "flush")
        self.assertEqual((yield c.run(script, ["{tag}:a", "{tag}:b"], ["x"])), 1)
        self.assertEqual((yield c.run(script, ["{tag}:a", "{tag}:b"], ["x"])), 2)
        self.assertEqual(servers.cli(owner, "script", "exists", script.sha), "1")

    @defer.inlineCallbacks
    def test_sharded_pubsub_across_masters(self):
        sub = self.client()
        pub = self.client()
        channels = [f"news.{i}" for i in range(12)]
        yield eventually(lambda: sub.connected and pub.connected)
        yield sub.subscribe(channels)
        self.assertEqual(len({sub.node_for_key(ch) for ch in channels}), 3)    # spread over all three
        owners = [self.owner(rc.key_slot(ch)) for ch in channels]     # looked up once, not on every poll
        by_owner = [(s, [ch for ch, o in zip(channels, owners) if o is s]) for s in self.servers.nodes]

        @defer.inlineCallbacks
        def subscribed_everywhere():
            """One redis-cli per master (in a thread, off the reactor): ``channel count`` pairs."""
            outs = yield defer.gatherResults([deferToThread(servers.cli, owner, "pubsub", "shardnumsub", *chs)
                                              for owner, chs in by_owner if chs])
            return all(count == "1" for out in outs for count in out.split()[1::2])
        yield eventually(subscribed_everywhere)
        for ch in channels:
            self.assertEqual((yield self.spublish(pub, ch, f"hello {ch}")), 1)
        yield eventually(lambda: len(sub.bridge.messages) == len(channels))
        self.assertEqual(sorted(sub.bridge.messages), sorted((ch, f"hello {ch}") for ch in channels))

    @defer.inlineCallbacks
    def test_slot_migration_ask_then_moved(self):
        c = self.client()
        pub = self.client()
        yield eventually(lambda: c.connected and pub.connected)
        key, channel = "{mig}key", "{mig}events"
        slot = rc.key_slot(key)
        source = self.owner(slot)
        target = next(s for s in self.servers.nodes if s is not source)
        yield c.execute(key, "SET", key, "v1")
        yield c.subscribe([channel])
        src_id, dst_id = self.node_id(source), self.node_id(target)
        # migration under way, the key already moved: the source answers ASK
        servers.cli(target, "cluster", "setslot", str(slot), "importing", src_id)
        servers.cli(source, "cluster", "setslot", str(slot), "migrating", dst_id)
        servers.cli(source, "migrate", target.host, str(target.port), "", "0", "5000", "keys", key)
        self.assertEqual((yield c.execute(key, "GET", key)), b"v1")
        self.assertEqual(c.node_for_slot(slot).port, source.port)        # ASK does not change the map
        self.assertEqual(c.redirections, {"ASK": 1, "MOVED": 0})
        # the migration ends: the source answers MOVED
        for s in self.servers.nodes:
            servers.cli(s, "cluster", "setslot", str(slot), "node", dst_id)
        self.assertEqual((yield c.execute(key, "GET", key)), b"v1")
        self.assertEqual(c.node_for_slot(slot).port, target.port)
        self.assertEqual(c.redirections, {"ASK": 1, "MOVED": 1})
        # the shard channel followed its slot: subscribed on the target again
        yield eventually(lambda: c.channels[channel] is c.node_for_slot(slot)
                         and c.bridge.resubscribed_ == [[channel]])
        yield eventually(lambda: deferToThread(servers.cli, target, "pubsub", "shardnumsub", channel)
                         .addCallback(lambda out: out.split()[-1] == "1"))
        self.assertEqual((yield self.spublish(pub, channel, "after")), 1)
        yield eventually(lambda: c.bridge.messages == [(channel, "after")])
        self.assertEqual(pub.redirections["MOVED"], 1)      # the publisher's map was stale too

    @defer.inlineCallbacks
    def test_a_restarted_master_gets_its_subscriptions_back(self):
        c = self.client()
        victim = self.servers.nodes[2]
        channel = next(f"r{i}" for i in range(100) if self.owner(rc.key_slot(f"r{i}")) is victim)
        yield eventually(lambda: c.connected)
        yield c.subscribe([channel])
        node = c.node_for_key(channel)
        victim.stop()
        yield eventually(lambda: not node.connected)
        self.assertFalse(c.connected)
        self.assertEqual(c.bridge.calls, ["up", "down"])
        self.assertFalse(c.describe()["nodes"][victim.address]["connected"])
        victim.start()
        yield eventually(lambda: c.bridge.resubscribed_ == [[channel]], timeout=30)
        yield eventually(lambda: c.bridge.calls == ["up", "down", "up"])
        yield eventually(lambda: deferToThread(servers.cli, victim, "cluster", "info")
                         .addCallback(lambda out: "cluster_state:ok" in out), timeout=30)
        pub = self.client()
        yield eventually(lambda: pub.connected)
        self.assertEqual((yield self.spublish(pub, channel, "back")), 1)
        yield eventually(lambda: c.bridge.messages == [(channel, "back")])

