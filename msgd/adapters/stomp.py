"""``type = stomp``: send to a STOMP broker's destinations from app code.

::

    broker = api.adapter("broker")
    await broker.send("/queue/orders", {"id": 7})                 # JSON
    await broker.send("/queue/log", "text", {"persistent": "true"})
    await broker.send("/topic/raw", b"\\x00\\x01", {"content-type": "application/octet-stream"})

``send`` fires only after the broker's RECEIPT (so the message is the
broker's responsibility), and fails with an AdapterError otherwise: an ERROR
frame is a rejection (AdapterRejected), a lost connection an
AdapterUnavailable.  A send is retried only when it surely never reached the
broker (not connected).  Connections are the pool's, each a
:class:`~msgd.stomp.client.StompClient` (the consumer interface
uses the same client), with heart-beats so a dead broker is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected
from msgd.config import client_endpoint, duration, option, string
from msgd.core.jsonrpc import dumps
from msgd.stomp.client import BrokerError, StompClientFactory


def encode_body(body, headers: dict | None) -> tuple[bytes, dict]:
    """bytes as they are, str as UTF-8 text, anything else as JSON; a
    content-type is added when the caller gave none."""
    headers = dict(headers or {})
    if isinstance(body, (bytes, bytearray)):
        data, ctype = bytes(body), "application/octet-stream"
    elif isinstance(body, str):
        data, ctype = body.encode(), "text/plain; charset=utf-8"
    else:
        data, ctype = dumps(body), "application/json"
    headers.setdefault("content-type", ctype)
    return data, headers


class StompAdapter(Adapter):
    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        endpoint: str = option(parse=client_endpoint, doc="the broker, e.g. tcp:host=127.0.0.1:port=61613")
        login: str = option("", parse=string, doc="broker login")
        passcode: str = option("", parse=string, doc="broker passcode")
        vhost: str = option("/", parse=string, doc="virtual host (the CONNECT host header)")
        heartbeat: float = option(10.0, parse=duration, doc="heart-beat interval both ways (0: none)")

    def __init__(self, name, options, services):
        super().__init__(name, options, services)
        self.conns: set = set()

    async def _connect(self):
        o = self.options
        factory = StompClientFactory(self.reactor, login=o.login, passcode=o.passcode, vhost=o.vhost,
                                     heartbeat=o.heartbeat)
        conn = await clientFromString(self.reactor, o.endpoint).connect(factory)
        self.conns.add(conn)
        conn.lost.addCallback(lambda _: self.conns.discard(conn))
        try:
            await conn.handshake
        except Exception:
            conn.transport.abortConnection()
            raise
        return conn

    def connect(self):
        return defer.Deferred.fromCoroutine(self._connect())

    def disconnect(self, conn) -> None:
        conn.disconnect()

    def stopService(self):
        """Stop, and fire once every connection is closed."""
        super().stopService()
        for conn in list(self.conns):
            if conn.up:
                conn.disconnect()
        return defer.gatherResults([conn.lost for conn in self.conns])

    def classify(self, e: BaseException):
        if isinstance(e, BrokerError):
            return AdapterRejected(self.name, f"broker ERROR: {e}")
        return super().classify(e)

    def send(self, destination: str, body, headers: dict | None = None):
        """Deferred that fires once the broker confirmed the message."""
        data, headers = encode_body(body, headers)
        items = list(headers.items())

        def op(conn):
            # a connection closed while idle fails with NotConnected: nothing was sent, so it is retried
            return conn.send(destination, data, items)
        return self.call("send", op)
