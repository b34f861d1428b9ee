"""JSON-RPC 2.0 over a plain byte stream (``type = jsonrpc-stream``), so that
local tools and programs in any language can talk to a node through a unix
socket (or TCP, or TLS) without HTTP or WebSocket.

Wire protocol
-------------

One JSON-RPC message per line, UTF-8, ended by ``\\n`` (a ``\\r`` before it is
ignored; empty lines are skipped).  A line is a call, a notification or a
batch, answered on one line exactly as on ``/ws``; answers may come back in
another order than the calls (match them by ``id``).  Pub/sub uses the same
reserved methods as ``/ws``: ``rpc.subscribe {"channel", "since"?, "epoch"?}``
(for a pattern, objects by channel), ``rpc.unsubscribe``, ``rpc.publish``,
``rpc.presence``; events arrive as ``rpc.event`` notification lines.  Example
with a shell::

    $ printf '%s\\n' '{"jsonrpc":"2.0","id":1,"method":"chat.rooms"}' | nc -U -q1 var/msgd.sock
    {"jsonrpc":"2.0","result":["lobby","random","help"],"id":1}

A line that is not JSON is answered with a -32700 error and the connection
stays open.  A line longer than ``max_line`` is answered with a -32004 error
and the connection is closed (the stream cannot be resynchronised safely).

Logging in: the interface takes the security keys of every interface
(``auth``, ``anonymous``, ``token_secret``, limits; see docs/security.rst).
A client gives credentials with the builtin ``rpc.login {"user", "password"}``
or ``rpc.login {"token"}`` (answered ``{"name", "roles", "via"}``); they hold
for the rest of the connection.  With ``anonymous = no`` every other call
before a successful login is refused with -32001.  On an ``mtls:`` endpoint
with ``cert_principal = yes`` the client certificate's CN is the principal
from the start.  A connection past ``max_connections`` (or per address) gets
an ``rpc.closing`` notification and is closed.

Slow consumers: while the client does not read, the node stops reading its
requests and queues what it has to send, up to ``max_pending`` bytes; past
that what was not yet handed to the socket is dropped, the client is sent a
last ``rpc.closing`` notification naming the reason and is disconnected
(counted in ``msgd_stream_dropped_total``), aborted if it has not read that
within ``close_timeout``.
"""

from __future__ import annotations

from typing import Any

import os
from dataclasses import dataclass

from twisted.internet import protocol
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger

from msgd.config import Invalid, duration, integer, option, optional_duration, server_endpoint, size
from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.core.pubsub import framed
from msgd.interfaces.base import Listener, discard_unsent
from msgd.interfaces.connection import CONNECTED, Clients, closing
from msgd.interfaces.writer import BoundedWriter, Producer
from msgd.net import write_now
from msgd.security import Guard, SecurityOptions
from msgd.services import Services


def stream_endpoint(value: str, ctx) -> str:
    """A server endpoint string; a relative ``unix:`` path is taken relative
    to the ini file's directory, like every other path of the config."""
    v = server_endpoint(value, ctx)
    if v.startswith("unix:"):
        address = v[len("unix:"):]
        if address.startswith("address="):
            address = address[len("address="):]
            prefix = "unix:address="
        else:
            prefix = "unix:"
        if not address:
            raise Invalid("unix: needs a path")
        if not os.path.isabs(address) and not address.startswith("\\"):
            v = prefix + os.path.normpath(os.path.join(ctx.base_dir, address))
    return v


@dataclass(frozen=True)
class Options(SecurityOptions):     # auth, anonymous, tokens and limits: see docs/security.rst
    endpoint: str = option(parse=stream_endpoint,
                           doc="where to listen, e.g. unix:../var/msgd.sock or tcp:7070:interface=127.0.0.1")
    max_line: int = option(1024 * 1024, parse=size, doc="longest line (message) accepted; longer closes")
    max_pending: int = option(1024 * 1024, parse=size,
                              doc="bytes queued for a client that does not read; past it the client is dropped")
    close_timeout: float = option(10.0, parse=duration,
                                  doc="how long a client the node closes has to read the last line (rpc.closing) "
                                      "before the connection is aborted")
    max_batch: int = option(100, parse=integer(1), doc="most calls in one batch")
    max_subscriptions: int = option(1000, parse=integer(1), doc="most subscriptions per connection")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of requests here (default: [node] request_timeout)")


def _line(notification: bytes) -> bytes:
    return notification + b"\n"


class StreamProtocol(Producer, protocol.Protocol):
    """One client connection: splits lines, answers them, delivers events;
    while the client does not read, it is not read (``msgd.interfaces.writer.Producer``)."""

    log = Logger()
    transport: ITCPTransport   # set by connectionMade, before any use

    def __init__(self, interface: "StreamInterface"):
        self.interface = interface
        self.connection: Any = None     # a Connection once admitted
        self._buffer = b""
        self.writer: Any = None         # a BoundedWriter once admitted
        self._closing = False

    def connectionMade(self):
        iface = self.interface
        if not iface.admit(self.transport, self._refuse):
            return
        # the node's [access:*] rules apply to calls and channels, for the principal of rpc.login
        address = iface.guard.addresses.of_connection(self.transport)     # rpc.login's throttle
        self.connection = iface.clients.connect(self.deliver, address=address)
        transport = self.transport
        self.writer = BoundedWriter(lambda data: write_now(transport, data), iface.options.max_pending, self._slow,
                                    lambda: discard_unsent(transport), iface.turn)
        self.transport.registerProducer(self, True)

    def _refuse(self, limit: str):
        self.transport.write(closing(f"too many connections ({limit})") + b"\n")
        self._closing = True
        self.transport.loseConnection()

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes):
        if self._closing:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        limit = self.interface.options.max_line
        for line in lines:
            if len(line) > limit:
                return self._too_long(limit)
            line = line.rstrip(b"\r")
            if line.strip():
                self._handle(line)
            if self._closing:
                return
        if len(self._buffer) > limit:
            self._too_long(limit)

    def _too_long(self, limit: int):
        self._buffer = b""
        self._write(dumps(error_response(errors.TooLarge(f"line longer than {limit} bytes"))) + b"\n")
        self._drop("line_too_long")

    def _handle(self, line: bytes):
        c = self.connection
        if c.principal is None:
            # known once the TLS handshake is done, which is before any request can arrive
            c.principal = self.interface.guard.certificate_principal(self.transport)
        c.answer(line, self._answer)

    def _answer(self, data: bytes):
        self._write(data + b"\n")

    # -- output ------------------------------------------------------------------

    def deliver(self, event):
        """Called by the broker for each event of a subscribed channel."""
        self._write(framed(event, "line", _line))

    def _write(self, data: bytes):
        if not self._closing and self.writer is not None:
            self.writer.write(data)

    def _slow(self, limit: int):
        self.log.warn("closing stream client {peer}: slow consumer (more than {limit} bytes unsent)",
                      peer=self.transport.getPeer(), limit=limit)
        self.writer.last(closing(f"slow consumer: more than {limit} bytes unsent") + b"\n")
        self._drop("slow_consumer")

    def _drop(self, reason: str):
        self._closing = True
        self.writer.close()
        self.connection.close()             # no more events
        self.interface.dropped.labels(self.interface.name, reason).inc()
        self.interface.close_within(self.transport, self.interface.options.close_timeout)

    # -- end ---------------------------------------------------------------------

    def connectionLost(self, reason):
        if self.connection is not None:
            self.writer.close()
            self.connection.close()
        self.interface.closed(self.transport)


class StreamFactory(protocol.Factory):
    noisy = False

    def __init__(self, interface):
        self.interface = interface

    def buildProtocol(self, addr):
        return StreamProtocol(self.interface)


class StreamInterface(Listener):
    """``[interface:NAME] type = jsonrpc-stream``."""

    Options = Options
    type_name = "jsonrpc-stream"

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.guard = Guard(self)
        self.clients = Clients(self, options.max_batch, options.max_subscriptions, (*CONNECTED, "rpc.login"))
        m = self.services.metrics
        self.gauge = m.gauge("msgd_stream_connections", "Open JSON-RPC stream connections",
                             ["interface"]).labels(name)
        self.dropped = m.counter("msgd_stream_dropped_total", "JSON-RPC stream connections closed by the node",
                                 ["interface", "reason"])

    def privilegedStartService(self):
        if self.options.endpoint.startswith("unix:"):
            path = self.options.endpoint.split(":", 1)[1].removeprefix("address=").split(":")[0]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        super().privilegedStartService()

    def factory(self):
        return StreamFactory(self)
