"""The client's address behind proxies (msgd.security.addresses), transport
free: forwarding headers, the PROXY protocol wrapper on a StringTransport,
and connection limits per client through a trusted proxy's connections."""

import importlib
import os
import socket
import struct

import twisted
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msgd.core.metrics import Metrics
from msgd.security.addresses import HEADER_TIMEOUT, ClientAddresses, ProxyProtocolFactory, ip
from msgd.security.limits import ConnectionLimits


PRIVATE_PARSERS = {   # what msgd.security.addresses takes from Twisted's private haproxy modules
    "twisted.protocols.haproxy._v1parser": ("V1Parser",),
    "twisted.protocols.haproxy._v2parser": ("V2Parser",),
    "twisted.protocols.haproxy._exceptions": ("InvalidProxyHeader",),
}


class TwistedPrivateParsersTests(unittest.TestCase):
    """msgd.security.addresses parses PROXY headers with Twisted's private
    modules (setup.py sets no upper bound on Twisted): a release that moves
    or changes them must fail here, naming them."""

    def test_private_modules_still_there(self):
        for module, names in PRIVATE_PARSERS.items():
            try:
                loaded = importlib.import_module(module)
            except ImportError as e:
                self.fail(f"Twisted {twisted.__version__} has no {module} ({e}): msgd.security.addresses "
                          f"imports {', '.join(names)} from Twisted's private modules {', '.join(PRIVATE_PARSERS)}")
            for name in names:
                self.assertTrue(hasattr(loaded, name),
                                f"Twisted {twisted.__version__}: {module} has no {name}, which "
                                "msgd.security.addresses imports from it (a private Twisted module)")

    def test_what_is_used_of_them(self):
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser
        where = f"Twisted {twisted.__version__}'s private {', '.join(PRIVATE_PARSERS)} changed"
        info, rest = V1Parser().feed(b"PROXY TCP4 192.0.2.7 10.0.0.1 5678 80\r\nrest")
        self.assertEqual((info.source, rest), (IPv4Address("TCP", "192.0.2.7", 5678), b"rest"), where)
        self.assertIsNone(V1Parser().feed(b"PROXY TCP4 192.0.2.7")[0], where)   # not complete yet
        self.assertEqual(V2Parser.PREFIX, b"\r\n\r\n\x00\r\nQUIT\n", where)
        info, rest = V2Parser().feed(V2Parser.PREFIX + b"\x21\x11\x00\x0c" + socket.inet_aton("192.0.2.7")
                                     + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5678, 80) + b"rest")
        self.assertEqual((info.source, rest), (IPv4Address("TCP", "192.0.2.7", 5678), b"rest"), where)
        with self.assertRaises(InvalidProxyHeader, msg=where):
            V1Parser().feed(b"PROXY bogus\r\n")


class ResolveTests(unittest.TestCase):
    xff = ClientAddresses(("10.0.0.0/8", "127.0.0.1"))
    fwd = ClientAddresses(("10.0.0.0/8",), header="forwarded")

    def test_untrusted_peer_is_the_client(self):
        self.assertEqual(self.xff.resolve("192.0.2.7", ["127.0.0.1"]), "192.0.2.7")
        self.assertEqual(ClientAddresses().resolve("127.0.0.1", ["192.0.2.7"]), "127.0.0.1")

    def test_rightmost_untrusted_hop(self):
        self.assertEqual(self.xff.resolve("10.0.0.1", ["192.0.2.7"]), "192.0.2.7")
        # the client wrote "1.2.3.4, 127.0.0.1"; the proxies appended 192.0.2.7 and 10.0.0.2
        self.assertEqual(self.xff.resolve("127.0.0.1", ["1.2.3.4, 127.0.0.1, 192.0.2.7", "10.0.0.2"]),
                         "192.0.2.7")

    def test_all_trusted_gives_the_leftmost(self):
        self.assertEqual(self.xff.resolve("10.0.0.1", ["10.1.1.1, 127.0.0.1"]), "10.1.1.1")

    def test_unreadable_hop_stops_at_its_writer(self):
        self.assertEqual(self.xff.resolve("10.0.0.1", ["192.0.2.7, garbage"]), "10.0.0.1")
        self.assertEqual(self.xff.resolve("10.0.0.1", ["192.0.2.7, unknown, 10.0.0.3"]), "10.0.0.3")

    def test_ports_brackets_and_mapped(self):
        self.assertEqual(self.xff.resolve("::ffff:10.0.0.1", ["192.0.2.7:5555"]), "192.0.2.7")
        self.assertEqual(self.xff.resolve("10.0.0.1", ["[2001:db8::1]:80"]), "2001:db8::1")
        self.assertEqual(self.xff.resolve("10.0.0.1", ["::ffff:192.0.2.7"]), "192.0.2.7")
        self.assertEqual(str(ip("::1")), "::1")
        self.assertIsNone(ip("example.org"))

    def test_forwarded(self):
        value = 'for=1.2.3.4, for="[2001:db8::1]:4711";proto=https;by=10.0.0.2, For=10.0.0.9'
        self.assertEqual(self.fwd.resolve("10.0.0.1", [value]), "2001:db8::1")
        self.assertEqual(self.fwd.resolve("10.0.0.1", ['for="_hidden", for=10.0.0.5']), "10.0.0.5")
        self.assertEqual(self.fwd.resolve("10.0.0.1", ['proto=http;by=x']), "10.0.0.1")
        self.assertEqual(self.fwd.resolve("10.0.0.1", ['for="1.2.3.4";x="a,b;c"']), "1.2.3.4")


class Recorder(Protocol):
    def __init__(self):
        self.peer = None
        self.data = b""
        self.lost = False

    def connectionMade(self):
        self.peer = self.transport.getPeer()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


def v2_header(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 80, local: bool = False) -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x20 if local else 0x21, 0x11))
            + struct.pack("!H", len(addresses)) + addresses)


class ProxyProtocolTests(unittest.TestCase):
    def connect(self, peer="10.0.0.1"):
        self.clock = Clock()
        self.inner = Recorder()
        factory = ProxyProtocolFactory(Factory.forProtocol(lambda: self.inner), ClientAddresses(("10.0.0.0/8",)),
                                       self.clock, "test")
        proto = factory.buildProtocol(IPv4Address("TCP", peer, 1111))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1111))
        proto.makeConnection(self.transport)
        return proto

    def test_v1_header_names_the_client_before_the_protocol_starts(self):
        proto = self.connect()
        proto.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80\r")
        self.assertIsNone(self.inner.peer)                   # not connected yet
        proto.dataReceived(b"\nhello")
        self.assertEqual((self.inner.peer.host, self.inner.peer.port), ("192.0.2.7", 5555))
        self.assertEqual(self.inner.data, b"hello")
        self.assertEqual(proto.getHost().host, "10.0.0.1")

    def test_v2_header_in_pieces(self):
        proto = self.connect()
        header = v2_header("192.0.2.8", 6000)
        for i in range(len(header)):
            proto.dataReceived(header[i:i + 1])
        proto.dataReceived(b"x")
        self.assertEqual(self.inner.peer.host, "192.0.2.8")
        self.assertEqual(self.inner.data, b"x")
        self.clock.advance(HEADER_TIMEOUT)
        self.assertFalse(self.transport.disconnecting)

    def test_local_command_is_the_proxy_itself(self):
        proto = self.connect()
        proto.dataReceived(v2_header("192.0.2.8", 6000, local=True) + b"ping")
        self.assertEqual(self.inner.peer.host, "10.0.0.1")
        self.assertEqual(self.inner.data, b"ping")

    def test_untrusted_peer_is_closed(self):
        self.connect(peer="192.0.2.9")
        self.assertTrue(self.transport.disconnecting)

    def test_no_header_or_bad_header_is_closed(self):
        proto = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.inner.peer)
        proto = self.connect()
        proto.dataReceived(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.inner.peer)
        proto.connectionLost(None)
        self.assertFalse(self.inner.lost)      # it never saw a connection

    def test_header_must_come_in_time(self):
        proto = self.connect()
        proto.dataReceived(b"PROX")
        self.clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)


class ProxiedLimitsTests(unittest.TestCase):
    """Guard.admit/readmit: a trusted proxy's HTTP connection counts as the
    client's of the request it carries."""

    def guard(self, per_address=1, total=0):
        from msgd.security.guard import Guard
        class Options:
            auth, anonymous, token_secret, token_ttl = "none", True, "", 60.0
            max_connections, max_connections_per_address = total, per_address
            rate = rate_burst = 0
            login_attempts, login_window = 5, 60.0
            trusted_proxies = ("127.0.0.1",)

        class Node:
            reactor = Clock()
            metrics = Metrics()

        class Interface:
            name = "web"
            options = Options()
            services = node = Node()
        return Guard(Interface())

    def test_counted_per_client(self):
        g = self.guard(per_address=1)
        proxy = [StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", p)) for p in (1, 2, 3)]
        for t in proxy:
            self.assertIsNone(g.admit(t, forwarded=True))      # the proxy's own address is not limited
        self.assertIsNone(g.readmit(proxy[0], "192.0.2.1"))
        self.assertIsNone(g.readmit(proxy[0], "192.0.2.1"))     # the same client again on that connection
        self.assertEqual(g.readmit(proxy[1], "192.0.2.1"), "connections_per_address")
        self.assertIsNone(g.readmit(proxy[2], "192.0.2.2"))
        g.release(proxy[1])                                     # refused: no longer counted
        self.assertEqual(g.connections.by_address, {"192.0.2.1": 1, "192.0.2.2": 1})
        self.assertIsNone(g.readmit(proxy[0], "192.0.2.3"))     # reused for another client
        self.assertEqual(g.connections.by_address, {"192.0.2.3": 1, "192.0.2.2": 1})
        for t in proxy:
            g.release(t)
        self.assertEqual((g.connections.total, g.connections.by_address), (0, {}))

    def test_untrusted_peer_counts_as_itself(self):
        g = self.guard(per_address=1)
        a = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
        b = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 2))
        self.assertIsNone(g.admit(a, forwarded=True))
        self.assertEqual(g.admit(b, forwarded=True), "connections_per_address")

    def test_total_still_applies(self):
        g = self.guard(per_address=0, total=1)
        self.assertIsNone(g.admit(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)), forwarded=True))
        self.assertEqual(g.admit(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2)), forwarded=True),
                         "connections")


class LimitsTests(unittest.TestCase):
    def test_unknown_address_counts_in_total_only(self):
        c = ConnectionLimits(2, 1)
        self.assertIsNone(c.admit(None))
        self.assertIsNone(c.admit("a"))
        self.assertEqual(c.admit(None), "connections")
        c.release(None)
        self.assertEqual((c.total, c.by_address), (1, {"a": 1}))


class ConfigTests(unittest.TestCase):
    def check(self, keys: str) -> str:
        from msgd.config import ConfigError, parse_text
        try:
            parse_text("[node]\nname = t\n[interface:s]\ntype = stomp\n" + keys, "/tmp/node.ini")
        except ConfigError as e:
            return str(e)
        return "ok"

    def test_proxy_protocol_needs_trusted_proxies_and_plain_tcp(self):
        self.assertIn("proxy_protocol needs trusted_proxies",
                      self.check("endpoint = tcp:0\nproxy_protocol = yes\n"))
        from msgd.security.tls import make_ca, make_cert
        d = self.mktemp()
        os.makedirs(d)
        cert = make_cert(make_ca(d), d, "node", "127.0.0.1")
        self.assertIn("needs a plain endpoint",
                      self.check(f"endpoint = ssl:0:privateKey={cert['key']}:certKey={cert['cert']}\n"
                                 "proxy_protocol = yes\ntrusted_proxies = 127.0.0.1\n"))
        self.assertEqual(self.check("endpoint = tcp:0\nproxy_protocol = yes\ntrusted_proxies = 10.0.0.0/8\n"), "ok")
        self.assertIn("not an IP address", self.check("endpoint = tcp:0\ntrusted_proxies = proxy.example\n"))
