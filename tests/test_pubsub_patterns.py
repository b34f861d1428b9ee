"""Pattern subscriptions resume like channel ones (msgd/core/pubsub.py, with
task.Clock): the answer gives the position of every matched channel, a
resume with the positions the client holds replays every matched channel
from there, and says ``recovered: false`` whenever one of them cannot be."""

from twisted.internet import task
from twisted.trial import unittest

from msgd.core import errors
from msgd.core.pubsub import Broker, Session
from msgd.core.request import Request
from tests import test_cluster
from tests.test_cluster import FakeBackend, shared


class Sub(test_cluster.Sub):
    def deliver(self, ev):
        self.got.append((ev.channel, ev.offset))


class PatternResumeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.broker = Broker(self.clock, history_size=3, gc_interval=0)

    def publish(self, channel, n=1):
        for _ in range(n):
            self.clock.advance(1)
            self.broker.publish(channel, "x")

    def subscribe(self, name, sub=None, since=None, epoch=None):
        return self.successResultOf(self.broker.subscribe(name, sub or Sub(), since, epoch))

    def epoch(self, channel):
        return self.broker.channels[channel].epoch

    def test_answer_gives_every_matched_channels_position(self):
        self.publish("a.x", 2)
        self.publish("a.y")
        self.publish("b.z")
        self.broker.subscribe("a.quiet", Sub())          # known here, no event yet
        answer = self.subscribe("a.*")
        self.assertEqual(answer, {"channel": "a.*", "pattern": True, "recovered": True,
                                  "offset": {"a.x": 2, "a.y": 1},
                                  "epoch": {"a.x": self.epoch("a.x"), "a.y": self.epoch("a.y")}})

    def test_resume_replays_every_matched_channel_from_what_the_client_holds(self):
        self.publish("a.x")
        first = self.subscribe("a.*")
        since, epoch = first["offset"], first["epoch"]      # what the client holds: a.x 1
        self.publish("a.x")          # a.x 2, missed
        self.publish("a.new")        # a channel begun after the subscription: all of it was missed
        self.publish("a.x")          # a.x 3
        self.publish("b.other")
        sub = Sub()
        answer = self.subscribe("a.*", sub, since, epoch)
        self.assertTrue(answer["recovered"])
        self.assertEqual(sub.got, [("a.x", 2), ("a.new", 1), ("a.x", 3)])     # by time, each channel in order
        self.assertEqual(answer["offset"], {"a.x": 3, "a.new": 1})
        self.publish("a.new")
        self.assertEqual(sub.got[-1], ("a.new", 2))

    def test_nothing_missed(self):
        self.publish("a.x", 2)
        first = self.subscribe("a.*")
        sub = Sub()
        self.assertTrue(self.subscribe("a.*", sub, first["offset"], first["epoch"])["recovered"])
        self.assertEqual(sub.got, [])

    def test_history_too_short_for_one_channel_is_not_recovered(self):
        self.publish("a.x")
        self.publish("a.y")
        first = self.subscribe("a.*")
        self.publish("a.x", 4)       # history_size 3: a.x 2 is gone
        self.publish("a.y")
        sub = Sub()
        answer = self.subscribe("a.*", sub, first["offset"], first["epoch"])
        self.assertFalse(answer["recovered"])
        self.assertIn(("a.y", 2), sub.got)      # what could be replayed still is
        self.assertEqual(answer["offset"], {"a.x": 5, "a.y": 2})

    def test_a_new_channel_whose_start_is_gone_is_not_recovered(self):
        first = self.subscribe("a.*")
        self.publish("a.new", 4)
        self.assertFalse(self.subscribe("a.*", Sub(), first["offset"], first["epoch"])["recovered"])

    def test_other_epoch_is_not_recovered(self):
        self.publish("a.x")
        first = self.subscribe("a.*")
        self.assertFalse(self.subscribe("a.*", Sub(), first["offset"], {"a.x": "other"})["recovered"])

    def test_a_forgotten_channel_is_not_recovered(self):
        # a.x was collected (its history was gone): a position in it cannot be vouched for
        self.assertFalse(self.subscribe("a.*", Sub(), {"a.x": 4}, {"a.x": "E"})["recovered"])
        self.assertTrue(self.subscribe("a.*", Sub(), {"a.x": 0})["recovered"])
        self.assertNotIn("a.x", self.broker.channels)        # positions do not create channels

    def test_matched_channels_kept_while_the_pattern_is_subscribed(self):
        self.broker.gc_interval = 1
        self.broker.history_age = 5
        first = Sub()
        self.subscribe("a.*", first)
        self.publish("a.new")                    # created after the pattern: matched without a new look
        self.publish("b.other")
        self.assertEqual(list(self.broker._matched["a.*"]), ["a.new"])
        self.assertEqual(self.subscribe("a.*")["offset"], {"a.new": 1})
        self.clock.advance(10)                   # its history ages out: collected, and no longer matched
        self.assertEqual(self.broker.collect(), 2)
        self.assertEqual(self.subscribe("a.*")["offset"], {})
        self.assertEqual(list(self.broker._matched["a.*"]), [])
        for sub in list(self.broker.patterns["a.*"]):
            self.broker.unsubscribe("a.*", sub)
        self.assertNotIn("a.*", self.broker._matched)

    def test_positions_are_checked(self):
        for since, epoch in ((3, None), ({"a.x": "3"}, None), ({"a.x": -1}, None), ({"a.x": True}, None),
                             ({"a.x": 1}, "E"), ({"a.x": 1}, {"a.x": 1})):
            with self.assertRaises(errors.InvalidParams):
                self.broker.subscribe("a.*", Sub(), since, epoch)

    def test_session_takes_objects_for_patterns(self):
        self.publish("a.x", 2)
        session = Session(self.broker, Sub())
        request = Request(interface="t", clock=self.clock)
        answer = self.successResultOf(session.rpc_subscribe(
            request, {"channel": "a.*", "since": {"a.x": 1}, "epoch": {"a.x": self.epoch("a.x")}}))
        self.assertTrue(answer["recovered"])
        self.assertEqual(session.subscriber.got, [("a.x", 2)])
        with self.assertRaises(errors.InvalidParams):
            session.rpc_subscribe(request, {"channel": "a.*", "since": 1})
        with self.assertRaises(errors.InvalidParams):
            session.rpc_subscribe(request, {"channel": "a.x", "since": {"a.x": 1}})


class SharedPatternResumeTests(unittest.TestCase):
    """With a shared backend, every matched channel's shared state is read
    before the pattern answers, as for a channel."""

    def setUp(self):
        self.broker = Broker(task.Clock(), history_size=10, gc_interval=0)
        self.backend = FakeBackend(self.broker)

    def test_matched_channels_synced_then_replayed(self):
        self.broker.receive("a.x", 5, "E1", "live", 0.0)      # known here, not synced
        sub = Sub()
        d = self.broker.subscribe("a.*", sub, since={"a.x": 3, "a.y": 1}, epoch={"a.x": "E1", "a.y": "E2"})
        self.assertNoResult(d)
        syncs = dict(self.backend.syncs)
        self.assertEqual(set(syncs), {"a.x", "a.y"})
        syncs["a.x"].callback(("E1", 5, [shared(4, "four", channel="a.x"), shared(5, "five", channel="a.x")]))
        syncs["a.y"].callback(("E2", 2, [shared(2, "two", channel="a.y")]))
        answer = self.successResultOf(d)
        self.assertTrue(answer["recovered"])
        self.assertEqual(sorted(sub.got), [("a.x", 4), ("a.x", 5), ("a.y", 2)])
        self.assertEqual(answer["offset"], {"a.x": 5, "a.y": 2})
