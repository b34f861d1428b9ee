"""Pub/sub over more than one Redis, with real node processes: two
standalone shards (one is stopped: only its channels degrade, and they
recover), and a three-master Redis Cluster (sharded pub/sub across two
nodes, in order; presence; patterns refused).

Every scenario is blocking code run in a thread with deferToThread, as in
tests/test_cluster.py, whose helpers it uses."""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.cluster.hashing import Rendezvous
from msgd.cluster.redis_pubsub import PUBLISH, SYNC, RedisBridge
from msgd.config import parse_text
from msgd.core import errors
from msgd.core.pubsub import Broker
from tests import servers
from tests.helpers import ROOT
from tests.test_redis_pubsub import FakeShard as BaseFakeShard
from tests.process import Client, NodeProcess, call, health, publish, pubsub_connected, wait_for


def ini(name: str, endpoints: list[str], cluster: bool = False, extra: str = "") -> str:
    """A node's ini with ``extra`` at the end of its ``[pubsub]``."""
    return f"""
[node]
name = {name}
reload_interval = 0

[interface:web]
type = http
endpoint = tcp:{{port}}:interface=127.0.0.1

[pubsub]
backend = redis
redis = {", ".join(endpoints)}
cluster = {"yes" if cluster else "no"}
prefix = test
{extra}"""


def endpoint(srv) -> str:
    return f"tcp:host={srv.host}:port={srv.port}"


def events(client, channel, n):
    """The next ``n`` events of ``channel`` that ``client`` gets (others kept)."""
    got, other = [], []
    while len(got) < n:
        ev = client.event()
        (got if ev["channel"] == channel else other).append(ev)
    client.events[:0] = other
    return got


class FakeShard(BaseFakeShard):
    """tests/test_redis_pubsub's fake shard, named."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.error = None

    def describe(self):
        return {"connected": self.connected}


class Sub:
    principal = None

    def __init__(self):
        self.got = []

    def deliver(self, ev):
        self.got.append(json.loads(ev.notification()))


def bridge(text: str, shards):
    config = parse_text("[pubsub]\nbackend = redis\n" + text)
    clock = task.Clock()
    broker = Broker(clock, gc_interval=0)
    return RedisBridge(broker, config.pubsub, clock, shards=shards), broker, clock


class ExampleTests(unittest.TestCase):
    def test_the_cluster_examples_parse(self):
        from msgd.config import load
        seen = {}
        for sub in ("sharded", "redis-cluster"):
            for n in ("a", "b"):
                c = load(os.path.join(ROOT, "etc", "cluster", sub, f"node-{n}.ini"))
                self.assertEqual(c.pubsub.backend, "redis")
                seen.setdefault(sub, set()).add((c.pubsub.redis, c.pubsub.cluster))
        self.assertEqual(seen["sharded"], {(("tcp:host=127.0.0.1:port=6380", "tcp:host=127.0.0.1:port=6381"), False)})
        self.assertEqual({cluster for _, cluster in seen["redis-cluster"]}, {True})


class BridgeTests(unittest.TestCase):
    """The bridge's use of several shards, with fakes."""

    def setUp(self):
        self.shards = [FakeShard(f"10.0.0.{i}:6379") for i in (1, 2, 3)]
        self.bridge, self.broker, self.clock = bridge("redis = " + " ".join(
            f"tcp:host={s.name.split(':')[0]}:port=6379" for s in self.shards), self.shards)

    def test_each_channel_on_its_shard(self):
        ring = Rendezvous([s.name for s in self.shards])
        for i in range(30):
            name = f"c{i}"
            self.assertIs(self.bridge.shard_for(name), self.shards[ring.index(name)])
            self.broker.publish(name, i)
            [(script, keys, args, d)] = [r for s in self.shards for r in s.runs if r[1][0].endswith(f"{{{name}}}:epoch")]
            self.assertIs(script, PUBLISH)
            self.assertIn((script, keys, args, d), self.bridge.shard_for(name).runs)
        self.assertEqual(len({id(self.bridge.shard_for(f"c{i}")) for i in range(30)}), 3)

    def live(self, name, sub):
        """Subscribe ``sub`` to ``name`` and answer the channel's read."""
        d = self.broker.subscribe(name, sub)
        self.clock.advance(0)                  # the batched SUBSCRIBE
        shard = self.bridge.shard_for(name)
        shard.confirm()
        [(script, keys, args, read)] = [r for r in shard.runs if r[0] is SYNC]
        shard.runs.clear()
        read.callback([b"E", b"3", []])
        return self.successResultOf(d)

    def test_a_resubscribed_channel_is_read_again(self):
        sub = Sub()
        self.assertEqual(self.live("room", sub)["offset"], 3)
        shard = self.bridge.shard_for("room")
        self.bridge.resubscribed(shard, [self.bridge.events_channel("room")])
        [(script, keys, args, read)] = shard.runs
        self.assertIs(script, SYNC)
        missed = json.dumps({"c": "room", "o": 4, "e": "E", "t": 0, "d": "missed"})
        read.callback([b"E", b"4", [missed.encode()]])
        self.assertEqual([(m["method"], m["params"]["data"]) for m in sub.got], [("rpc.event", "missed")])
        self.bridge.resubscribed(shard, [self.bridge.events_channel("other")])
        self.assertEqual(len(shard.runs), 1)            # channels not followed: nothing to read

    def test_presence_notices_through_the_channels_shard(self):
        sub = Sub()
        self.live("room", sub)
        shard = self.bridge.shard_for("room")
        self.bridge.announce("room", "join", "ann", 1)
        [(script, keys, args, d)] = shard.runs
        self.assertEqual(keys, ["msgd:{room}:presence"])          # routes it in a Redis Cluster
        self.assertEqual(args[0], self.bridge.events_channel("room"))
        self.assertEqual(args[2], "PUBLISH")
        self.bridge.pushed(shard, args[0].encode(), args[1].encode())      # as it comes back from Redis
        self.assertEqual(sub.got, [{"jsonrpc": "2.0", "method": "rpc.join",
                                    "params": {"channel": "room", "principal": "ann", "count": 1}}])

    def test_health_per_shard(self):
        self.shards[1].connected = False
        d = self.bridge.describe()
        self.assertFalse(d["connected"])
        self.assertEqual({n: v["connected"] for n, v in d["shards"].items()},
                         {"10.0.0.1:6379": True, "10.0.0.2:6379": False, "10.0.0.3:6379": True})
        names = [f"c{i}" for i in range(30)]
        self.assertEqual({n for n in names if not self.bridge.available(n)},
                         {n for n in names if self.bridge.shard_for(n) is self.shards[1]})

    def test_cluster_refuses_patterns(self):
        b, broker, clock = bridge("cluster = yes\n", [FakeShard("cluster")])
        e = self.assertRaises(errors.InvalidParams, broker.subscribe, "news.*", Sub())
        self.assertIn("cluster = yes", str(e))
        self.assertEqual(broker.patterns, {})


class ShardingTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.cleanups = []

    def tearDown(self):
        return deferToThread(lambda: [c() for c in reversed(self.cleanups)])

    def node(self, name, text) -> NodeProcess:
        n = NodeProcess(os.path.join(self.base, name), text)
        self.cleanups.append(n.stop)
        return n.start()

    def test_two_standalone_shards(self):
        return deferToThread(self._two_shards)

    def _two_shards(self):
        s1, s2 = servers.redis(), servers.redis()
        self.cleanups += [s1.cleanup, s2.cleanup]
        eps = [endpoint(s1), endpoint(s2)]
        a = self.node("a", ini("a", eps))
        b = self.node("b", ini("b", list(reversed(eps))))      # the order does not matter
        pubsub_connected(a, b, what="connected to both shards")
        ring = Rendezvous([s1.address, s2.address])
        ch1 = next(f"room{i}" for i in range(100) if ring.name(f"room{i}") == s1.address)
        ch2 = next(f"room{i}" for i in range(100) if ring.name(f"room{i}") == s2.address)

        client = Client(a)
        for ch in (ch1, ch2):
            client.call("rpc.subscribe", {"channel": ch})
        for i in range(5):
            publish(b, ch1, i)
            publish(b, ch2, i)
        for ch in (ch1, ch2):
            self.assertEqual([(e["offset"], e["data"]) for e in events(client, ch, 5)],
                             [(i + 1, i) for i in range(5)])
        # every key of a channel on its own shard
        self.assertEqual(servers.cli(s1, "get", f"test:{{{ch1}}}:offset"), "5")
        self.assertEqual(servers.cli(s2, "exists", f"test:{{{ch1}}}:offset"), "0")
        self.assertEqual(servers.cli(s2, "get", f"test:{{{ch2}}}:offset"), "5")
        shards = health(a)["pubsub"]["shards"]
        self.assertEqual(set(shards), {s1.address, s2.address})
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{b.port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        count = next(line for line in metrics.splitlines()
                     if line.startswith("msgd_pubsub_redis_latency_seconds_count"))
        self.assertGreaterEqual(float(count.split()[-1]), 10)      # B's publishes, timed on both shards

        # shard 1 goes away: only its channels are cut off
        s1.stop()
        for n in (a, b):
            wait_for(lambda: not health(n)["pubsub"]["shards"][s1.address]["connected"], what="shard 1 seen down")
        h = health(a)
        self.assertEqual(h["status"], "degraded")
        self.assertTrue(h["pubsub"]["shards"][s2.address]["connected"])
        publish(b, ch2, "still shared")
        self.assertEqual(events(client, ch2, 1)[0]["data"], "still shared")
        publish(b, ch1, "b alone")          # delivered on B only
        publish(a, ch1, "a alone")          # on A only: after a gap notification
        got = events(client, ch1, 2)
        self.assertTrue(got[0].get("gap"))
        self.assertEqual(got[1]["data"], "a alone")

        # shard 1 is back: its channels are shared again
        s1.start()
        pubsub_connected(a, b, what="shard 1 back")
        wait_for(lambda: health(a)["status"] == "ok", what="A healthy again")

        def arrives(data):
            publish(b, ch1, data)
            while True:
                ev = events(client, ch1, 1)[0]
                if ev.get("data") == data:
                    return True
        self.assertTrue(arrives("shared again"))
        client.close()

    def test_a_frozen_redis_is_noticed_by_the_keepalive(self):
        return deferToThread(self._frozen)

    def _frozen(self):
        # SIGSTOP: the connections stay open but nothing answers; only the keepalive can tell
        srv = servers.redis()
        self.cleanups.append(srv.cleanup)
        a = self.node("a", ini("a", [endpoint(srv)], extra="keepalive = 0.5s\n"))
        b = self.node("b", ini("b", [endpoint(srv)], extra="keepalive = 0.5s\n"))
        pubsub_connected(a, b)
        client = Client(a)
        client.call("rpc.subscribe", {"channel": "news"})
        publish(b, "news", "shared")
        self.assertEqual(events(client, "news", 1)[0]["data"], "shared")

        srv.signal(signal.SIGSTOP)
        self.cleanups.append(lambda: srv.signal(signal.SIGCONT))
        # noticed within two keepalives (1 s); wait_for's own bound only ends the test if it never is
        # (keepalive = 0 never gets there)
        wait_for(lambda: health(a)["status"] == "degraded", what="the frozen Redis noticed")
        self.assertFalse(health(a)["pubsub"]["connected"])
        publish(a, "news", "alone")          # answered, and delivered on A: after a gap notification
        got = events(client, "news", 2)
        self.assertTrue(got[0].get("gap"))
        self.assertEqual(got[1]["data"], "alone")

        srv.signal(signal.SIGCONT)
        pubsub_connected(a, b, what="Redis back")

        def arrives(data):
            publish(b, "news", data)
            while True:
                ev = events(client, "news", 1)[0]
                if ev.get("data") == data:
                    return True
        self.assertTrue(arrives("shared again"))
        client.close()
        with open(a.log, errors="replace") as f:
            self.assertIn("left a PING unanswered", f.read())

    def test_redis_cluster(self):
        return deferToThread(self._cluster)

    def _cluster(self):
        cluster = servers.redis_cluster()
        self.cleanups.append(cluster.cleanup)
        a = self.node("a", ini("a", [endpoint(cluster.nodes[0])], cluster=True))
        b = self.node("b", ini("b", [endpoint(cluster.nodes[1]), endpoint(cluster.nodes[2])], cluster=True))
        pubsub_connected(a, b, what="connected to the Redis Cluster")
        nodes = health(a)["pubsub"]["shards"]["cluster"]["nodes"]
        self.assertEqual(sorted(nodes), sorted(s.address for s in cluster.nodes))
        self.assertTrue(all(n["master"] and n["connected"] for n in nodes.values()))

        # channels on every master, published on B, in order on A
        channels = [f"news.{i}" for i in range(6)]
        client = Client(a)
        for ch in channels:
            self.assertEqual(client.call("rpc.subscribe", {"channel": ch})["result"]["offset"], 0)
        placed = health(a)["pubsub"]["shards"]["cluster"]["nodes"]
        self.assertTrue(all(n["channels"] > 0 for n in placed.values()), placed)    # on all three masters
        # sharded pub/sub: every channel's Redis channel is a shard channel on its master, none classic
        held = [servers.cli(srv, "pubsub", "shardchannels").split() for srv in cluster.nodes]
        self.assertEqual(sorted(sum(held, [])), sorted(f"test:{{{ch}}}:ev" for ch in channels))
        self.assertTrue(all(len(h) for h in held))
        self.assertEqual([servers.cli(srv, "pubsub", "channels") for srv in cluster.nodes], ["", "", ""])
        for i in range(40):
            for ch in channels:
                publish(b, ch, i)
        got = {ch: events(client, ch, 40) for ch in channels}
        for ch in channels:
            self.assertEqual([(e["offset"], e["data"]) for e in got[ch]], [(i + 1, i) for i in range(40)])

        # resuming on the other node
        again = Client(b)
        r = again.call("rpc.subscribe", {"channel": channels[0], "since": 38,
                                         "epoch": got[channels[0]][-1]["epoch"]})["result"]
        self.assertEqual((r["offset"], r["recovered"]), (40, True))
        self.assertEqual([e["data"] for e in again.events], [38, 39])

        # presence over both nodes; patterns refused with a clear error
        self.assertEqual(call(a.port, "rpc.presence", channels[0])["result"]["count"], 2)
        err = client.call("rpc.subscribe", {"channel": "news.*"})["error"]
        self.assertEqual(err["code"], -32602)
        self.assertIn("cluster = yes", err["message"])
        again.close()
        client.close()
