"""The Redis pub/sub bridge (msgd/cluster/redis_pubsub.py): its Redis
protocol and its bookkeeping against a fake shard, then the real thing
against a private redis-server (two bridges in this process standing for
two nodes)."""

from __future__ import annotations

import fnmatch
import json

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msgd.cluster import redis_pubsub
from msgd.cluster.redis_pubsub import PUBLISH, SYNC, RedisBridge, SubscriberProtocol, redis_pattern, tag
from msgd.config import PubSubConfig
from msgd.core.metrics import Metrics
from msgd.core.pubsub import Broker
from tests import servers
from tests.helpers import eventually


class Sub:
    principal = None

    def __init__(self):
        self.got = []

    def deliver(self, ev):
        self.got.append(("gap", ev.channel, ev.offset) if ev.gap else (ev.channel, ev.offset, ev.data))


def event_json(name, offset, data, epoch="E1", gap=False):
    import json
    return json.dumps({"c": name, "o": offset, "e": epoch, "t": 1.0, "d": data,
                       **({"g": 1} if gap else {})}).encode()


# -- names -----------------------------------------------------------------------------

class NameTests(unittest.TestCase):
    def test_tag_is_the_whole_name_and_one_to_one(self):
        self.assertEqual(tag("chat.lobby"), "chat.lobby")
        self.assertEqual(tag("a{b}c"), "a%7Bb%7Dc")
        self.assertEqual(tag("}"), "%7D")              # never an empty tag
        self.assertNotEqual(tag("a%7Bb"), tag("a{b"))

    def test_pattern_globs(self):
        self.assertEqual(redis_pattern("p", "news.*"), "p:{news.*}:ev")
        self.assertEqual(redis_pattern("p", "a?b[!xy]c*"), "p:{a*b*c*}:ev")
        self.assertEqual(redis_pattern("p", "a\\b]"), "p:{a\\\\b\\]}:ev")
        self.assertEqual(redis_pattern("p", "x[y"), "p:{x*y}:ev")     # no closing ]: fnmatch's literal [
        self.assertEqual(redis_pattern("p", "{*}"), "p:{%7B*%7D}:ev")


# -- the Redis protocol ------------------------------------------------------------------------

class _Shard:
    endpoint = "tcp:host=127.0.0.1:port=6379"

    def __init__(self, keepalive=0.0):
        self.pushes = []
        self.log = redis_pubsub.Shard.log
        self.keepalive = keepalive
        self.reactor = task.Clock()
        self.lost_ = []

    def lost(self, kind, why):
        self.lost_.append(kind)

    def pushed(self, channel, payload):
        self.pushes.append((channel, payload))


class _Factory:
    def __init__(self, keepalive=0.0):
        self.shard = _Shard(keepalive)
        self.kind = "subscriber"


def subscriber(keepalive=0.0) -> SubscriberProtocol:
    p = SubscriberProtocol()
    p.factory = _Factory(keepalive)
    p.makeConnection(StringTransport())
    return p


def push(kind, *parts) -> bytes:
    out = b"*%d\r\n$%d\r\n%s\r\n" % (len(parts) + 1, len(kind), kind)
    for x in parts:
        out += b"$%d\r\n%s\r\n" % (len(x), x)
    return out


class ProtocolTests(unittest.TestCase):
    def test_keepalive_drops_a_connection_whose_ping_goes_unanswered(self):
        for proto, pong in ((SubscriberProtocol, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),   # subscribed
                            (redis_pubsub.RedisProtocol, b"+PONG\r\n")):
            p = proto()
            p.factory = _Factory(keepalive=5.0)
            p.makeConnection(StringTransport())
            clock, shard = p.factory.shard.reactor, p.factory.shard
            clock.advance(4.9)
            self.assertEqual(p.transport.value(), b"")
            clock.advance(0.1)
            self.assertEqual(p.transport.value(), b"*1\r\n$4\r\nPING\r\n")
            p.dataReceived(pong)
            p.transport.clear()
            clock.advance(5)                    # answered: another one
            self.assertEqual(p.transport.value(), b"*1\r\n$4\r\nPING\r\n")
            self.assertFalse(p.transport.disconnecting)
            clock.advance(5)                    # not answered when the next is due: dropped
            self.assertTrue(p.transport.disconnecting)
            p.connectionLost(ConnectionError("aborted"))
            self.assertEqual(shard.lost_, ["subscriber"])      # the lost-connection path, as any loss
            p.transport.clear()
            clock.advance(60)
            self.assertEqual(p.transport.value(), b"")         # no PING after the loss

    def test_no_keepalive_when_zero(self):
        p = subscriber()
        p.factory.shard.reactor.advance(3600)
        self.assertEqual(p.transport.value(), b"")

    def test_every_reply_of_a_read_at_once_whatever_the_split(self):
        data = (push(b"message", b"p:{a}:ev", b"one") + push(b"pmessage", b"p:{*}:ev", b"p:{b}:ev", b"two")
                + b"*2\r\n*1\r\n:5\r\n$-1\r\n" + push(b"message", b"p:{a}:ev", b"three\r\nfour"))
        for cut in range(len(data) + 1):
            p = subscriber()
            d = p.execute_command("WHATEVER")         # the reply in the middle is its
            p.dataReceived(data[:cut])
            p.dataReceived(data[cut:])
            self.assertEqual(p.factory.shard.pushes, [(b"p:{a}:ev", b"one"), (b"p:{b}:ev", b"two"),
                                                      (b"p:{a}:ev", b"three\r\nfour")], cut)
            self.assertEqual(self.successResultOf(d), [[5], None])

    def test_error_replies_and_lost_connections_fail_their_commands(self):
        p = subscriber()
        p.factory.shard.lost = lambda kind, why: None
        d1, d2 = p.execute_command("A"), p.execute_command("B")
        self.assertEqual(p.transport.value(), b"*1\r\n$1\r\nA\r\n*1\r\n$1\r\nB\r\n")
        p.dataReceived(b"-ERR no such thing\r\n")
        self.assertEqual(str(self.failureResultOf(d1, txredisapi.ResponseError).value), "no such thing")
        p.connectionLost(ConnectionError("gone"))
        self.failureResultOf(d2, txredisapi.ConnectionError)

    def test_one_publish_through_a_channel_and_patterns_is_taken_once(self):
        p = subscriber()
        p.dataReceived(push(b"message", b"p:{a}:ev", b"E1") + push(b"pmessage", b"p:{*}:ev", b"p:{a}:ev", b"E1")
                       + push(b"pmessage", b"p:{a*}:ev", b"p:{a}:ev", b"E1")
                       + push(b"message", b"p:{a}:ev", b"E2"))
        self.assertEqual(p.factory.shard.pushes, [(b"p:{a}:ev", b"E1"), (b"p:{a}:ev", b"E2")])

    def test_scripts_leave_at_the_end_of_the_turn_or_in_bursts_in_command_order(self):
        p = redis_pubsub.RedisProtocol()
        p.factory = _Factory()
        p.makeConnection(StringTransport())
        clock = p.factory.shard.reactor
        script = lambda n: b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nsha\r\n$1\r\n0\r\n$%d\r\n%d\r\n" % (len(str(n)), n)  # noqa: E731
        ds = [p.evalsha("sha", [], [n]) for n in range(3)]
        self.assertEqual(p.transport.value(), b"")              # gathered for the end of the turn
        clock.advance(0)
        self.assertEqual(p.transport.value(), b"".join(script(n) for n in range(3)))
        p.transport.clear()
        ds += [p.evalsha("sha", [], [n]) for n in range(3, 3 + p.BURST)]
        self.assertEqual(p.transport.value(), b"".join(script(n) for n in range(3, 3 + p.BURST)))   # a burst: at once
        self.assertEqual(len(clock.getDelayedCalls()), 1)       # one end-of-turn call per turn, whatever went
        clock.advance(0)
        self.assertEqual(p.transport.value(), b"".join(script(n) for n in range(3, 3 + p.BURST)))   # nothing more
        p.transport.clear()
        ds.append(p.evalsha("sha", [], [99]))
        ping = p.execute_command("PING")                        # another command: the script goes first
        self.assertEqual(p.transport.value(), script(99) + b"*1\r\n$4\r\nPING\r\n")
        clock.advance(0)
        self.assertEqual(p.transport.value(), script(99) + b"*1\r\n$4\r\nPING\r\n")
        p.dataReceived(b"".join(b":%d\r\n" % n for n in range(len(ds))) + b"+PONG\r\n")
        self.assertEqual([self.successResultOf(d) for d in ds], list(range(len(ds))))
        self.assertEqual(self.successResultOf(ping), "PONG")

    def test_scripts_not_written_when_the_connection_is_lost_fail(self):
        p = redis_pubsub.RedisProtocol()
        p.factory = _Factory()
        p.makeConnection(StringTransport())
        d = p.evalsha("sha", [], [1])
        p.connectionLost(ConnectionError("gone"))
        self.failureResultOf(d, txredisapi.ConnectionError)
        self.assertEqual(p.factory.shard.reactor.getDelayedCalls(), [])
        self.assertEqual(p.transport.value(), b"")

    def test_a_batch_completes_when_every_name_is_confirmed(self):
        p = subscriber()
        d = p.send("SUBSCRIBE", ["x", "y"], True)
        self.assertEqual(p.transport.value(), b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\nx\r\n$1\r\ny\r\n")
        p.send("UNSUBSCRIBE", ["z"], False)
        d2 = p.send("PSUBSCRIBE", ["q*"], True)
        p.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n")   # incomplete: nothing yet
        self.assertNoResult(d)
        p.dataReceived(b":1\r\n")
        self.assertNoResult(d)
        p.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\ny\r\n:2\r\n")
        self.successResultOf(d)
        p.dataReceived(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nz\r\n:1\r\n-ERR wrong\r\n")
        self.failureResultOf(d2, txredisapi.ResponseError)

    def test_lost_connection_fails_what_waits(self):
        p = subscriber()
        d = p.send("SUBSCRIBE", ["x"], True)
        p.factory.shard.lost = lambda kind, why: None
        p.connectionLost(ConnectionError("gone"))
        self.failureResultOf(d, ConnectionError)


# -- the bridge's bookkeeping, against a fake shard ----------------------------------------------

class FakeShard:
    publish_command = "PUBLISH"

    def __init__(self):
        self.connected = True
        self.calls = []       # ("sub"|"unsub", channels, patterns)
        self.runs = []        # (script, keys, args, Deferred)
        self.waiting = []
        self.name = "fake"
        self.subscriptions = 0

    def run(self, script, keys, args, fixed=()):
        d = defer.Deferred()
        self.runs.append((script, keys, [*fixed, *args], d))     # ARGV as Redis sees it
        return d

    def subscribe(self, channels=(), patterns=()):
        self.calls.append(("sub", sorted(channels), sorted(patterns)))
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def unsubscribe(self, channels=(), patterns=()):
        self.calls.append(("unsub", sorted(channels), sorted(patterns)))

    def describe(self):
        return {}

    def confirm(self):
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def reads(self):
        return [r for r in self.runs if r[0] is SYNC and not r[3].called]


class BridgeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.broker = Broker(self.clock, history_size=10, gc_interval=0)
        self.shard = FakeShard()
        self.bridge = RedisBridge(self.broker, PubSubConfig(backend="redis", prefix="p"), self.clock,
                                  shards=[self.shard])

    def join(self, *names, epoch="E1", offset=0, history=()):
        self.clock.advance(0)
        self.shard.confirm()
        for script, keys, args, d in self.shard.reads():
            d.callback([epoch.encode(), str(offset).encode(), [event_json(keys[0].split("{")[1].split("}")[0], o, v)
                                                                for o, v in history]])

    def test_subscriptions_of_a_turn_go_in_one_command(self):
        subs = [Sub() for _ in range(3)]
        ds = [self.broker.subscribe(n, s) for n, s in zip(("a", "b", "c"), subs)]
        self.broker.subscribe("a", Sub())
        self.assertEqual(self.shard.calls, [])
        self.clock.advance(0)
        self.assertEqual(self.shard.calls, [("sub", ["p:{a}:ev", "p:{b}:ev", "p:{c}:ev"], [])])
        for d in ds:
            self.assertNoResult(d)                # until confirmed and read
        self.join(offset=4)
        self.assertEqual([self.successResultOf(d)["offset"] for d in ds], [4, 4, 4])
        self.assertEqual(len(self.shard.runs), 3)  # one read per channel
        for n, s in zip(("a", "b", "c"), subs):
            self.broker.unsubscribe(n, s)
        self.clock.advance(0)
        self.assertEqual(self.shard.calls[-1], ("unsub", ["p:{b}:ev", "p:{c}:ev"], []))   # a has another
        self.assertEqual(sorted(self.broker.channels), ["a"])

    def test_leaving_and_coming_back_in_one_turn_sends_nothing_more(self):
        s = Sub()
        self.broker.subscribe("a", s)
        self.join()
        self.broker.unsubscribe("a", s)
        d = self.broker.subscribe("a", s)
        self.clock.advance(0)
        self.assertEqual(self.shard.calls[-1], ("sub", ["p:{a}:ev"], []))
        self.join(offset=0)
        self.successResultOf(d)

    def test_events_arriving_while_reading_are_held_then_taken_once(self):
        s = Sub()
        d = self.broker.subscribe("a", s)
        self.clock.advance(0)
        self.shard.confirm()
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 5, "five"))
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 6, "six"))
        [(_, _, _, read)] = self.shard.reads()
        read.callback([b"E1", b"5", [event_json("a", 4, "four"), event_json("a", 5, "five")]])
        # six came before the subscriber was in: its answer says so, and a resume from 3 replays it
        self.assertEqual(self.successResultOf(d)["offset"], 6)
        self.assertEqual(s.got, [])
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 6, "six"))
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 7, "seven"))
        self.assertEqual(s.got, [("a", 7, "seven")])
        other = Sub()
        self.successResultOf(self.broker.subscribe("a", other, since=3, epoch="E1"))
        self.assertEqual([o for _, o, _ in other.got], [4, 5, 6, 7])

    def test_an_event_out_of_sequence_makes_it_read_again(self):
        s = Sub()
        self.broker.subscribe("a", s)
        self.join(offset=2)
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 5, "five"))
        self.assertEqual(s.got, [])
        [(_, _, _, read)] = self.shard.reads()
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 6, "six"))
        read.callback([b"E1", b"5", [event_json("a", o, str(o)) for o in (3, 4, 5)]])
        self.assertEqual(s.got, [("a", 3, "3"), ("a", 4, "4"), ("a", 5, "5"), ("a", 6, "six")])

    def test_patterns_go_to_every_shard_and_are_filtered_by_fnmatch(self):
        s = Sub()
        d = self.broker.subscribe("n.?", s)
        self.clock.advance(0)
        self.assertEqual(self.shard.calls, [("sub", [], ["p:{n.*}:ev"])])
        self.assertNoResult(d)
        self.shard.confirm()
        self.successResultOf(d)
        self.bridge.pushed(self.shard, b"p:{n.ab}:ev", event_json("n.ab", 1, "no"))   # the glob's extra
        self.bridge.pushed(self.shard, b"p:{n.a}:ev", event_json("n.a", 1, "yes"))
        self.assertEqual(s.got, [("n.a", 1, "yes")])
        self.assertEqual(self.broker.channels, {})
        self.broker.unsubscribe("n.?", s)
        self.clock.advance(0)
        self.assertEqual(self.shard.calls[-1], ("unsub", [], ["p:{n.*}:ev"]))

    def test_outage_then_resync(self):
        s, ps = Sub(), Sub()
        self.broker.subscribe("a", s)
        self.broker.subscribe("z*", ps)
        self.join(offset=2)
        self.shard.connected = False
        self.bridge.shard_down(self.shard)
        self.assertEqual(self.broker.publish("a", "alone").result, 3)     # delivered here only
        self.assertEqual(s.got, [("gap", "a", 2), ("a", 3, "alone")])
        self.shard.connected = True
        self.shard.calls.clear()
        self.shard.runs.clear()
        self.bridge.shard_up(self.shard)
        # the pattern subscriber is told at once; the channel after reading it again
        self.assertEqual(ps.got, [("gap", "z*", 0)])
        marker = [r for r in self.shard.runs if r[0] is PUBLISH]
        self.assertEqual(len(marker), 1)
        self.assertEqual(marker[0][2][8], ',"g":1')                       # a gap marker for "a"
        self.clock.advance(0)
        self.assertEqual(self.shard.calls, [("sub", ["p:{a}:ev"], ["p:{z*}:ev"])])
        self.shard.confirm()
        [(_, _, _, read)] = self.shard.reads()
        read.callback([b"E1", b"4", [event_json("a", 3, "b3"), event_json("a", 4, "b4")]])
        # back on the shared stream where it left it, then what B published meanwhile
        self.assertEqual(s.got[2:], [("gap", "a", 2), ("a", 3, "b3"), ("a", 4, "b4")])
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 5, None, gap=True))
        self.assertEqual(s.got[-1], ("gap", "a", 5))

    def test_a_failed_read_is_tried_again(self):
        s = Sub()
        d = self.broker.subscribe("a", s)
        self.clock.advance(0)
        self.shard.confirm()
        [(_, _, _, read)] = self.shard.reads()
        read.errback(txredisapi.ResponseError("OOM"))
        self.assertEqual(self.successResultOf(d)["offset"], 0)     # answered, with local state
        self.clock.advance(self.bridge.retry_delay)
        self.clock.advance(0)
        self.assertEqual(self.shard.calls[-1], ("sub", ["p:{a}:ev"], []))
        self.join(offset=3)
        self.assertEqual(s.got, [("gap", "a", 3)])          # it had local state only: told
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 4, "four"))
        self.assertEqual(s.got[-1], ("a", 4, "four"))

    def test_losing_the_shard_answers_pattern_subscribers_waiting(self):
        d = self.broker.subscribe("n.*", Sub())
        self.shard.connected = False
        self.bridge.shard_down(self.shard)
        self.assertTrue(self.successResultOf(d)["pattern"])

    def test_what_was_published_alone_is_forgotten_when_back(self):
        self.shard.connected = False
        self.bridge.shard_down(self.shard)
        self.broker.publish("quiet", 1)
        self.assertIn("quiet", self.broker.channels)
        self.shard.connected = True
        self.bridge.shard_up(self.shard)
        self.assertEqual(self.broker.channels, {})

    def test_a_failed_publish_is_marked_as_a_gap_at_once(self):
        s = Sub()
        self.broker.subscribe("a", s)
        self.join(offset=2)
        d = self.broker.publish("a", "x")
        self.shard.runs[-1][3].errback(txredisapi.ResponseError("OOM command not allowed"))
        self.assertEqual(self.successResultOf(d), 3)                 # delivered here, alone
        self.assertEqual(s.got, [("gap", "a", 2), ("a", 3, "x")])
        marker = self.shard.runs[-1]
        self.assertEqual((marker[0], marker[2][8]), (PUBLISH, ',"g":1'))
        marker[3].callback(3)
        # the marker comes back: the node reads the channel again and is back on the shared stream
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 3, None, gap=True))
        [(_, _, _, read)] = self.shard.reads()
        read.callback([b"E1", b"3", [event_json("a", 3, None, gap=True)]])
        self.assertEqual(s.got[2:], [("gap", "a", 2), ("gap", "a", 3)])
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 4, "four"))
        self.assertEqual(s.got[-1], ("a", 4, "four"))

    def test_a_cancelled_publish_stays_on_the_shared_stream(self):
        # the caller gave up (its deadline passed): the script sent still runs, nothing is forked
        s = Sub()
        self.broker.subscribe("a", s)
        self.join(offset=2)
        runs = len(self.shard.runs)
        d = self.broker.publish("a", "x")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.shard.runs), runs + 1)         # the publish, and no gap marker
        self.assertEqual(s.got, [])
        self.assertIsNone(self.broker.channels["a"].shared_at)   # no local epoch
        self.assertEqual(self.broker.channels["a"].epoch, "E1")
        self.assertNotIn("a", self.bridge._forked)
        self.bridge.pushed(self.shard, b"p:{a}:ev", event_json("a", 3, "x"))
        self.assertEqual(s.got, [("a", 3, "x")])                 # delivered once, as Redis has it

    def test_no_state_for_a_channel_only_published_on(self):
        d = self.broker.publish("quiet", {"x": 1})
        [(script, keys, args, run)] = self.shard.runs
        self.assertIs(script, PUBLISH)
        self.assertEqual(keys, ["p:{quiet}:epoch", "p:{quiet}:offset", "p:{quiet}:history"])
        self.assertEqual(args[3], "p:{quiet}:ev")               # ARGV[4]
        self.assertEqual(json.loads(args[6]), {"x": 1})         # ARGV[7]: the bytes the broker encoded
        run.callback(9)
        self.assertEqual(self.successResultOf(d), 9)
        self.assertEqual(self.broker.channels, {})
        self.assertEqual(self.shard.calls, [])


# -- against a real Redis ------------------------------------------------------------------------------

class RealRedisTests(unittest.TestCase):
    """Two bridges in this process, standing for two nodes."""

    def setUp(self):
        self.redis = servers.redis()
        self.addCleanup(self.redis.cleanup)

    def node(self):
        broker = Broker(reactor, history_size=100, gc_interval=0)
        metrics = Metrics()
        bridge = RedisBridge(broker, PubSubConfig(backend="redis", redis=(f"tcp:host=127.0.0.1:port={self.redis.port}",),
                                                  prefix="t"), reactor, metrics=metrics)
        bridge.startService()
        self.addCleanup(bridge.stopService)
        return broker, bridge, metrics

    @defer.inlineCallbacks
    def test_events_reach_only_nodes_with_subscribers_in_order(self):
        (a, bridge_a, ma), (b, bridge_b, mb) = self.node(), self.node()
        yield eventually(lambda: bridge_a.connected and bridge_b.connected)
        sub = Sub()
        answer = yield b.subscribe("room", sub)
        self.assertEqual(answer["offset"], 0)
        offsets = yield defer.gatherResults([a.publish("room", i) for i in range(500)])
        self.assertEqual(offsets, list(range(1, 501)))
        yield eventually(lambda: len(sub.got) == 500)
        self.assertEqual(sub.got, [("room", i + 1, i) for i in range(500)])
        self.assertEqual(a.channels, {})                 # A publishes only: it keeps nothing
        self.assertEqual(ma.value("msgd_pubsub_redis_received_total"), 0)
        self.assertEqual(mb.value("msgd_pubsub_redis_received_total"), 500)
        self.assertEqual(mb.value("msgd_pubsub_redis_subscriptions"), 1)
        self.assertGreater(ma.value("msgd_pubsub_redis_latency_seconds_count"), 0)

        # it resumes on A with since/epoch: exactly what it missed
        b.unsubscribe("room", sub)
        yield a.publish("room", "missed")
        again = Sub()
        answer = yield a.subscribe("room", again, since=500, epoch=answer["epoch"])
        self.assertTrue(answer["recovered"])
        self.assertEqual(again.got, [("room", 501, "missed")])
        yield eventually(lambda: mb.value("msgd_pubsub_redis_subscriptions") == 0)

    @defer.inlineCallbacks
    def test_patterns_get_exactly_what_fnmatch_matches(self):
        (a, bridge_a, _), (b, bridge_b, _) = self.node(), self.node()
        yield eventually(lambda: bridge_a.connected and bridge_b.connected)
        names = ["news.a", "news.ab", "news.", "news.{x}", "news.%7Bx%7D", "newsa", "a{b}c", "x\\y", "news.!",
                 "x%y", "news.b}"]
        patterns = ["news.*", "news.?", "news.[!a]", "news.[ab]", "*{*}*", "x\\*", "news.[", "*%*", "news.{*",
                    "*}"]
        end = Sub()
        yield b.subscribe("end", end)
        for p in patterns:          # one at a time: no glob may cover for another's
            s = Sub()
            yield b.subscribe(p, s)
            for n in names:
                yield a.publish(n, n)
            yield a.publish("end", p)      # B gets it after the others: one connection, in order
            yield eventually(lambda: end.got and end.got[-1][2] == p)
            self.assertEqual([data for _, _, data in s.got], [n for n in names if fnmatch.fnmatchcase(n, p)], p)
            b.unsubscribe(p, s)
        direct, s = Sub(), Sub()
        yield b.subscribe("news.a", direct)
        yield b.subscribe("news.*", s)
        yield b.subscribe("*.a", s)
        yield a.publish("news.a", "once")
        yield eventually(lambda: direct.got)
        self.assertEqual([d for _, _, d in direct.got], ["once"])      # though patterns match it too
        self.assertEqual([d for _, _, d in s.got], ["once"])
        yield b.subscribe("*.b", s)
        yield a.publish("news.b", "twice matched")     # two globs, no channel state: still once
        yield eventually(lambda: len(s.got) == 2)
        yield a.publish("end", "last")
        yield eventually(lambda: end.got[-1][2] == "last")
        self.assertEqual([d for _, _, d in s.got], ["once", "twice matched"])

    @defer.inlineCallbacks
    def test_a_patterns_channels_listed_and_read_once(self):
        (a, bridge_a, _), (b, bridge_b, _) = self.node(), self.node()
        yield eventually(lambda: bridge_a.connected and bridge_b.connected)
        names = [f"n.{i}" for i in range(1500)] + ["n.{x}", "n.%7Bx", "n.%", "m.1", "n"]
        yield defer.gatherResults([a.publish(n, n) for n in names])
        found = yield bridge_b.channels("n.*")       # more keys than one SCAN step returns
        self.assertEqual(sorted(found), sorted(n for n in names if fnmatch.fnmatchcase(n, "n.*")))
        epoch, offset, events = yield bridge_b.read("n.{x}")
        self.assertEqual((offset, [(e.channel, e.offset, e.data) for e in events]), (1, [("n.{x}", 1, "n.{x}")]))
        self.assertEqual(b.channels, {})            # read, not followed
        self.assertEqual(bridge_b.following, {})

    @defer.inlineCallbacks
    def test_scripts_come_back_after_a_flush(self):
        a, bridge, _ = self.node()
        yield eventually(lambda: bridge.connected)
        sub = Sub()
        yield a.subscribe("c", sub)
        yield a.publish("c", 1)
        yield bridge.shards[0].command.execute_command("SCRIPT", "FLUSH")
        self.assertEqual((yield a.publish("c", 2)), 2)
        yield eventually(lambda: len(sub.got) == 2)

    @defer.inlineCallbacks
    def test_keys_expire_ttl_after_the_refresh_and_new_keys_always_get_it(self):
        a, bridge, _ = self.node()
        yield eventually(lambda: bridge.connected)
        cmd = bridge.shards[0].command
        keys = bridge.keys("k")

        def ttls():
            return defer.gatherResults([cmd.execute_command("TTL", k) for k in keys])
        yield a.publish("k", 1)                 # the node's first publish there moves the expiry
        for t in (yield ttls()):
            self.assertGreater(t, bridge.ttl - 5)
        for k in keys:
            yield cmd.execute_command("EXPIRE", k, 1000)
        yield a.publish("k", 2)                 # within REFRESH: the expiry is left as it is
        self.assertEqual([t <= 1000 for t in (yield ttls())], [True] * 3)
        yield cmd.execute_command("DEL", *keys)
        self.assertEqual((yield a.publish("k", 3)), 1)      # keys made anew get the ttl all the same
        for t in (yield ttls()):
            self.assertGreater(t, bridge.ttl - 5)
        bridge._refreshed["k"] -= redis_pubsub.REFRESH
        for k in keys:
            yield cmd.execute_command("EXPIRE", k, 1000)
        yield a.publish("k", 4)                 # REFRESH later: moved again
        for t in (yield ttls()):
            self.assertGreater(t, bridge.ttl - 5)



class RefreshTests(unittest.TestCase):
    def test_a_node_moves_a_channels_expiry_once_per_refresh(self):
        clock = task.Clock()        # at 0: the first publish's time is 0.0
        broker = Broker(clock, history_size=10, gc_interval=0)
        shard = FakeShard()
        RedisBridge(broker, PubSubConfig(backend="redis", prefix="p"), clock, shards=[shard])

        def refreshed():
            return [run[2][9] for run in shard.runs]
        broker.publish("a", 1)
        broker.publish("a", 2)
        broker.publish("b", 1)
        clock.advance(redis_pubsub.REFRESH - 1)
        broker.publish("a", 3)
        clock.advance(1)
        broker.publish("a", 4)
        broker.publish("a", 5)
        self.assertEqual(refreshed(), ["1", "", "1", "", "1", ""])
