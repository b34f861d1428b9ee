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
from tests.helpers import FakeBackend, shared


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
    """With a shared backend, channels matched only by a pattern keep no
    state here: a pattern's resume lists the matched channels in the backend
    and reads each one (a channel followed here gives its state here), then
    replays; events arriving meanwhile are held and taken once after."""

    def setUp(self):
        self.broker = Broker(task.Clock(), history_size=10, gc_interval=0)
        self.backend = FakeBackend(self.broker)

    def follow(self, name, epoch, offset, events=()):
        sub = Sub()
        d = self.broker.subscribe(name, sub)
        self.backend.join(name, epoch, offset, list(events))
        self.successResultOf(d)
        return sub

    def reads(self):
        return dict(self.backend.reads)

    def test_matched_channels_read_then_replayed(self):
        self.follow("a.f", "E0", 2, [shared(1, "one", "E0", "a.f"), shared(2, "two", "E0", "a.f")])
        sub = Sub()
        d = self.broker.subscribe("a.*", sub, since={"a.x": 3, "a.f": 1, "a.y": 1},
                                  epoch={"a.x": "E1", "a.f": "E0", "a.y": "E2"})
        self.assertEqual(self.backend.watching, {"a.*"})
        [(pattern, listing)] = self.backend.listings
        self.assertEqual(pattern, "a.*")
        listing.callback(["a.x", "a.new"])                  # a.new: begun while the client was away
        self.assertEqual(set(self.reads()), {"a.x", "a.y", "a.new"})    # a.f is followed: its state here
        self.assertNoResult(d)
        self.broker.receive(shared(5, "five", channel="a.x"))            # pushed while reading: held
        self.broker.receive(shared(6, "six", channel="a.x"))
        self.assertEqual(sub.got, [])
        reads = self.reads()
        reads["a.x"].callback(("E1", 5, [shared(4, "four", channel="a.x"), shared(5, "five", channel="a.x")]))
        reads["a.y"].callback(("E2", 2, [shared(2, "two", "E2", "a.y")]))
        reads["a.new"].callback(("E3", 1, [shared(1, "first", "E3", "a.new")]))
        answer = self.successResultOf(d)
        self.assertTrue(answer["recovered"])
        self.assertEqual(sorted(sub.got[:-1]), [("a.f", 2), ("a.new", 1), ("a.x", 4), ("a.x", 5), ("a.y", 2)])
        self.assertEqual(sub.got[-1], ("a.x", 6))           # the held one after the replay, five once
        self.assertEqual(answer["offset"], {"a.f": 2, "a.x": 6, "a.y": 2, "a.new": 1})
        self.broker.receive(shared(7, "seven", channel="a.x"))     # live from now on
        self.assertEqual(sub.got[-1], ("a.x", 7))
        self.assertEqual(self.broker.patterns["a.*"], {sub})
        self.assertNotIn("a.x", self.broker.channels)             # no state kept for it

    def test_a_channel_that_cannot_be_read_is_not_recovered(self):
        sub = Sub()
        d = self.broker.subscribe("a.*", sub, since={"a.x": 3}, epoch={"a.x": "E1"})
        self.backend.listings[0][1].callback(["a.x"])
        self.reads()["a.x"].errback(ConnectionError("Redis is not connected"))
        self.assertFalse(self.successResultOf(d)["recovered"])

    def test_channels_that_cannot_be_listed_are_not_recovered(self):
        # a channel begun while the client was away may be missed: said so
        d = self.broker.subscribe("a.*", Sub(), since={}, epoch={})
        self.backend.listings[0][1].errback(ConnectionError("Redis is not connected"))
        self.assertFalse(self.successResultOf(d)["recovered"])

    def test_a_channel_whose_shard_is_away_is_not_recovered(self):
        self.backend.connected = False
        d = self.broker.subscribe("a.*", Sub(), since={"a.x": 3}, epoch={"a.x": "E1"})
        self.backend.listings[0][1].callback([])
        self.assertEqual(self.backend.reads, [])
        self.assertFalse(self.successResultOf(d)["recovered"])

    def test_another_epoch_is_not_recovered(self):
        d = self.broker.subscribe("a.*", Sub(), since={"a.x": 3}, epoch={"a.x": "E1"})
        self.backend.listings[0][1].callback(["a.x"])
        self.reads()["a.x"].callback(("E9", 5, [shared(5, "five", "E9", "a.x")]))
        self.assertFalse(self.successResultOf(d)["recovered"])

    def test_unsubscribed_while_reading(self):
        sub = Sub()
        d = self.broker.subscribe("a.*", sub, since={"a.x": 3}, epoch={"a.x": "E1"})
        self.assertTrue(self.broker.unsubscribe("a.*", sub))
        self.assertNotIn("a.*", self.broker.patterns)
        self.assertEqual(self.backend.watching, set())
        self.backend.listings[0][1].callback(["a.x"])
        self.reads()["a.x"].callback(("E1", 4, [shared(4, "four", channel="a.x")]))
        self.assertFalse(self.successResultOf(d)["recovered"])
        self.assertEqual(sub.got, [])
        self.assertNotIn("a.*", self.broker.patterns)

    def test_a_forgotten_channel_is_no_longer_matched(self):
        self.broker.subscribe("a.*", Sub())
        sub = self.follow("a.f", "E0", 1, [shared(1, "one", "E0", "a.f")])
        self.assertEqual(list(self.broker._matched["a.*"]), ["a.f"])
        self.broker.unsubscribe("a.f", sub)
        self.assertNotIn("a.f", self.broker.channels)
        self.assertEqual(list(self.broker._matched["a.*"]), [])
        self.assertEqual(self.successResultOf(self.broker.subscribe("a.*", Sub()))["offset"], {})

    def test_refused_in_cluster_mode(self):
        self.backend.no_patterns = "no patterns here"
        with self.assertRaises(errors.InvalidParams):
            self.broker.subscribe("a.*", Sub())


class RedisPatternResumeTests(test_cluster.NodesCase):
    """A pattern resumed on another node process over a real Redis: every
    matched channel replayed from the positions held (the node keeps no
    state for them), or ``recovered: false``."""

    def test_pattern_resumed_on_another_node(self):
        return self.run_scenario(self._resumed_on_another_node)

    def _resumed_on_another_node(self):
        from tests import servers
        from tests.servers import free_port
        from tests.process import Client, publish, pubsub_connected
        self.redis = servers.redis()
        a = self.node("a", free_port(), self.redis)
        b = self.node("b", free_port(), self.redis)
        for n in (a, b):
            n.start()
        pubsub_connected(a, b, what="connected to Redis")
        publish(b, "a.x", "x1")
        client = Client(a)
        answer = client.call("rpc.subscribe", {"channel": "a.*"})["result"]
        self.assertEqual(answer["offset"], {})       # A follows no channel: positions come with the events
        held_offset, held_epoch = {}, {}

        def take(ev):
            held_offset[ev["channel"]], held_epoch[ev["channel"]] = ev["offset"], ev["epoch"]
            return ev["channel"], ev["data"]
        publish(b, "a.x", "x2")
        publish(b, "a.{y}", "y1")
        publish(a, "end.0", "-")
        self.assertEqual([take(client.event()) for _ in range(2)], [("a.x", "x2"), ("a.{y}", "y1")])
        client.close()

        # while away: a.x and a.{y} go on, a.new begins, b.z is not matched
        publish(b, "a.x", "x3")
        publish(a, "a.new", "n1")
        publish(b, "a.{y}", "y2")
        publish(b, "b.z", "z")
        publish(a, "a.x", "x4")
        again = Client(b)                   # B has never seen these channels
        answer = again.call("rpc.subscribe", {"channel": "a.*", "since": held_offset, "epoch": held_epoch})
        answer = answer["result"]
        self.assertTrue(answer["recovered"], answer)
        self.assertEqual([(e["channel"], e["data"]) for e in again.events],
                         [("a.x", "x3"), ("a.new", "n1"), ("a.{y}", "y2"), ("a.x", "x4")])
        self.assertEqual(answer["offset"], {"a.x": 4, "a.{y}": 2, "a.new": 1})
        again.events.clear()
        publish(a, "a.new", "n2")           # live from there
        self.assertEqual(again.event()["data"], "n2")
        again.close()

        # a position the history cannot vouch for (another epoch): said so
        third = Client(a)
        r = third.call("rpc.subscribe", {"channel": "a.*", "since": {"a.x": 1}, "epoch": {"a.x": "0" * 12}})
        self.assertFalse(r["result"]["recovered"])
        third.close()
