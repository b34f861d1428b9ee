"""A client that stops reading is dropped with its reason; others get
everything; the node's memory stays bounded."""

import json
import resource
import socket
import threading

import websocket
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.helpers import (SocketTransport, eventually, http_port, make_node, open_websocket, server_frames,
                           ws_subscribe)
from tests.wsclient import WS

INI = """
[pubsub]
history_size = 10

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
ws_max_pending = 64KiB
"""

EVENTS = 8000
SIZE = 1000


def raw_subscriber(port: int, channel: str) -> socket.socket:
    """A WebSocket client made by hand that subscribes and then never reads."""
    return ws_subscribe(port, channel, rcvbuf=4096)


class SlowConsumerTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI)
        self.port = http_port(self.node)

    @defer.inlineCallbacks
    def test_slow_client_dropped_others_unaffected(self):
        good = yield WS.connect(self.port)
        self.addCleanup(good.close)
        yield good.call("rpc.subscribe", {"channel": "firehose"})
        slow = yield deferToThread(raw_subscriber, self.port, "firehose")
        self.addCleanup(slow.close)
        for _ in range(200):   # until the broker has both subscribers
            if self.node.pubsub.presence("firehose")["count"] == 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.node.pubsub.presence("firehose")["count"], 2)

        received = []

        def read_all():
            while len(received) < EVENTS:
                received.append(len(good.ws.recv()))
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        blob = "x" * SIZE
        for i in range(EVENTS):
            self.node.pubsub.publish("firehose", {"i": i, "blob": blob})
            if i % 50 == 49:
                # keep pace with the reading client (bounded wait), not with the stuck one
                for _ in range(500):
                    if len(received) > i - 50:
                        break
                    yield task.deferLater(reactor, 0.002, lambda: None)
        for _ in range(1000):
            if len(received) >= EVENTS:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        reader.join(10)

        self.assertEqual(len(received), EVENTS)
        dropped = self.node.metrics.value("msgd_ws_dropped_total", {"interface": "web", "reason": "slow_consumer"})
        self.assertEqual(dropped, 1)
        self.assertEqual(self.node.pubsub.presence("firehose")["count"], 1)
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        # 8 MB were published; a node that buffered them for the slow client would grow by that much
        self.assertLess(growth_kib, 4 * 1024)
        self.flushLoggedErrors()


class SlowConsumerCloseTests(unittest.TestCase):
    """A dropped slow consumer is told why: once it reads again it gets
    what the kernel already held, then the close frame (1008, "slow
    consumer") before anything queued after it, even when it comes back
    later than Autobahn's own 1 s close handshake timeout."""

    def setUp(self):
        self.node = make_node(self, INI)
        self.port = http_port(self.node)

    def dropped(self):
        return self.node.metrics.value("msgd_ws_dropped_total", {"interface": "web", "reason": "slow_consumer"})

    @defer.inlineCallbacks
    def test_close_frame_reaches_a_client_that_reads_again(self):
        good = yield WS.connect(self.port)
        self.addCleanup(good.close)
        yield good.call("rpc.subscribe", {"channel": "firehose"})
        slow = yield WS.connect(self.port, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
        self.addCleanup(slow.close)
        yield slow.call("rpc.subscribe", {"channel": "firehose"})   # then it stops reading

        received = []

        def read_all():
            while len(received) < EVENTS:
                received.append(json.loads(good.ws.recv())["params"]["offset"])
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        blob = "x" * SIZE
        for i in range(EVENTS):
            self.node.pubsub.publish("firehose", {"i": i, "blob": blob})
            if i % 50 == 49:
                yield eventually(lambda: len(received) > i - 50, step=0.002)
        yield eventually(lambda: len(received) >= EVENTS)
        reader.join(10)
        self.assertEqual(received, list(range(1, EVENTS + 1)))
        self.assertEqual(self.dropped(), 1)

        # the dropped client stays away for longer than Autobahn's 1 s close handshake timeout
        yield task.deferLater(reactor, 2.0, lambda: None)

        def read_until_close():
            offsets = []
            while len(offsets) <= EVENTS:
                opcode, frame = slow.ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return offsets, int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    offsets.append(json.loads(frame.data)["params"]["offset"])
            raise AssertionError("no close frame")
        offsets, code, reason = yield deferToThread(read_until_close)
        self.assertEqual((code, reason.split(":")[0]), (1008, "slow consumer"))
        # what it got before the close is whole and in order; the rest was dropped, not queued
        self.assertEqual(offsets, list(range(1, len(offsets) + 1)))
        self.assertLess(len(offsets), EVENTS)
        self.flushLoggedErrors()


class DropTests(unittest.TestCase):
    """The drop itself, on a transport that buffers like Twisted's TCP one:
    what was never handed to the socket goes, the close frame is next,
    and the node reads again to see the client's answer."""

    def setUp(self):
        self.node = make_node(self, INI.replace("64KiB", "16KiB"))
        self.iface = self.node.interfaces["web"]

    def open(self, transport):
        proto = open_websocket(self, self.iface, transport)
        proto.connection.session.subscribe("c")
        return proto

    def test_unsent_events_dropped_and_close_frame_next(self):
        t = SocketTransport(room=10 ** 9)
        proto = self.open(t)
        for i in range(3):
            self.node.pubsub.publish("c", "x" * 1000)
        self.iface.turn.run()          # the turn's three frames go in one write
        t.room = 1500                  # the socket takes one event and a half, then no more
        t.flush()
        while self.node.metrics.value("msgd_ws_dropped_total", {"interface": "web", "reason": "slow_consumer"}) is None:
            self.node.pubsub.publish("c", "x" * 1000)
            self.iface.turn.run()
            self.assertLess(self.node.pubsub.channels["c"].offset, 1000)
        self.assertEqual(self.node.pubsub.presence("c")["count"], 0)
        self.assertTrue(t.reading())              # to see the client's close frame
        unsent = len(t.dataBuffer) - t.offset + t._tempDataLen
        self.assertLess(unsent, 3000)             # the rest of the merged three events, and the close frame
        # the client reads again: the events the socket had begun, whole, then the close frame
        t.room = 10 ** 9
        t.flush()
        frames = server_frames(t.sent)
        self.assertEqual([json.loads(p)["params"]["offset"] for _, p in frames[:-1]], [1, 2, 3])
        opcode, payload = frames[-1]
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (8, 1008))
        self.assertTrue(payload[2:].startswith(b"slow consumer"))
        self.node.pubsub.publish("c", "late")
        self.iface.turn.run()
        self.assertEqual(server_frames(t.sent), frames)     # nothing after the close frame
        # the client's close frame comes back: the node closes the connection
        mask = b"\x01\x02\x03\x04"
        body = payload[:2]
        proto.dataReceived(bytes([0x88, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
        self.assertTrue(t.disconnected)
        self.assertEqual(self.iface.connections, set())

    def test_discard_looks_through_wrappers_that_pass_bytes_unchanged(self):
        from twisted.internet.protocol import Protocol
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
        from msgd.interfaces.base import discard_unsent

        class Encrypting(ProtocolWrapper):      # as TLS: what it wrote is no longer the protocol's bytes
            def write(self, data):
                self.transport.write(bytes(b ^ 0x55 for b in data))

        for wrapper, kept in ((ProtocolWrapper, 0), (Encrypting, 2)):
            t = SocketTransport(room=0)
            w = wrapper(WrappingFactory(None), Protocol())
            w.makeConnection(t)
            w.write(b"one")
            w.write(b"two")
            discard_unsent(w)
            self.assertEqual(len(t._tempDataBuffer), kept, wrapper)

