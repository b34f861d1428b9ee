"""The STOMP session (msgd.interfaces.stomp.session) without a transport or a
node: an AppHarness for the services, a real pub/sub Broker and the
writers' Turn on its clock, what the session writes kept as a list of
writes.  Its pub/sub goes through the connection's Session, as a JSON-RPC
connection's does: the same bound, channel check, presence and ending."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from twisted.trial import unittest

from msgd.config import AccessConfig
from msgd.core.pubsub import Broker
from msgd.interfaces.base import Interface
from msgd.interfaces.connection import Clients
from msgd.interfaces.stomp.session import SessionOptions, StompSession
from msgd.interfaces.writer import Turn
from msgd.security import Access
from msgd.security.principal import Principal
from msgd.stomp.codec import Frame, encode
from msgd.testing import AppHarness
from tests.helpers import stomp_frames




class StompSessionTests(unittest.TestCase):
    def setUp(self):
        self.harness = AppHarness(os.path.abspath(self.mktemp()), interface="stomp")
        self.broker = self.harness.pubsub = Broker(self.harness.clock)
        self.writes: list[bytes] = []
        self.closed: list[str] = []

    def session(self, login: str | None = None, turn: Turn | None = None, **options) -> StompSession:
        options.setdefault("connect_timeout", 0)
        options.setdefault("heartbeat", (0, 0))
        principal = Principal(login) if login else None
        s = StompSession(self.harness, "stomp", self.writes.append, self.closed.append, peer="test",
                         options=SessionOptions(authenticate=lambda login, passcode: principal, **options), turn=turn)
        self.addCleanup(s.connection_lost)
        s.data_received(encode(Frame("CONNECT", [("accept-version", "1.2")])))
        return s

    def frame(self, s: StompSession, command: str, body: bytes = b"", **headers) -> None:
        s.data_received(encode(Frame(command, list(headers.items()), body)))

    def got(self) -> list[Frame]:
        return stomp_frames(b"".join(self.writes))

    def subscribers(self, channel: str) -> int:
        ch = self.broker.channels.get(channel)
        return len(ch.subscribers) if ch is not None else 0

    def test_subscriptions_count_against_the_sessions_bound(self):
        s = self.session(max_subscriptions=2)
        self.frame(s, "SUBSCRIBE", destination="/topic/a", id="1")
        self.frame(s, "SUBSCRIBE", destination="/topic/a", id="2")   # a second subscriber of the same channel
        self.assertEqual((s.pubsub.count(), self.subscribers("a")), (2, 2))
        self.frame(s, "SUBSCRIBE", destination="/topic/b", id="3", receipt="r")
        error = self.got()[-1]
        self.assertEqual((error.command, error.get("msgd-code"), error.get("message"), error.get("receipt-id")),
                         ("ERROR", "-32004", "at most 2 subscriptions per connection", "r"))
        self.assertEqual(self.closed, ["at most 2 subscriptions per connection"])
        self.assertEqual((self.subscribers("a"), self.subscribers("b")), (0, 0))

    def test_reply_destinations_count_with_the_topics(self):
        """``/temp-queue/`` reply destinations and topic subscriptions share
        ``max_subscriptions``, whichever comes first."""
        for first, second in (("/temp-queue/r", "/topic/a"), ("/topic/a", "/temp-queue/r")):
            del self.writes[:], self.closed[:]
            s = self.session(max_subscriptions=2)
            self.frame(s, "SUBSCRIBE", destination=first, id="1")
            self.frame(s, "SUBSCRIBE", destination=second, id="2")
            self.frame(s, "SUBSCRIBE", destination="/temp-queue/q", id="3")
            self.assertEqual(self.closed, ["at most 2 subscriptions per connection"], first)
            self.assertEqual(self.subscribers("a"), 0)

    def test_a_denied_channel_is_an_error_frame(self):
        self.harness.access = Access(self.harness.metrics, [
            ("r", AccessConfig(principals=("*",), subscribe=("public.*",), publish=("public.*",)))])
        s = self.session()
        self.frame(s, "SUBSCRIBE", destination="/topic/public.a", id="1", receipt="ok")
        self.assertEqual(self.got()[-1].command, "RECEIPT")
        self.frame(s, "SUBSCRIBE", destination="/topic/secret", id="2", receipt="no")
        error = self.got()[-1]
        self.assertEqual((error.command, error.get("msgd-code"), error.get("msgd-error"), error.get("receipt-id")),
                         ("ERROR", "-32001", "unauthorized", "no"))
        self.assertEqual((self.subscribers("public.a"), self.subscribers("secret")), (0, 0))
        self.assertEqual(self.harness.metrics.value("msgd_auth_denied_total", {"interface": "stomp", "reason": "rule"}),
                         1)

    def test_unsubscribe_and_disconnect_leave_the_broker_no_subscriber(self):
        s = self.session()
        for sid, dest in (("1", "/topic/a"), ("2", "/topic/b"), ("3", "/topic/news.*"), ("4", "/temp-queue/r")):
            self.frame(s, "SUBSCRIBE", destination=dest, id=sid)
        self.assertEqual((self.subscribers("a"), self.subscribers("b"), len(self.broker.patterns["news.*"])),
                         (1, 1, 1))
        self.frame(s, "UNSUBSCRIBE", id="1", receipt="r")
        self.assertEqual(self.got()[-1].get("receipt-id"), "r")
        self.assertEqual((self.subscribers("a"), s.pubsub.count()), (0, 3))     # b, news.*, the reply slot
        self.frame(s, "DISCONNECT", receipt="bye")
        self.assertEqual(self.got()[-1].get("receipt-id"), "bye")
        self.assertEqual(self.closed, ["disconnected"])
        self.assertEqual((self.subscribers("b"), self.broker.patterns, s.pubsub.count()), (0, {}, 0))

    def test_connection_lost_ends_every_subscription(self):
        s = self.session()
        self.frame(s, "SUBSCRIBE", destination="/topic/a", id="1")
        self.frame(s, "SUBSCRIBE", destination="/topic/x.*", id="2")
        s.connection_lost()
        self.assertEqual((self.subscribers("a"), self.broker.patterns), (0, {}))
        self.broker.publish("a", 1)
        self.assertEqual([f.command for f in self.got()], ["CONNECTED"])

    def test_presence_counts_stomp_subscribers_as_json_rpc_ones(self):
        s = self.session(login="alice")
        self.frame(s, "SUBSCRIBE", destination="/topic/room", id="1")
        iface = Interface("stomp", SimpleNamespace(request_timeout=30.0), self.harness)
        rpc = Clients(iface, max_batch=10, max_subscriptions=10).connect(
            lambda event: None, Principal("bob"))
        rpc.session.subscribe("room")
        expected = {"channel": "room", "count": 2, "principals": ["alice", "bob"]}
        self.assertEqual(self.broker.presence("room"), expected)
        self.assertEqual(self.successResultOf(self.broker.cluster_presence("room")), expected)
        s.connection_lost()
        rpc.close()
        self.assertEqual(self.broker.presence("room")["count"], 0)

    def test_a_client_dropped_during_its_replay_is_not_left_subscribed(self):
        for i in range(5):
            self.broker.publish("c", i)
        s = self.session(max_unacked=2)
        self.frame(s, "SUBSCRIBE", destination="/topic/c", id="1", ack="client", **{"msgd-since": "0"})
        self.assertEqual(self.got()[-1].get("message"), "more than 2 unacknowledged messages")
        self.assertEqual((self.subscribers("c"), s.pubsub.count()), (0, 0))

    def test_the_frames_of_one_turn_are_one_write(self):
        turn = Turn(self.harness.clock)
        s = self.session(turn=turn)
        self.frame(s, "SUBSCRIBE", destination="/topic/c", id="1", receipt="r")
        self.assertEqual(self.writes, [])
        self.harness.clock.advance(0)       # the end of the reactor turn
        self.assertEqual([[f.command for f in stomp_frames(w)] for w in self.writes], [["CONNECTED", "RECEIPT"]])
        del self.writes[:]
        for i in range(5):
            self.broker.publish("c", i)
        self.assertEqual(self.writes, [])
        self.harness.clock.advance(0)
        self.assertEqual(len(self.writes), 1)
        self.assertEqual([json.loads(f.body) for f in stomp_frames(self.writes[0])], [0, 1, 2, 3, 4])

    def test_an_error_comes_after_the_turns_messages(self):
        turn = Turn(self.harness.clock)
        s = self.session(turn=turn)
        self.frame(s, "SUBSCRIBE", destination="/topic/c", id="1")
        self.harness.clock.advance(0)
        del self.writes[:]
        self.broker.publish("c", 1)
        self.broker.publish("c", 2)
        self.frame(s, "SEND", destination="/nowhere", receipt="r")
        self.assertEqual([(f.command, f.body if f.command == "MESSAGE" else f.get("receipt-id")) for f in self.got()],
                         [("MESSAGE", b"1"), ("MESSAGE", b"2"), ("ERROR", "r")])
        self.assertEqual(self.closed, ["unknown destination '/nowhere': use /topic/CHANNEL or /app/module.function"])
        self.broker.publish("c", 3)
        self.harness.clock.advance(0)
        self.assertEqual(len(self.got()), 3)        # nothing after the ERROR

    def test_receipts_keep_their_place_among_messages(self):
        turn = Turn(self.harness.clock)
        s = self.session(turn=turn)
        self.frame(s, "SUBSCRIBE", destination="/topic/c", id="1")
        self.broker.publish("c", 1)
        self.frame(s, "SEND", b"2", destination="/topic/c", receipt="sent")
        self.broker.publish("c", 3)
        self.harness.clock.advance(0)
        self.assertEqual(len(self.writes), 1)
        self.assertEqual([(f.command, f.get("msgd-offset") or f.get("receipt-id")) for f in self.got()[1:]],
                         [("MESSAGE", "1"), ("MESSAGE", "2"), ("RECEIPT", "sent"), ("MESSAGE", "3")])
