"""No silent gap, ever (docs/cluster.rst): three real nodes sharing pub/sub
through a private Redis, subscribers on each, 5,000 numbered events
published round-robin on the three nodes while one node is SIGKILLed and
started again and Redis is killed for two seconds and started again.

Every subscriber's sequence must be complete and in order, or carry an
explicit signal (``rpc.gap``, or ``recovered: false`` when it resubscribes)
at each hole: between two events it received, every number published
(acknowledged) in between must be there unless a signal came between them.
Within one epoch, offsets must follow one another.  The violations are
counted; there must be none.

Blocking code (processes, websocket-client) runs in threads; the trial
reactor never blocks."""

from __future__ import annotations

import json
import signal
import threading
import time

import websocket
from twisted.trial import unittest

from tests import servers
from tests.process import NodeProcess
from tests.servers import free_port
from tests.process import pubsub_connected
from tests.test_cluster import NodesCase

EVENTS = 5000
KILL_NODE, RESTART_NODE, KILL_REDIS = 1200, 1800, 2600
REDIS_AWAY = 2.0          # seconds


class Subscriber(threading.Thread):
    """One subscriber of channel ``s``: records what it gets; when its
    connection drops it resubscribes (its home node first, else another)
    from the last position it had."""

    def __init__(self, name: str, nodes: list[NodeProcess], stop: threading.Event):
        super().__init__(daemon=True, name=name)
        self.nodes = nodes
        self.stop_flag = stop
        self.items: list[tuple] = []     # ("event", n, epoch, offset) | ("gap", epoch, offset) | ("answer", ...)
        self.pos: tuple | None = None
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.reconnects = 0

    def run(self):
        while not self.stop_flag.is_set():
            for node in self.nodes:
                try:
                    self.serve(node)
                except (OSError, websocket.WebSocketException):
                    pass
                if self.stop_flag.is_set():
                    return
            time.sleep(0.1)

    def serve(self, node):
        ws = websocket.create_connection(f"ws://127.0.0.1:{node.port}/ws", timeout=1, subprotocols=["jsonrpc"])
        try:
            params = {"channel": "s"}
            if self.pos is not None:
                params.update(since=self.pos[1], epoch=self.pos[0])
                self.reconnects += 1
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": params}))
            while not self.stop_flag.is_set():
                try:
                    m = json.loads(ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if m.get("id") == 1:
                    r = m["result"]
                    self.items.append(("answer", r["recovered"] or "since" not in params, r["epoch"], r["offset"]))
                    self.pos = (r["epoch"], r["offset"])
                    self.ready.set()
                elif m.get("method") == "rpc.gap":
                    p = m["params"]
                    self.items.append(("gap", p["epoch"], p["offset"]))
                    self.pos = (p["epoch"], p["offset"])
                elif m.get("method") == "rpc.event":
                    p = m["params"]
                    if "end" in p["data"]:
                        if not self.ended.is_set():
                            self.items.append(("end",))
                        self.ended.set()
                    else:
                        self.items.append(("event", p["data"]["n"], p["epoch"], p["offset"]))
                    self.pos = (p["epoch"], p["offset"])
        finally:
            ws.close()


def violations(items: list[tuple], acked: list[int], start: int, late_from: int) -> list[str]:
    """What breaks the promise in one subscriber's sequence.

    - Between two events with no signal between them: offsets follow one
      another in one epoch, numbers go up, and every number published
      (acknowledged) in between is there — for numbers below ``late_from``.
    - A number at or above ``late_from`` (published from the Redis outage on)
      may be signalled later: while cut off from Redis a node delivers only
      its own events, and the others hear of its events by a gap marker when
      it is back (docs/cluster.rst).  Such a hole must be signalled before
      the subscriber's end (the ``("end",)`` item).
    ``start``: numbers at or below it came before the subscription."""
    out = []
    received = {it[1] for it in items if it[0] == "event"}
    pos, last_n, signalled, pending = None, start, True, set()

    def missing(low, high):
        return [x for x in acked if low < x < high and x not in received]

    for item in items:
        kind = item[0]
        if kind == "answer":
            _, recovered, epoch, offset = item
            if not recovered:
                signalled = True
            elif pos is not None and (epoch, offset) != pos and not signalled:
                out.append(f"resumed at {epoch}/{offset} but was at {pos}")
            pos = (epoch, offset)
        elif kind == "gap":
            signalled = True
            pending.clear()
            pos = (item[1], item[2])
        elif kind == "end":
            if pending:
                out.append(f"events {sorted(pending)[:5]} missing, never signalled")
            if missing(last_n, acked[-1] + 1 if acked else 0) and not signalled:
                out.append(f"events {missing(last_n, acked[-1] + 1)[:5]} missing at the end")
        else:
            _, n, epoch, offset = item
            if not signalled:
                if n <= last_n:
                    out.append(f"event {n} after {last_n}: out of order or twice")
                if epoch != pos[0]:
                    out.append(f"event {n}: epoch {epoch} after {pos[0]} without a signal")
                elif offset != pos[1] + 1:
                    out.append(f"event {n}: offset {offset} after {pos[1]} without a signal")
                holes = missing(last_n, n)
                early = [x for x in holes if x < late_from]
                if early:
                    out.append(f"events {early[:5]} missing between {last_n} and {n} without a signal")
                pending.update(x for x in holes if x >= late_from)
            pos = (epoch, offset)
            last_n = n
            signalled = False
    return out


class NoSilentGapTests(NodesCase):

    def setUp(self):
        super().setUp()
        self.stop = threading.Event()
        self.addCleanup(self.stop.set)      # the subscribers' threads end

    def test_kill_a_node_and_redis_under_traffic(self):
        return self.run_scenario(self._scenario)

    def _scenario(self):
        self.redis = servers.redis()
        a, b, c = (self.node(n, free_port(), self.redis) for n in "abc")
        for n in self.nodes:
            n.start()
        pubsub_connected(*self.nodes, what="connected to Redis")

        homes = {"a": [a, b, c], "b": [b, c, a], "c": [c, a, b]}
        subs = {}
        for name, order in homes.items():
            for k in range(2):
                s = subs[f"{name}{k}"] = Subscriber(f"{name}{k}", order, self.stop)
                s.start()
        for s in subs.values():
            self.assertTrue(s.ready.wait(20), f"{s.name} subscribed")
        starts = {name: 0 for name in subs}

        acked: list[int] = []
        conns: dict = {}

        def publish(i: int, data) -> bool:
            for k in range(3):
                node = self.nodes[(i + k) % 3]
                try:
                    ws = conns.get(node)
                    if ws is None:
                        ws = conns[node] = websocket.create_connection(
                            f"ws://127.0.0.1:{node.port}/ws", timeout=5, subprotocols=["jsonrpc"])
                    ws.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "rpc.publish",
                                        "params": {"channel": "s", "data": data}}))
                    while True:
                        m = json.loads(ws.recv())
                        if m.get("id") == i:
                            return "result" in m
                except (OSError, websocket.WebSocketException):
                    conns.pop(node, None)
            return False

        redis_back = None
        t0 = time.monotonic()
        for i in range(1, EVENTS + 1):
            if i == KILL_NODE:
                c.signal(signal.SIGKILL)
                c.wait(10)
            elif i == RESTART_NODE:
                c.start(wait=False)
            elif i == RESTART_NODE + 300:
                c.wait_ready()
                late = subs["c-late"] = Subscriber("c-late", [c], self.stop)
                late.start()
                self.assertTrue(late.ready.wait(20), "a subscriber on the restarted node")
                starts["c-late"] = acked[-1] if acked else 0
            elif i == KILL_REDIS:
                self.redis.stop(signal.SIGKILL)
                redis_back = time.monotonic() + REDIS_AWAY
            if redis_back is not None and time.monotonic() >= redis_back:
                self.redis.start()
                redis_back = None
            if publish(i, {"n": i}):
                acked.append(i)
        if redis_back is not None:
            time.sleep(max(0.0, redis_back - time.monotonic()))
            self.redis.start()
        published = time.monotonic() - t0

        pubsub_connected(*self.nodes, what="reconnected to Redis")
        # a last event through Redis that every subscriber must get: it is live again
        for k in range(50):
            publish(k, {"end": k})
            if all(s.ended.wait(0.2) for s in subs.values()):
                break
        for ws in conns.values():
            ws.close()
        self.stop.set()
        not_ended = [name for name, s in subs.items() if not s.ended.is_set()]
        for s in subs.values():
            s.join(5)

        report = {}
        for name, s in subs.items():
            v = violations(s.items, [x for x in acked if x > starts[name]], starts[name], KILL_REDIS)
            if v:
                report[name] = v[:5]
        received = {name: sum(1 for it in s.items if it[0] == "event") for name, s in subs.items()}
        signals = {name: sum(1 for it in s.items if it[0] == "gap" or (it[0] == "answer" and not it[1]))
                   for name, s in subs.items()}
        summary = (f"{len(acked)} of {EVENTS} published in {published:.1f}s; received {received}; "
                   f"signals {signals}; reconnects { {n: s.reconnects for n, s in subs.items()} }")
        self.assertEqual(not_ended, [], summary)
        self.assertEqual(report, {}, summary + "\n" + json.dumps(report, indent=1))
        # the scenario did what it says: c's subscribers moved, holes were signalled
        self.assertGreater(len(acked), EVENTS * 0.9, summary)
        self.assertTrue(all(subs[f"c{k}"].reconnects for k in range(2)), summary)
        self.assertTrue(all(signals[name] for name in subs if name != "c-late"), summary)
        print(summary)


class CheckerTests(unittest.TestCase):
    """The checker above finds what it must (a test that cannot fail is no test)."""

    def check(self, items, acked, late_from=100):
        return violations([("answer", True, "E", 0)] + items + [("end",)], acked, 0, late_from)

    def test_complete_sequence(self):
        self.assertEqual(self.check([("event", n, "E", n) for n in range(1, 6)], [1, 2, 3, 4, 5]), [])

    def test_silent_hole(self):
        self.assertEqual(len(self.check([("event", 1, "E", 1), ("event", 3, "E", 2)], [1, 2, 3])), 1)

    def test_hole_in_offsets(self):
        self.assertEqual(len(self.check([("event", 1, "E", 1), ("event", 2, "E", 3)], [1, 2])), 1)

    def test_silent_epoch_change(self):
        self.assertEqual(len(self.check([("event", 1, "E", 1), ("event", 2, "F", 2)], [1, 2])), 1)

    def test_signalled_holes(self):
        items = [("event", 1, "E", 1), ("gap", "F", 7), ("event", 4, "F", 8), ("answer", False, "G", 3),
                 ("event", 6, "G", 4)]
        self.assertEqual(self.check(items, [1, 2, 3, 4, 5, 6]), [])

    def test_twice_and_missing_end(self):
        v = self.check([("event", 1, "E", 1), ("event", 1, "E", 1)], [1, 2])
        self.assertTrue(any("twice" in x for x in v) and any("at the end" in x for x in v), v)

    def test_late_holes_signalled_later_or_never(self):
        items = [("event", 1, "E", 1), ("event", 3, "E", 2), ("gap", "F", 0), ("event", 4, "F", 1)]
        self.assertEqual(self.check(items, [1, 2, 3, 4], late_from=2), [])
        items = [("event", 1, "E", 1), ("event", 3, "E", 2), ("event", 4, "E", 3)]
        self.assertEqual(len(self.check(items, [1, 2, 3, 4], late_from=2)), 1)
