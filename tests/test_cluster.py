"""Several real nodes (twistd processes on loopback) sharing pub/sub through
a private Redis and calling each other over PB.

Every scenario is blocking code (processes, sockets, websocket-client) run
in a thread with deferToThread, so the trial reactor never blocks."""

from __future__ import annotations

import os
import signal

from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.core.pubsub import Broker
from tests import servers
from tests.helpers import FakeBackend, shared
from tests.process import Client, NodeProcess, call, health, post, publish, pubsub_connected, wait_for
from tests.servers import free_port

USERS = "peer:s3cret"


def node_ini(name: str, pb_port: int, redis, peers: dict | None = None, timeout: str = "10s",
             threads: int = 10) -> str:
    text = f"""
[node]
name = {name}
request_timeout = {timeout}
reload_interval = 0
threads = {threads}

[interface:web]
type = http
endpoint = tcp:{{port}}:interface=127.0.0.1

[interface:pb]
type = pb
endpoint = tcp:{pb_port}:interface=127.0.0.1
users = {USERS}
"""
    if redis is not None:
        text += f"""
[pubsub]
backend = redis
redis = tcp:host=127.0.0.1:port={redis.port}
prefix = test
"""
    for peer, port in (peers or {}).items():
        text += f"""
[peer:{peer}]
endpoints = tcp:host=127.0.0.1:port={port}
username = peer
password = s3cret
max_retry_delay = 0.5s
"""
    return text


APPS = {
    "work.py": '''
from msgd import api
log = []

async def slow(seconds: float):
    log.append("started")
    try:
        await api.sleep(seconds)
    except BaseException:
        log.append("cancelled")
        raise
    return "done"

def state():
    return log

async def ask(peer: str, target: str, *args):
    return await api.peer(peer).call(target, *args)

async def burst(peer: str, n: int, target: str = "work.take"):
    from twisted.internet import defer
    ids = await defer.gatherResults([api.peer(peer).send(target, i) for i in range(n)])
    return len(set(ids))

@api.blocking
def take(i):
    with open("handled.txt", "a") as f:
        f.write(f"{i}\\n")

@api.blocking
def take_slowly(i):
    import time
    time.sleep(0.05)
    take(i)
''',
}


def handled(node: NodeProcess) -> list[str]:
    """What ``work.take`` wrote down on ``node``, one line per message."""
    path = os.path.join(node.base, "handled.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


class Sub:
    principal = None

    def __init__(self):
        self.got = []

    def deliver(self, ev):
        self.got.append(("gap", ev.offset) if ev.gap else (ev.offset, ev.data))


class BrokerSharingTests(unittest.TestCase):
    """The broker's side of a shared backend (msgd/core/pubsub.py)."""

    def setUp(self):
        self.broker = Broker(task.Clock(), history_size=10, gc_interval=0)
        self.backend = FakeBackend(self.broker)

    def live(self, sub, epoch="E1", offset=0, events=()):
        d = self.broker.subscribe("c", sub)
        self.backend.join("c", epoch, offset, list(events))
        return self.successResultOf(d)

    def test_publish_goes_to_the_backend_and_delivery_comes_back(self):
        sub = Sub()
        self.live(sub, offset=6)
        d = self.broker.publish("c", "x")
        self.assertEqual(sub.got, [])                   # not delivered until it comes back
        self.backend.published[0][2].callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertTrue(self.broker.receive(shared(7, "x")))
        self.assertEqual(sub.got, [(7, "x")])

    def test_subscribe_waits_for_the_shared_state_and_replays_in_order(self):
        sub = Sub()
        d = self.broker.subscribe("c", sub, since=3, epoch="E1")
        self.assertNoResult(d)
        self.backend.join("c", "E1", 5, [shared(4, "four"), shared(5, "five")])
        answer = self.successResultOf(d)
        self.assertEqual(answer, {"channel": "c", "epoch": "E1", "offset": 5, "recovered": True})
        self.assertEqual(sub.got, [(4, "four"), (5, "five")])
        self.broker.receive(shared(6, "next"))
        self.assertEqual(sub.got[-1], (6, "next"))

    def test_other_epoch_is_not_recovered(self):
        d = self.broker.subscribe("c", Sub(), since=3, epoch="OLD")
        self.backend.join("c", "E1", 5, [shared(4, "four"), shared(5, "five")])
        self.assertFalse(self.successResultOf(d)["recovered"])

    def test_no_state_without_subscribers(self):
        sub = Sub()
        self.live(sub, offset=2)
        self.assertIn("c", self.backend.following)
        self.broker.unsubscribe("c", sub)
        self.assertNotIn("c", self.broker.channels)
        self.assertNotIn("c", self.backend.following)
        # an event still on its way reaches nobody and leaves nothing behind
        self.assertTrue(self.broker.receive(shared(3, "late")))
        self.assertNotIn("c", self.broker.channels)

    def test_leaving_while_joining_unfollows(self):
        sub = Sub()
        d = self.broker.subscribe("c", sub)
        self.broker.unsubscribe("c", sub)
        self.assertNotIn("c", self.backend.following)
        self.backend.join("c", "E1", 0, [])
        self.assertFalse(self.successResultOf(d)["recovered"])
        self.assertNotIn("c", self.broker.channels)

    def test_a_gap_is_reported_not_repaired_silently(self):
        sub = Sub()
        self.live(sub, offset=2)
        self.assertFalse(self.broker.receive(shared(5, "e")))    # the backend reads the channel again
        self.assertEqual(sub.got, [])
        self.assertTrue(self.broker.receive(shared(5, "e"), force=True))
        self.assertEqual(sub.got, [("gap", 4), (5, "e")])

    def test_resync_replays_what_history_covers(self):
        sub = Sub()
        self.live(sub, offset=2)
        self.broker.resync("c", "E1", 4, [shared(2, "b"), shared(3, "c"), shared(4, "d")])
        self.assertEqual(sub.got, [(3, "c"), (4, "d")])

    def test_resync_without_the_history_is_a_gap(self):
        sub = Sub()
        self.live(sub, offset=2)
        self.broker.resync("c", "E1", 9, [shared(8, "h"), shared(9, "i")])
        self.assertEqual(sub.got, [("gap", 7), (8, "h"), (9, "i")])      # what there is, after the gap
        self.broker.resync("c", "E2", 1, [shared(1, "a", epoch="E2")])    # Redis lost the channel
        self.assertEqual(sub.got[3:], [("gap", 0), (1, "a")])
        self.assertEqual(self.broker.channels["c"].epoch, "E2")

    def test_outage_publishes_locally_under_a_new_epoch_announced_first(self):
        sub = Sub()
        self.live(sub, offset=2)
        self.backend.connected = False
        self.assertEqual(self.successResultOf(self.broker.publish("c", "alone")), 3)
        self.assertEqual(sub.got, [("gap", 2), (3, "alone")])
        self.assertNotEqual(self.broker.channels["c"].epoch, "E1")
        self.assertEqual(self.backend.forks, {"c"})
        # back: Redis has what others published meanwhile: replayed after the local ones
        self.backend.connected = True
        self.broker.resync("c", "E1", 3, [shared(3, "elsewhere")])
        self.assertEqual(sub.got[2:], [("gap", 2), (3, "elsewhere")])    # the local epoch ends, said so
        self.assertEqual(self.broker.channels["c"].epoch, "E1")

    def test_failed_shared_publish_is_delivered_here(self):
        sub = Sub()
        self.live(sub, offset=0)
        d = self.broker.publish("c", "x")
        self.backend.published[0][2].errback(ConnectionError("lost"))
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(sub.got, [("gap", 0), (1, "x")])

    def test_patterns_are_watched_while_they_have_subscribers(self):
        sub = Sub()
        self.broker.subscribe("n.*", sub)
        self.assertEqual(self.backend.watching, {"n.*"})
        self.broker.receive(shared(4, "x", channel="n.a"))
        self.assertEqual(sub.got, [(4, "x")])
        self.assertEqual(self.broker.channels, {})
        self.broker.pattern_gap()
        self.assertEqual(sub.got[-1], ("gap", 0))
        self.broker.unsubscribe("n.*", sub)
        self.assertEqual(self.backend.watching, set())


class NodesCase(unittest.TestCase):
    """Real node processes (and a private Redis), stopped after the test."""

    def setUp(self):
        self.nodes: list[NodeProcess] = []
        self.redis = None

    def tearDown(self):
        return deferToThread(self._cleanup)

    def _cleanup(self):
        for n in self.nodes:
            n.stop()
        if self.redis is not None:
            self.redis.cleanup()

    def node(self, name, pb_port, redis, peers=None, **kw) -> NodeProcess:
        n = NodeProcess(os.path.join(self.base, name), node_ini(name, pb_port, redis, peers, **kw), APPS)
        self.nodes.append(n)
        return n

    def run_scenario(self, fn):
        self.base = os.path.abspath(self.mktemp())
        return deferToThread(fn)


class ClusterTests(NodesCase):

    # -- three nodes -----------------------------------------------------------------

    def test_three_nodes(self):
        return self.run_scenario(self._three_nodes)

    def _three_nodes(self):
        self.redis = servers.redis()
        pa, pb_, pc = free_port(), free_port(), free_port()
        a = self.node("a", pa, self.redis, {"b": pb_, "c": pc}, timeout="1s")
        b = self.node("b", pb_, self.redis)
        c = self.node("c", pc, self.redis)
        for n in (b, c, a):
            n.start()
        pubsub_connected(a, b, c, what="connected to Redis")

        # a WebSocket client on A gets what B and C publish, each event once
        client = Client(a)
        sub = client.call("rpc.subscribe", {"channel": "room"})["result"]
        for i in range(5):
            publish(b, "room", f"b{i}")
            publish(c, "room", f"c{i}")
        publish(a, "room", "end")
        got = []
        while True:
            ev = client.event()
            if ev["data"] == "end":
                break
            got.append(ev)
        self.assertEqual(sorted(e["data"] for e in got), sorted([f"b{i}" for i in range(5)] + [f"c{i}" for i in range(5)]))
        self.assertEqual([e["offset"] for e in got], list(range(sub["offset"] + 1, sub["offset"] + 11)))
        last, epoch = got[-1]["offset"] + 1, got[-1]["epoch"]
        client.close()

        # it reconnects to B with since: what was published meanwhile is replayed
        publish(c, "room", "missed-1")
        publish(a, "room", "missed-2")
        again = Client(b)
        answer = again.call("rpc.subscribe", {"channel": "room", "since": last, "epoch": epoch})["result"]
        self.assertTrue(answer["recovered"])
        self.assertEqual([(e["offset"], e["data"]) for e in again.events],
                         [(last + 1, "missed-1"), (last + 2, "missed-2")])
        again.close()

        # an app on A calls C through the peer API; C enforces A's deadline (1 s)
        wait_for(lambda: health(a)["peers"]["c"]["connected"], what="A connected to C")
        self.assertEqual(call(a.port, "work.ask", "c", "work.slow", 0)["result"], "done")
        r = call(a.port, "work.ask", "c", "work.slow", 30)
        self.assertEqual(r["error"]["code"], -32002)
        wait_for(lambda: call(c.port, "work.state")["result"] == ["started", "started", "cancelled"],
                 timeout=10, what="C cancelled the call")

    # -- durability ----------------------------------------------------------------------

    def test_outbox_survives_sigkill(self):
        return self.run_scenario(self._durability)

    def _durability(self):
        pa, pb_ = free_port(), free_port()
        a = self.node("a", pa, None, {"b": pb_})
        b = self.node("b", pb_, None)
        a.start()
        r = post(a.port, {"jsonrpc": "2.0", "id": 1, "method": "work.burst", "params": ["b", 1000]}, timeout=60)
        self.assertEqual(r.get("result"), 1000, r)
        a.signal(signal.SIGKILL)
        a.wait(10)
        a.start()
        wait_for(lambda: health(a)["outbox"].get("b", {}).get("depth") == 1000, what="outbox reloaded")
        b.start()
        wait_for(lambda: health(a)["outbox"]["b"]["depth"] == 0, timeout=60, what="outbox drained")
        got = handled(b)
        self.assertEqual(len(got), 1000)
        self.assertEqual(sorted(map(int, got)), list(range(1000)))

    def test_sender_killed_during_delivery(self):
        def scenario():
            n = 500
            twice, lost = self.sender_killed(n)
            self.assertEqual((twice, lost), (0, 0), f"of {n}: {twice} handled again, {lost} lost")
        return self.run_scenario(scenario)

    def sender_killed(self, n: int) -> tuple[int, int]:
        """A is SIGKILLed while B's blocking handler works through A's ``n``
        messages (a few running, the rest of the window queued for B's
        threads), then restarted; once A's outbox is drained, how many
        messages B handled more than once, and how many never (both must be
        0).  ``python -m bench faults sender-killed`` runs it at 1,000."""
        pa, pb_ = free_port(), free_port()
        a = self.node("a", pa, None, {"b": pb_})
        b = self.node("b", pb_, None, threads=4)
        b.start()
        a.start()
        wait_for(lambda: health(a)["peers"]["b"]["connected"], what="A connected to B")
        r = post(a.port, {"jsonrpc": "2.0", "id": 1, "method": "work.burst", "params": ["b", n, "work.take_slowly"]},
                 timeout=60)
        self.assertEqual(r.get("result"), n, r)        # all n written: none may be lost
        wait_for(lambda: len(handled(b)) >= n // 5, what="B handling")
        a.signal(signal.SIGKILL)
        a.wait(10)
        self.assertLess(len(handled(b)), n, "A was killed after the delivery")
        a.start()
        wait_for(lambda: health(a)["outbox"].get("b", {}).get("depth") == 0, timeout=120, what="outbox drained")
        b.stop()                                       # lets B's threads finish what they were given
        counts = {}
        for i in map(int, handled(b)):
            counts[i] = counts.get(i, 0) + 1
        twice = sum(c - 1 for c in counts.values())
        lost = n - len(counts)
        return twice, lost

    # -- Redis outage ------------------------------------------------------------------------

    def test_redis_outage(self):
        return self.run_scenario(self._outage)

    def _outage(self):
        self.redis = servers.redis()
        a = self.node("a", free_port(), self.redis)
        b = self.node("b", free_port(), self.redis)
        a.start()
        b.start()
        pubsub_connected(a, b, what="connected to Redis")
        client = Client(a)
        client.call("rpc.subscribe", {"channel": "news"})
        publish(b, "news", "before")
        self.assertEqual(client.event()["data"], "before")

        self.redis.stop()
        wait_for(lambda: not health(a)["pubsub"]["connected"], what="A sees the outage")
        h = health(a)
        self.assertEqual(h["status"], "degraded")
        self.assertIn("lost", h["pubsub"]["error"])
        for i in range(20):                    # traffic while Redis is away
            publish(a, "news", f"local-{i}")
            publish(b, "news", f"b-alone-{i}")
        # delivered here, after a gap notification: what B publishes no longer arrives
        self.assertTrue(client.event().get("gap"))
        self.assertEqual([client.event()["data"] for _ in range(20)], [f"local-{i}" for i in range(20)])

        self.redis.start()
        pubsub_connected(a, b, what="reconnected to Redis")
        publish(b, "news", "after")
        # Redis came back empty: the channel goes on under a new epoch, announced by gap
        # notifications (A's resync, and the gap markers A and B publish for their lone events)
        got = []
        while not got or got[-1].get("data") != "after":
            got.append(client.event())
        self.assertTrue(got[0].get("gap"))
        self.assertTrue(all(e.get("gap") for e in got[:-1]), got)
        self.assertEqual(health(a)["status"], "ok")
        self.assertIsNone(a.proc.poll())
        self.assertIsNone(b.proc.poll())
        client.close()
