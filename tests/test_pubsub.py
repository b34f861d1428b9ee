"""The broker's history (msgd/core/pubsub.py), transport-free, on a task.Clock:
what an event kept in history holds, and the node-wide bound on history memory."""

import gc
import tracemalloc

from twisted.internet import task
from twisted.trial import unittest

from msgd import config
from msgd.core.jsonrpc import dumps, kept, loads
from msgd.core.metrics import Metrics
from msgd.core import errors
from msgd.cluster import redis_pubsub
from msgd.core.pubsub import EVENT_OVERHEAD, Broker, Event, Session, framed, presence_notice


class Framer:
    """Like MsgdWebSocket.deliver: frames each event once, in its cache."""
    principal = None

    def __init__(self):
        self.frames = []

    def deliver(self, ev):
        self.frames.append(framed(ev, "ws", lambda note: b"\x81" + note))


def publish(broker, channel, n, size=100, start=0):
    for i in range(start, start + n):
        broker.publish(channel, {"n": i, "p": "x" * size})


def held(broker) -> int:
    return sum(ev.size() for ch in broker.channels.values() for ev in ch.history)


class EventTests(unittest.TestCase):

    def test_notification_is_the_json_rpc_event(self):
        ev = Event("news.a", 1234, "0123456789ab", {"b": [1, 2.5, None], "s": "é\"\\"}, 0.0)
        expected = {"jsonrpc": "2.0", "method": "rpc.event",
                    "params": {"channel": "news.a", "offset": 1234, "epoch": "0123456789ab",
                               "data": {"b": [1, 2.5, None], "s": "é\"\\"}}}
        self.assertEqual(ev.notification(), dumps(expected))
        self.assertEqual(ev.data_json(), dumps(expected["params"]["data"]))
        self.assertEqual(loads(ev.notification()), expected)

    def test_data_past_64_bits_falls_back_to_the_stdlib(self):
        ev = Event("c", 1, "e", {"big": 2 ** 70}, 0.0)
        self.assertEqual(loads(ev.notification())["params"]["data"], {"big": 2 ** 70})

    def test_a_resting_event_keeps_only_its_notification(self):
        data = {"n": 1, "p": "x" * 50}
        ev = Event("c", 7, "e", data, 0.0)
        ev.cache["ws"] = b"frame"
        note = ev.notification()
        ev.rest()
        self.assertIsNone(ev.cache)
        self.assertIs(ev.notification(), note)
        self.assertEqual(ev.data, data)                 # decoded again from the notification
        self.assertEqual(ev.data_json(), dumps(data))
        self.assertEqual(ev.size(), len(note) + EVENT_OVERHEAD)

    def test_kept_is_a_right_sized_equal_copy(self):
        b = dumps({"a": 1})
        self.assertEqual(kept(b), b)
        tracemalloc.start()
        try:
            copies = [kept(dumps({"a": i})) for i in range(200)]      # each original made and dropped here
            per_copy = tracemalloc.get_traced_memory()[0] / len(copies)
        finally:
            tracemalloc.stop()
        self.assertLess(per_copy, 200)                  # not orjson's 4 KB buffer


class RetentionTests(unittest.TestCase):

    def test_history_holds_at_most_twice_the_encoded_events(self):
        """orjson 3.12+ bytes keep a 4 KB buffer: kept as they are, each
        100-byte event in history would hold more than 4 KB."""
        broker = Broker(task.Clock(), history_size=500, gc_interval=0)
        broker.subscribe("c", Framer())
        msgs = [dumps({"channel": "c", "data": {"n": i, "p": "x" * 100}}) for i in range(500)]
        gc.collect()
        tracemalloc.start()
        try:
            for m in msgs:
                params = loads(m)
                broker.publish(params["channel"], params["data"])
            gc.collect()
            full = tracemalloc.get_traced_memory()[0]
            history = broker.channels["c"].history
            encoded = sum(len(ev.notification()) for ev in history)
            history.clear()
            gc.collect()
            freed = full - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.assertLessEqual(freed, 2 * encoded)

    def test_events_received_from_redis_hold_no_more_than_local_ones(self):
        """The Redis bridge decodes each event with its own channel and epoch
        strings (about 130 bytes more per event than the notification says):
        in history they share the channel's."""
        broker = Broker(task.Clock(), history_size=500, gc_interval=0)
        broker.subscribe("bench.channel.0", Framer())
        ch = broker.channels["bench.channel.0"]
        raws = [dumps({"c": "bench.channel.0", "o": i, "e": ch.epoch, "d": {"n": i, "p": "x" * 100},
                       "t": 1000.0 + i}) for i in range(1, 501)]
        gc.collect()
        tracemalloc.start()
        try:
            for raw in raws:
                self.assertTrue(broker.receive(redis_pubsub._event(redis_pubsub._loads(raw))))
            gc.collect()
            full = tracemalloc.get_traced_memory()[0]
            encoded = sum(len(ev.notification()) for ev in ch.history)
            counted = ch.bytes
            ch.history.clear()
            gc.collect()
            freed = full - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.assertLessEqual(freed, 2 * encoded)
        self.assertLessEqual(freed, counted * 11 // 10)     # history_memory counts what is held

    def test_presence_notices_are_right_sized(self):
        """rpc.join / rpc.leave wait in long-poll queues as their notification:
        its length, not orjson's 4 KB buffer."""
        notices = [presence_notice(f"room.{i}", "join", f"user{i}") for i in range(200)]
        gc.collect()
        tracemalloc.start()
        try:
            queued = [n.notification() for n in notices]
            per_notice = tracemalloc.get_traced_memory()[0] / len(queued)
        finally:
            tracemalloc.stop()
        self.assertEqual(loads(queued[0]), {"jsonrpc": "2.0", "method": "rpc.join",
                                            "params": {"channel": "room.0", "principal": "user0", "count": 1}})
        self.assertLess(per_notice, 300)

    def test_replay_of_resting_events(self):
        broker = Broker(task.Clock(), history_size=10, gc_interval=0)
        live = Framer()
        broker.subscribe("c", live)
        publish(broker, "c", 3)
        late = Framer()
        answer = self.successResultOf(broker.subscribe("c", late, since=1))
        self.assertTrue(answer["recovered"])
        self.assertEqual(late.frames, live.frames[1:])
        self.assertEqual([ev.cache for ev in broker.channels["c"].history], [None] * 3)
        self.assertEqual([ev.data["n"] for ev in broker.channels["c"].history], [0, 1, 2])

    def test_bytes_are_counted_through_every_way_out_of_history(self):
        clock = task.Clock()
        broker = Broker(clock, history_size=5, history_age=60, gc_interval=0)
        publish(broker, "a", 8)                        # past history_size
        publish(broker, "b", 3)
        self.assertEqual(broker.history_bytes, held(broker))
        self.assertEqual(broker.channels["a"].bytes, sum(ev.size() for ev in broker.channels["a"].history))
        clock.advance(61)
        publish(broker, "b", 1, start=3)                # trims b by age
        self.assertEqual(len(broker.channels["b"].history), 1)
        self.assertEqual(broker.history_bytes, held(broker))
        # a new epoch restarts a's history
        self.assertTrue(broker.receive(Event("a", 100, "other", "x", clock.seconds()), force=True))
        self.assertEqual([ev.offset for ev in broker.channels["a"].history], [100])
        self.assertEqual(broker.history_bytes, held(broker))
        broker.resync("a", "E", 3, [Event("a", 2, "E", "two", clock.seconds()),
                                   Event("a", 3, "E", "three", clock.seconds())])
        self.assertEqual(broker.history_bytes, held(broker))
        clock.advance(61)
        broker.collect()
        self.assertEqual((broker.history_bytes, held(broker)), (0, 0))


class HistoryMemoryTests(unittest.TestCase):

    def setUp(self):
        self.metrics = Metrics()
        self.broker = Broker(task.Clock(), history_size=1000, gc_interval=0, metrics=self.metrics,
                             history_memory=100_000)

    def test_the_largest_channels_lose_their_oldest_events(self):
        b = self.broker
        publish(b, "small", 20)
        publish(b, "big", 300)
        publish(b, "bigger", 400)
        self.assertLessEqual(b.history_bytes, b.history_memory)
        self.assertEqual(b.history_bytes, held(b))
        small, big, bigger = (b.channels[n] for n in ("small", "big", "bigger"))
        self.assertEqual(len(small.history), 20)       # below the level: untouched
        self.assertLess(len(big.history), 300)
        self.assertLess(len(bigger.history), 400)
        self.assertEqual(bigger.history[-1].offset, 400)    # the newest stay
        self.assertLessEqual(abs(big.bytes - bigger.bytes), 2 * big.history[0].size())   # cut to one level
        shed = 20 + 300 + 400 - sum(len(ch.history) for ch in (small, big, bigger))
        self.assertEqual(self.metrics.registry.get_sample_value("msgd_pubsub_history_shed_total"), shed)
        self.assertEqual(self.metrics.registry.get_sample_value("msgd_pubsub_history_bytes"), b.history_bytes)

    def test_a_resume_past_what_was_shed_is_not_recovered(self):
        b = self.broker
        publish(b, "c", 600)
        first = b.channels["c"].history[0].offset
        self.assertGreater(first, 1)
        missed = self.successResultOf(b.subscribe("c", Framer(), since=first - 2))
        self.assertFalse(missed["recovered"])
        sub = Framer()
        covered = self.successResultOf(b.subscribe("c", sub, since=first - 1))
        self.assertTrue(covered["recovered"])
        self.assertEqual(len(sub.frames), 600 - first + 1)

    def test_no_bound(self):
        b = Broker(task.Clock(), history_size=1000, gc_interval=0, history_memory=0)
        publish(b, "c", 600)
        self.assertEqual(len(b.channels["c"].history), 600)

    def test_configured_in_pubsub_section(self):
        c = config.parse_text("[pubsub]\nhistory_memory = 64MiB\n", "node.ini")
        self.assertEqual(c.pubsub.history_memory, 64 * 1024 * 1024)
        self.assertEqual(config.parse_text("", "node.ini").pubsub.history_memory, 256 * 1024 * 1024)
        with self.assertRaises(config.ConfigError) as e:
            config.parse_text("[pubsub]\nhistory_memory = lots\n", "node.ini")
        self.assertIn("history_memory", str(e.exception))


class Recorder:
    principal = None

    def __init__(self):
        self.got: list = []

    def deliver(self, ev):
        self.got.append((ev.channel, ev.data))


class SessionTests(unittest.TestCase):
    """A Session holding several subscribers (STOMP: one per SUBSCRIBE id)
    and reserved slots, under one ``max_subscriptions``."""

    def setUp(self):
        self.broker = Broker(task.Clock(), gc_interval=0)
        self.session = Session(self.broker, Recorder(), max_subscriptions=4)

    def test_subscribers_and_reserved_slots_share_the_bound(self):
        a, b = Recorder(), Recorder()
        self.session.subscribe("c", subscriber=a)
        self.session.subscribe("c", subscriber=b)
        self.session.subscribe("d")                        # the connection's own subscriber
        self.session.reserve()
        self.assertEqual(self.session.count(), 4)
        self.assertRaises(errors.TooLarge, self.session.subscribe, "e", subscriber=Recorder())
        self.assertRaises(errors.TooLarge, self.session.reserve)
        self.session.subscribe("c", subscriber=a)          # held already: no new slot
        self.session.release()
        self.session.reserve()                             # the slot given back is free again
        self.assertEqual(self.session.count(), 4)

    def test_a_refused_subscribe_holds_no_slot(self):
        # the broker refuses these (a pattern's positions must be objects by channel): the
        # connection stays (a JSON-RPC error), so a slot kept for each would fill the bound
        for _ in range(5):
            self.assertRaises(errors.InvalidParams, self.session.subscribe, "a.*", 5)
            self.assertRaises(errors.InvalidParams, self.session.subscribe, "a.*", 5, subscriber=Recorder())
        self.assertEqual(self.session.count(), 0)
        self.session.subscribe("a.*")
        self.assertRaises(errors.InvalidParams, self.session.subscribe, "a.*", 5)   # held already: still held
        self.assertEqual(self.session.count(), 1)

    def test_unsubscribe_one_then_close_ends_the_rest(self):
        a, b = Recorder(), Recorder()
        self.session.subscribe("c", subscriber=a)
        self.session.subscribe("c", subscriber=b)
        self.session.reserve()
        self.assertTrue(self.session.unsubscribe("c", a))
        self.broker.publish("c", 1)
        self.assertEqual((a.got, b.got, self.session.count()), ([], [("c", 1)], 2))
        self.session.close()
        self.broker.publish("c", 2)
        self.assertEqual((b.got, self.session.count()), ([("c", 1)], 0))
        self.assertNotIn(b, self.broker.channels["c"].subscribers)
        self.session.reserve()                             # a closed session's slots are all free
        self.assertEqual(self.session.count(), 1)
