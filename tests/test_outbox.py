"""The outbox and the idempotency store, driven by a task.Clock; sqlite work
runs inline (``run_blocking`` is synchronous here)."""

import os

from twisted.internet import defer, task
from twisted.trial import unittest

from msgd.cluster.outbox import Outbox, Received
from msgd.core import errors
from msgd.core.metrics import Metrics


def inline(fn, *args, **kwargs):
    return defer.maybeDeferred(fn, *args, **kwargs)


class FakePeer:
    """Records deliveries; each answer is a Deferred the test fires."""

    def __init__(self, ordered=False, default_ttl=None):
        self.ordered = ordered
        self.default_ttl = default_ttl
        self.pending: list[tuple] = []     # (message, Deferred)
        self.seen: list[str] = []

    def deliver(self, msg):
        d = defer.Deferred()
        self.pending.append((msg, d))
        self.seen.append(msg.args[0])
        return d

    def answer(self, ok=True, error=None):
        msg, d = self.pending.pop(0)
        d.callback({"duplicate": False}) if ok else d.errback(error or errors.Unavailable("down"))
        return msg


class OutboxTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.path = os.path.join(self.mktemp(), "outbox.sqlite")
        self.peers = {"b": FakePeer()}
        self.metrics = Metrics()
        self.outbox = self.make()

    def make(self, **kw):
        box = Outbox(self.path, self.clock, inline, self.peers, metrics=self.metrics,
                     base_delay=1.0, max_delay=8.0, **kw)
        box.start()
        self.addCleanup(box.stop)
        return box

    def rows(self):
        return self.outbox.db.run(lambda c: [r[0] for r in c.execute("SELECT target FROM messages ORDER BY seq")])

    def test_written_before_send_returns_and_reloaded_after_restart(self):
        self.peers["b"] = peer = FakePeer()
        ids = [self.successResultOf(self.outbox.send("b", "m.take", [i], ttl=60)) for i in range(3)]
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(self.rows(), ["m.take"] * 3)
        self.outbox.stop()                              # as if the process died here
        again = self.make()
        self.assertEqual(list(again.queues["b"]), ids)
        self.assertEqual(peer.seen, [0, 1, 2, 0, 1, 2])   # delivered again after the "restart"

    def test_accepted_messages_are_deleted(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.take", ["x"])
        peer.answer()
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.metrics.value("msgd_outbox_delivered_total", {"peer": "b"}), 1)
        self.assertEqual(self.metrics.value("msgd_outbox_depth", {"peer": "b"}), 0)

    def test_back_off_doubles_up_to_the_maximum(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.take", ["x"])
        retried_after = []
        for _ in range(6):
            peer.answer(ok=False)
            waited = 0.0
            while not peer.pending:
                self.clock.advance(0.5)
                waited += 0.5
            retried_after.append(waited)
        self.assertEqual(retried_after, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(self.metrics.value("msgd_outbox_retries_total", {"peer": "b"}), 6)

    def test_kick_retries_at_once(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.take", ["x"])
        peer.answer(ok=False)
        self.assertEqual(peer.pending, [])
        self.outbox.kick("b")
        self.assertEqual(len(peer.pending), 1)

    def test_expired_messages_are_dropped(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.take", ["x"], ttl=3)
        peer.answer(ok=False)
        self.clock.advance(1)
        peer.answer(ok=False)                 # next try would be at +2 s after now = past expiry
        self.clock.advance(5)
        self.assertEqual(peer.pending, [])
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.metrics.value("msgd_outbox_dropped_total", {"peer": "b", "reason": "expired"}), 1)

    def test_expiring_in_flight_then_failing_is_dropped_not_retried(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.take", ["x"], ttl=3)
        self.clock.advance(4)                 # expires while its delivery is out
        peer.answer(ok=False)
        self.assertEqual(self.rows(), [])
        self.clock.advance(10)
        self.assertEqual(peer.pending, [])
        self.assertEqual(self.metrics.value("msgd_outbox_dropped_total", {"peer": "b", "reason": "expired"}), 1)

    def test_expiry_waits_for_no_retry(self):
        """A message waiting out a long back-off is dropped when its ttl ends."""
        peer = self.peers["b"]
        self.outbox.max_delay = self.outbox.base_delay = 100.0
        self.outbox.send("b", "m.take", ["x"], ttl=10)
        peer.answer(ok=False)                 # next try in 100 s
        self.clock.advance(10)
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.metrics.value("msgd_outbox_dropped_total", {"peer": "b", "reason": "expired"}), 1)

    def test_bookkeeping_stays_bounded(self):
        """Delivered messages leave nothing behind in the scheduling heaps,
        however long their ttl."""
        peer = self.peers["b"]
        for i in range(500):
            self.outbox.send("b", "m.take", [i], ttl=86400)
            peer.answer()
        self.assertEqual(len(self.outbox.queues["b"]), 0)
        self.assertLessEqual(len(self.outbox._expiry["b"]) + len(self.outbox._due["b"]), 128)

    def test_bookkeeping_stays_bounded_for_an_ordered_peer(self):
        self.peers["o"] = peer = FakePeer(ordered=True)
        for i in range(500):
            self.outbox.send("o", "m.take", [i], ttl=86400)
            peer.answer(ok=False)             # a retry first, then accepted
            self.clock.advance(1)
            peer.answer()
        self.assertEqual((len(self.outbox.queues["o"]), len(peer.seen)), (0, 1000))
        self.assertLessEqual(len(self.outbox._expiry["o"]) + len(self.outbox._due["o"]), 128)

    def test_refused_for_good_is_dropped(self):
        peer = self.peers["b"]
        self.outbox.send("b", "m.nothing", ["x"])
        peer.answer(ok=False, error=errors.NotFound("no such target"))
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.metrics.value("msgd_outbox_dropped_total", {"peer": "b", "reason": "rejected"}), 1)

    def test_unordered_sends_a_window_at_once(self):
        self.outbox.window = 3
        peer = self.peers["b"]
        for i in range(5):
            self.outbox.send("b", "m.take", [i])
        self.assertEqual(peer.seen, [0, 1, 2])
        peer.answer()
        self.assertEqual(peer.seen, [0, 1, 2, 3])

    def test_ordered_peer_gets_one_at_a_time_in_order(self):
        self.peers["b"] = peer = FakePeer(ordered=True)
        for i in range(3):
            self.outbox.send("b", "m.take", [i])
        self.assertEqual(peer.seen, [0])
        peer.answer(ok=False)                 # a failing head holds the others back
        self.clock.advance(1)
        self.assertEqual(peer.seen, [0, 0])
        peer.answer()
        self.assertEqual(peer.seen, [0, 0, 1])
        peer.answer()
        peer.answer()
        self.assertEqual(peer.seen, [0, 0, 1, 2])
        self.assertEqual(self.rows(), [])

    def test_many_messages_to_a_down_peer(self):
        """Deliveries that fail at once (no connection) do not recurse."""
        class Down(FakePeer):
            def deliver(self, msg):
                raise errors.Unavailable("not connected")
        self.peers["b"] = Down()
        self.outbox.window = 5000
        for i in range(3000):
            self.outbox.send("b", "m.take", [i])
        self.outbox.stop()
        again = self.make(window=5000)          # loads 3000 messages, all due at once
        self.assertEqual(len(again.queues["b"]), 3000)
        self.assertEqual(again.in_flight["b"], set())

    def test_depth_and_age_metrics(self):
        self.outbox.send("b", "m.take", [1])
        self.clock.advance(30)
        self.outbox.send("b", "m.take", [2])
        self.assertEqual(self.metrics.value("msgd_outbox_depth", {"peer": "b"}), 2)
        self.assertEqual(self.metrics.value("msgd_outbox_oldest_seconds", {"peer": "b"}), 30)

    def test_the_callers_id_sent_again_is_one_message(self):
        peer = self.peers["b"]
        self.assertEqual(self.successResultOf(self.outbox.send("b", "m.take", [1], message_id="order-7")), "order-7")
        self.assertEqual(self.successResultOf(self.outbox.send("b", "m.take", [1], message_id="order-7")), "order-7")
        self.assertEqual((self.rows(), peer.seen), (["m.take"], [1]))
        self.failureResultOf(self.outbox.send("b", "m.take", [1], message_id=""), errors.InvalidParams)
        self.failureResultOf(self.outbox.send("b", "m.take", [1], message_id="x" * 201), errors.InvalidParams)

    def test_unknown_peer_and_bad_arguments(self):
        self.failureResultOf(self.outbox.send("nobody", "m.take", [1]), errors.NotFound)
        self.failureResultOf(self.outbox.send("b", "m.take", [object()]), errors.InvalidParams)

    def test_default_ttl_of_the_peer(self):
        self.peers["b"] = FakePeer(default_ttl=10)
        self.outbox.send("b", "m.take", [1])
        msg = self.peers["b"].pending[0][0]
        self.assertEqual(msg.expires, msg.created + 10)


class ReceivedTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.store = Received(os.path.join(self.mktemp(), "received.sqlite"), self.clock, inline, retention=100)
        self.addCleanup(self.store.close)
        self.calls = []

    def handler(self, value="x"):
        def run():
            self.calls.append(value)
        return run

    def test_duplicates_dropped_within_retention(self):
        self.assertFalse(self.successResultOf(self.store.handle("m1", self.handler())))
        self.assertTrue(self.successResultOf(self.store.handle("m1", self.handler())))
        self.clock.advance(101)
        self.assertFalse(self.successResultOf(self.store.handle("m1", self.handler())))
        self.assertEqual(self.calls, ["x", "x"])

    def test_copy_arriving_during_handling_waits(self):
        gate = defer.Deferred()
        first = self.store.handle("m1", lambda: gate)
        second = self.store.handle("m1", self.handler())
        self.assertNoResult(second)
        gate.callback(None)
        self.assertFalse(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        self.assertEqual(self.calls, [])

    def test_handler_outliving_its_caller_is_remembered(self):
        """A PB connection that drops cancels the Deferred of its send(); the
        handler (a thread, which nothing stops) goes on.  Its id is recorded
        when it finishes, and the sender's redelivery meanwhile joins it
        instead of running it a second time."""
        thread = defer.Deferred()          # no canceller, like deferToThreadPool's
        first = self.store.handle("m1", lambda: thread)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        again = self.store.handle("m1", self.handler())
        self.assertNoResult(again)
        thread.callback(None)
        self.assertTrue(self.successResultOf(again))
        self.assertTrue(self.successResultOf(self.store.handle("m1", self.handler())))
        self.assertEqual(self.calls, [])

    def test_cancelled_caller_of_a_failing_handler_leaves_it_to_the_retry(self):
        thread = defer.Deferred()
        first = self.store.handle("m1", lambda: thread)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        thread.errback(errors.ApplicationError("no"))
        self.assertFalse(self.successResultOf(self.store.handle("m1", self.handler())))
        self.assertEqual(self.calls, ["x"])

    def test_failed_handler_is_not_remembered(self):
        def boom():
            raise errors.ApplicationError("no")
        self.failureResultOf(self.store.handle("m1", boom), errors.ApplicationError)
        self.assertFalse(self.successResultOf(self.store.handle("m1", self.handler())))
        self.assertEqual(self.calls, ["x"])

    def test_survives_reopening(self):
        self.successResultOf(self.store.handle("m1", self.handler()))
        self.store.close()
        again = Received(self.store.db.path, self.clock, inline)
        self.assertTrue(self.successResultOf(again.handle("m1", self.handler())))
        again.close()
