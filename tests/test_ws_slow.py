"""A client that stops reading is dropped with its reason; others get
everything; the node's memory stays bounded."""

import base64
import os
import resource
import socket
import threading

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.helpers import http_port, make_node
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
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    payload = ('{"jsonrpc":"2.0","id":1,"method":"rpc.subscribe","params":{"channel":"%s"}}' % channel).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return s


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
