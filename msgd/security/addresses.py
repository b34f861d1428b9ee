"""Who is on the other end: the one place that decides a client's address.

Behind a reverse proxy or a TCP load balancer every connection comes from the
proxy.  An interface believes what its ``trusted_proxies`` (addresses and
networks) say about the client, and nobody else:

- **HTTP** (``Forwarded`` / ``X-Forwarded-For``, the one ``forwarded_header``
  names): when the connection's peer is a trusted proxy, the header is read
  from its right end, where each proxy appends the address it saw.  A hop
  that is itself a trusted proxy is skipped; the first one that is not is the
  client.  Entries further left (what the client itself wrote) are never
  read, and a header from a peer that is not trusted is ignored.  A hop that
  is not an IP address (``unknown``, an obfuscated ``_name``) stops the walk
  at the proxy that wrote it.
- **PROXY protocol** v1 and v2 (``proxy_protocol = yes``, any listener):
  every connection starts with the header HAProxy (``send-proxy``,
  ``send-proxy-v2``), nginx's stream module (``proxy_protocol on``) and most
  TCP load balancers put first; it is accepted only from a trusted proxy (a
  connection from anyone else, or without a valid header within
  ``HEADER_TIMEOUT``, is closed) and its source address is then the
  connection's peer for everything: ``getPeer()``, limits, logs.

The decided address is what ``admin_allow``, the per-address connection
limits, login throttling and the log lines of refusals use
(:class:`msgd.security.guard.Guard`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.protocols import policies
# The parsers behind Twisted's own haproxy: endpoint (whose wrapper believes any
# peer).  These modules are PRIVATE to Twisted (no deprecation promise) and
# setup.py sets no upper bound on Twisted: tests/test_addresses.py
# (TwistedPrivateParsersTests) checks what is used here (V1Parser/V2Parser().feed
# -> (ProxyInfo or None, rest), V2Parser.PREFIX, InvalidProxyHeader), so a
# release that moves or changes them fails there by name, and so does this import.
try:
    from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser
except ImportError as e:
    import twisted
    raise ImportError(f"msgd.security.addresses needs Twisted's private twisted.protocols.haproxy._v1parser, "
                      f"_v2parser and _exceptions, which Twisted {twisted.__version__} does not have as "
                      f"expected ({e})") from e

log = Logger(namespace="msgd.security")

HEADER_TIMEOUT = 10.0          # seconds a PROXY header may take to arrive
_V2_SIGNATURE = V2Parser.PREFIX


def host_of(address) -> str:
    """The host of an IAddress (a unix socket's: its name, or "")."""
    host = getattr(address, "host", None)
    if host is not None:
        return host
    name = getattr(address, "name", None)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")


def ip(text: str):
    """An ``ipaddress`` object for an address as it appears in a forwarding
    header or a peer (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``,
    ``::ffff:1.2.3.4`` as IPv4), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:   # a tcp6: listener sees IPv4 clients so
        addr = addr.ipv4_mapped
    return addr


def _split(value: str, sep: str) -> list[str]:
    """``value`` split at ``sep`` outside quoted strings."""
    parts: list[str] = []
    part: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(part))
            part = []
        else:
            part.append(ch)
    parts.append("".join(part))
    return parts


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` node of each element of an RFC 7239 ``Forwarded`` value
    ("" for an element without one)."""
    out = []
    for element in _split(value, ","):
        node = ""
        for pair in _split(element, ";"):
            key, _, v = pair.partition("=")
            if key.strip().lower() == "for":
                node = v.strip().strip('"')
        out.append(node)
    return out


class ClientAddresses:
    """The ``trusted_proxies`` of one interface and the header they set."""

    def __init__(self, trusted=(), header: str = "x-forwarded-for"):
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.header = header.lower()
        self._raw_header = self.header.encode()

    def trusts(self, address) -> bool:
        """Whether ``address`` (a string or an ipaddress object) is a trusted proxy."""
        if not self.networks:
            return False
        addr = ip(address) if isinstance(address, str) else address
        return addr is not None and any(addr in net for net in self.networks)

    def resolve(self, peer: str, header_values) -> str:
        """The client behind ``peer`` given the forwarding header's values
        (each line of it, in order; str)."""
        if not header_values or not self.trusts(peer):
            return peer
        if self.header == "forwarded":
            hops = [h for v in header_values for h in _forwarded_for(v)]
        else:
            hops = [h for v in header_values for h in v.split(",")]
        client = peer
        for hop in reversed(hops):
            addr = ip(hop)
            if addr is None:
                return client           # unreadable: the proxy that wrote it is as far as we know
            client = str(addr)
            if not any(addr in net for net in self.networks):
                return client
        return client

    def of_connection(self, transport) -> str:
        """A connection's peer (after a PROXY header, its source)."""
        return host_of(transport.getPeer())

    def of_http(self, request) -> str:
        """A twisted.web request's client; decided once per request."""
        known = getattr(request, "client_address", None)
        if known is None:
            peer = host_of(request.getClientAddress())
            if self.networks:
                values = request.requestHeaders.getRawHeaders(self._raw_header)
                if values:
                    peer = self.resolve(peer, [v.decode("latin-1") for v in values])
            known = request.client_address = peer
        return known

    def of_handshake(self, headers: dict, transport) -> str:
        """A WebSocket handshake's client (Autobahn's lower-cased header
        dict, repeated headers joined with commas)."""
        peer = self.of_connection(transport)
        value = headers.get(self.header) if self.networks else None
        return self.resolve(peer, [value]) if value else peer


class ProxyProtocol(policies.ProtocolWrapper):
    """Reads a PROXY protocol header (v1 or v2) from a trusted proxy before
    the wrapped protocol sees the connection: its ``connectionMade`` runs
    after the header, with ``getPeer()`` already the client's address."""

    _info = None
    _buffer = b""
    _parser: V1Parser | V2Parser | None = None
    _timer = None

    def makeConnection(self, transport):
        # policies.ProtocolWrapper.makeConnection, less the wrapped protocol's (that waits for the header)
        from zope.interface import directlyProvides, providedBy
        directlyProvides(self, providedBy(transport))
        policies.Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = host_of(transport.getPeer())
        if not self.factory.addresses.trusts(peer):
            log.warn("{interface}: closed a connection from {address}: PROXY protocol is accepted from "
                     "trusted_proxies only", interface=self.factory.interface, address=peer)
            transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._refuse, "no PROXY header in time")

    def dataReceived(self, data: bytes):
        if self._info is not None:
            return self.wrappedProtocol.dataReceived(data)
        if self._parser is None:
            head = self._buffer = self._buffer + data
            if (len(head) < 16 and _V2_SIGNATURE.startswith(head[:12])) or b"PROXY ".startswith(head):
                return None              # too short to tell yet
            self._buffer = b""
            if head.startswith(_V2_SIGNATURE):
                self._parser = V2Parser()
            elif head.startswith(b"PROXY "):
                self._parser = V1Parser()
            else:
                return self._refuse("no PROXY header")
            data = head
        assert self._parser is not None
        try:
            info, rest = self._parser.feed(data)
        except InvalidProxyHeader:
            return self._refuse("invalid PROXY header")
        if info is None:
            return None
        if isinstance(info.source, (IPv4Address, IPv6Address)) and ip(info.source.host) is None:
            return self._refuse("invalid address in the PROXY header")
        self._info = info
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]   # a transport: it provides the wrapped one's interfaces
        transport: Any = self.transport
        if rest and not transport.disconnecting:
            self.wrappedProtocol.dataReceived(rest)
        return None

    def _refuse(self, reason: str):
        transport: Any = self.transport
        log.warn("{interface}: closed a connection from {address}: {reason}", interface=self.factory.interface,
                 address=host_of(transport.getPeer()), reason=reason)
        transport.abortConnection()

    def getPeer(self):
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()          # v2 LOCAL, v1 UNKNOWN: the proxy's own connection (a health check)

    def getHost(self):
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._info is None:
            self.factory.unregisterProtocol(self)     # the wrapped protocol never saw the connection
            return
        super().connectionLost(reason)


class ProxyProtocolFactory(policies.WrappingFactory):
    protocol = ProxyProtocol

    def __init__(self, wrapped, addresses: ClientAddresses, clock, interface: str = ""):
        super().__init__(wrapped)
        self.addresses = addresses
        self.clock = clock
        self.interface = interface
