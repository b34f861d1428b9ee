"""A WebSocket's HTTP connection is counted once, from its admission to its
close, whether the handshake is accepted or refused."""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import make_node

INI = """
[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
ws_origins = http://good.example
"""

KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


class HandshakeAccountingTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI)
        self.iface = self.node.interfaces["web"]

    def handshake(self, origin: bytes, extra: bytes = b""):
        """An HTTP connection through the interface's Site asking for /ws;
        the transport and what it was answered."""
        channel = self.iface.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        t.protocol = channel        # as a TCP transport has it: the WebSocket resource takes it over
        channel.makeConnection(t)
        channel.dataReceived(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             + KEY + extra + b"Origin: " + origin + b"\r\n\r\n")
        return t, t.value().split(b"\r\n", 1)[0]

    def lose(self, t):
        t.protocol.connectionLost(Failure(ConnectionDone()))   # the WebSocket took the connection over

    def assertNothingOpen(self):
        self.assertEqual(self.iface.connections, set())
        self.assertEqual(self.iface.guard._open, {})
        self.assertEqual(self.iface.guard.connections.total, 0)
        self.assertEqual(self.node.metrics.value("msgd_interface_connections", {"interface": "web"}), 0)
        self.assertEqual(self.node.metrics.value("msgd_ws_connections", {"interface": "web"}), 0)

    def test_refused_handshake_is_no_longer_counted_once_closed(self):
        t, status = self.handshake(b"http://evil.example")
        self.assertIn(b" 403 ", status)
        self.assertEqual(len(self.iface.connections), 1)     # admitted as an HTTP connection
        self.lose(t)
        self.assertNothingOpen()

    def test_unknown_subprotocol_refused_then_closed(self):
        t, status = self.handshake(b"http://good.example", b"Sec-WebSocket-Protocol: mqtt\r\n")
        self.assertIn(b" 400 ", status)
        self.lose(t)
        self.assertNothingOpen()

    def test_accepted_then_closed(self):
        t, status = self.handshake(b"http://good.example")
        self.assertIn(b" 101 ", status)
        self.assertEqual(self.iface.connections, {t})
        self.assertEqual(self.node.metrics.value("msgd_ws_connections", {"interface": "web"}), 1)
        self.lose(t)
        self.assertNothingOpen()

    def test_both_in_turn(self):
        refused, _ = self.handshake(b"http://evil.example")
        accepted, _ = self.handshake(b"http://good.example")
        self.lose(refused)
        self.lose(accepted)
        self.assertNothingOpen()
