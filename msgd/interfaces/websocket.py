"""WebSocket at ``/ws`` on an HTTP interface's Site (Autobahn on Twisted).

Wire protocol (subprotocol ``jsonrpc``, or none)
------------------------------------------------

Every text message is one JSON-RPC 2.0 message (a call, a notification or a
batch), answered as over HTTP.  App calls: ``{"jsonrpc":"2.0","id":1,
"method":"orders.place","params":[…]}``.  Reserved methods:

``rpc.subscribe {"channel": C, "since": N?, "epoch": E?}``
    Subscribe to channel C (or a pattern such as ``news.*``).  With ``since``
    (the last offset seen) and ``epoch``, the missed events are replayed —
    *before* the answer — when history still covers them.  Answer:
    ``{"channel", "epoch", "offset", "recovered"}``; ``recovered: false``
    means events were lost: reload your state.  A pattern's answer has
    ``"pattern": true`` and ``epoch``/``offset`` as objects by channel (every
    matched channel with events); it resumes with the positions held, in the
    same form: ``"since": {"a.x": 7}, "epoch": {"a.x": E}`` — every matched
    channel is replayed from there (one not named: from its first event),
    and ``recovered`` is true only if all of them could be.
``rpc.unsubscribe {"channel": C}``
``rpc.publish {"channel": C, "data": D}``  → ``{"channel", "offset"}``
``rpc.presence {"channel": C}``  → ``{"channel", "count", "principals"}``

Events arrive as notifications::

    {"jsonrpc":"2.0","method":"rpc.event","params":{"channel":C,"offset":N,"epoch":E,"data":D}}

Subprotocols ``v12.stomp``, ``v11.stomp``, ``v10.stomp`` speak STOMP on the
same endpoint.

Limits: messages above ``ws_max_message`` close the connection (1009).  A
client that does not read: while its socket buffer is full the node stops
reading its requests, and events queue per connection up to
``ws_max_pending`` bytes; past that it is closed with code 1008 and the reason
``slow consumer``, counted in ``msgd_ws_dropped_total``: the events not yet
handed to the socket are dropped so that the close frame comes next, and the
client has ``close_timeout`` to read it before the connection is aborted.
Others are not affected.  Keep-alive pings every ``ws_ping_interval``; no
pong within ``ws_ping_timeout`` closes the connection.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.core.pubsub import framed
from msgd.interfaces.base import discard_unsent
from msgd.interfaces.connection import Clients
from msgd.interfaces.stomp.session import SessionOptions, StompSession
from msgd.interfaces.writer import BoundedWriter, Producer
from msgd.net import write_now
from msgd.options import boolean, duration, option, size, words
from msgd.security.http import TOKEN_SUBPROTOCOL, origin_allowed

STOMP_SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
REFUSAL_SUBPROTOCOL = "msgd.refusal"   # offered by msgd.js: "tell me a refused login in-band (4001)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebSocketOptions:
    """``/ws``: WebSocket (switch ``websocket``; the status page's socket uses them too)"""

    websocket: bool = option(True, parse=boolean, doc="serve WebSocket (JSON-RPC, pub/sub, STOMP) at /ws")
    ws_max_message: int = option(1024 * 1024, parse=size, doc="largest WebSocket message accepted")
    ws_max_pending: int = option(1024 * 1024, parse=size,
                                 doc="events and answers queued for a client that does not read; past it the client is dropped")
    ws_ping_interval: float = option(30.0, parse=duration, doc="keep-alive ping interval (0: none)")
    ws_ping_timeout: float = option(10.0, parse=duration, doc="close when no pong arrives within this")
    ws_origins: tuple = option(("*",), parse=words,
                               doc="allowed Origin patterns, e.g. https://app.example.org http://localhost:*")


class Counters:
    """The WebSocket metrics of one HTTP interface (``/ws`` and the status
    page's socket count in them)."""

    def __init__(self, metrics, interface: str):
        self.connections = metrics.gauge("msgd_ws_connections", "Open WebSocket connections",
                                         ["interface"]).labels(interface)
        self.dropped = metrics.counter("msgd_ws_dropped_total", "WebSocket connections closed by the node",
                                       ["interface", "reason"])
        self.interface = interface


def frame(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 5.2), as a server
    sends it.  Written straight to the transport: events are framed once and
    the same bytes go to every subscriber."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def unmask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """``data`` XORed with a client frame's 4-byte masking ``key`` (RFC 6455
    5.3), ``offset`` bytes into the frame's payload.  One big-integer XOR:
    for the small frames of JSON-RPC a quarter of what Autobahn's per-frame
    masker objects cost."""
    n = len(data)
    if offset & 3:
        key = key[offset & 3:] + key[:offset & 3]
    keys = (key * ((n + 3) >> 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


log = Logger()

# Autobahn copies these options from the factory to each new connection and,
# doing so, formats all of them with pprint for a debug line, logged or not:
# a fifth of the CPU a new connection costs.  Each MsgdWebSocketFactory makes
# its own subclass of MsgdWebSocket holding them as class attributes instead,
# and leaves Autobahn none to copy: a connection holds only what differs.
_PROTOCOL_OPTIONS = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

# Autobahn's per-connection state as it is on an open connection between
# messages, held by the class: MsgdWebSocket._settle() removes what equals it
# from a new connection's __dict__ (anything Autobahn sets again lands in the
# instance, as before).  The traffic counters are shared: nothing reads them.
_AT_REST = {
    "data": b"", "send_queue": (), "triggered": False, "send_state": 0, "inside_message": False,
    "current_frame": None, "current_frame_masker": None, "frame_data": None, "frame_length": 0,
    "message_data": None, "message_data_total_length": 0, "message_is_binary": False,
    "utf8validateLast": None, "utf8validateIncomingCurrentMessage": True, "_isMessageCompressed": False,
    "_perMessageCompress": None, "trackedTimings": None, "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False, "closedByMe": False, "failedByMe": False, "droppedByMe": False,
    "wasClean": False, "wasNotCleanReason": None, "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False, "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False, "localCloseCode": None, "localCloseReason": None,
    "remoteCloseCode": None, "remoteCloseReason": None, "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None, "autoPingTimeoutCall": None, "autoPingPending": None,
    "autoPingPendingCall": None, "autoPingPendingSent": None, "autoPingPendingSeq": 0,
    "websocket_version": 13, "websocket_extensions_in_use": (), "_transport_details": None,
    "trafficStats": TrafficStats(),
}
# ... and what the opening handshake left that nothing reads once the connection is open
_HANDSHAKE_ONLY = ("http_headers", "http_request_data", "http_response_data", "http_status_line",
                   "http_request_uri", "http_request_path", "http_request_params", "http_request_host",
                   "websocket_protocols", "websocket_extensions", "websocket_origin", "_wskey")


class MsgdWebSocket(Producer, WebSocketServerProtocol):  # type: ignore[misc]   # autobahn's own bases disagree
    """One browser (or other client) connection.  ``self.log`` stays
    Autobahn's own (txaio's, whose levels below ``[node] log_level`` are
    no-ops: Autobahn logs at debug several times per message); msgd's own
    lines go to this module's ``log``."""

    CONFIG_ATTRS: list[str] = []
    principal = None    # from the handshake
    connection = None   # JSON-RPC: msgd.interfaces.connection
    stomp = None
    writer = None       # the bounded writer of events (JSON-RPC; a STOMP session has its own)
    _closing = False
    _opened = False
    _refusal = None

    def _settle(self):
        """Open: let the connection's __dict__ hold only what differs from
        the class (a new, compact dict; the old one had room for 100 keys)."""
        d = self.__dict__
        if d.get("_listeners") is None:     # txaio events: nobody listens (set_valid_events made these)
            d.pop("_valid_events", None)
            d.pop("_results", None)
        for name in _HANDSHAKE_ONLY + ("trafficStats", "_transport_details"):
            d.pop(name, None)
        for name in ("send_queue", "websocket_extensions_in_use"):
            if not d.get(name, True):
                del d[name]         # empty: the class's () does
        cls = type(self)
        self.__dict__ = {k: v for k, v in d.items() if getattr(cls, k, _AT_REST) is not v}

    # -- handshake -------------------------------------------------------------

    def onConnect(self, request):
        origin = request.headers.get("origin")
        if not origin_allowed(origin, self.factory.interface.options.ws_origins):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {origin} is not allowed")
        guard = self.factory.interface.guard
        if guard.addresses.networks:        # behind a trusted proxy: log lines name the client
            client = guard.addresses.of_handshake(request.headers, self.transport)
            if client != guard.addresses.of_connection(self.transport):
                self.peer = f"{client} (via {self.peer})"
        # who is calling (a token, Basic/Bearer, or anonymous): see msgd.security; may wait for a thread
        d = guard.authenticate_ws(request, self.transport)
        return d.addCallbacks(self._authenticated, self._refused, callbackArgs=(request,),
                              errbackArgs=(request,))

    def _refused(self, failure, request):
        e = failure.value
        if isinstance(e, errors.Overloaded):
            raise ConnectionDeny(429, e.message)
        if isinstance(e, errors.Unauthorized):
            if REFUSAL_SUBPROTOCOL in request.protocols:
                # a browser cannot see the HTTP status of a refused handshake: open, then close
                # with 4001 and the reason, so that msgd.js stops retrying
                self._refusal = e.message
                return "jsonrpc" if "jsonrpc" in request.protocols else REFUSAL_SUBPROTOCOL
            raise ConnectionDeny(401, e.message)
        raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "credentials cannot be checked now")

    def _authenticated(self, principal, request):
        self.principal = principal
        offered = [p for p in request.protocols
                   if not p.startswith(TOKEN_SUBPROTOCOL) and p != REFUSAL_SUBPROTOCOL]
        if not offered:
            return None
        for p in offered:
            if p in STOMP_SUBPROTOCOLS:
                self.stomp_version = p[1:3]
                return p
        if "jsonrpc" in offered:
            return "jsonrpc"
        raise ConnectionDeny(ConnectionDeny.BAD_REQUEST,
                             f"unsupported subprotocol(s) {', '.join(offered)}; use jsonrpc")

    def onOpen(self):
        if self._refusal is not None:
            self.sendClose(4001, self._refusal[:120])
            return
        iface = self.factory.interface       # the HTTP connection was admitted: among its connections
        iface.goodbyes[self.transport] = self.going_away
        self.factory.counters.connections.inc()
        self._opened = True
        self.transport.unregisterProducer()     # twisted.web's HTTPChannel was the producer until now
        self.transport.registerProducer(self, True)
        if getattr(self, "stomp_version", None):
            o = iface.options
            # this interface's bounds; the WebSocket handshake authenticated the caller: a CONNECT's
            # login is not believed
            options = SessionOptions.within(o.ws_max_message, o.ws_max_pending, iface.timeout(),
                                            authenticate=lambda login, passcode: self.principal)
            transport = self.transport
            self.stomp = StompSession(
                iface.services, iface.name, write=lambda data: self.sendMessage(data, False),
                close=self._stomp_close, peer=self.peer, version_hint=self.stomp_version, options=options,
                discard=lambda: discard_unsent(transport))
        else:
            self.connection = self.factory.clients.connect(self.deliver, self.principal)
            transport = self.transport
            self.writer = BoundedWriter(lambda data: write_now(transport, data), iface.options.ws_max_pending,
                                        self._drop_slow, lambda: discard_unsent(transport), iface.turn)
        self._settle()

    # -- requests ----------------------------------------------------------------

    def onFrameData(self, payload):
        # The factory turns Autobahn's applyMask off: a client frame's payload comes here
        # still masked (Autobahn checks that it is masked), and is unmasked by unmask().
        mask = self.current_frame.mask
        if mask is not None and payload:
            payload = unmask(payload, mask, self.current_frame_masker.pointer() - len(payload))
        return super().onFrameData(payload)

    def onMessageEnd(self):
        # Autobahn's own also fires a txaio "message" event, a Deferred per message, for
        # listeners msgd never registers
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload, isBinary):
        if self._refusal is not None or self._closing:
            return      # refused, or closed by the node: nothing more is served
        self.current_frame_masker = None    # the frame's, done with: not kept while idle
        if not isBinary and not payload.isascii():
            # the factory turns Autobahn's UTF-8 validation off: it costs every message
            # more than this check, and orjson checks again what it parses
            try:
                payload.decode()
            except UnicodeDecodeError as e:
                self._invalid_payload(f"invalid UTF-8 in a text message at octet {e.start}")
                return
        if self.stomp is not None:
            self.stomp.data_received(payload)
            return
        if isBinary:
            self._send_json(error_response(errors.InvalidRequest("binary messages are not JSON-RPC")))
            return
        self.connection.answer(payload, self._answer)

    def _answer(self, data):
        if self.state == self.STATE_OPEN:
            if self._perMessageCompress is None:
                self.writer.write(frame(data))      # after the events of this turn, in the same write
            else:
                self.sendMessage(data, False)

    def _send_json(self, obj):
        self.sendMessage(dumps(obj), False)

    def sendData(self, data, sync=False, chopsize=None):
        # what Autobahn writes itself (close, ping, pong, sendMessage) goes after the frames
        # held for the end of the turn
        writer = self.writer
        if writer is not None and writer.queue and not writer.paused:
            writer.flush()
        if (sync or chopsize) and "send_queue" not in self.__dict__:
            self.send_queue = deque()       # the class's (at rest) is an empty tuple
        super().sendData(data, sync, chopsize)

    # -- events --------------------------------------------------------------------

    def deliver(self, event):
        """Called by the broker for each event on a subscribed channel: the
        frame is prepared once per event and written as is (at the end of
        the reactor turn, with the connection's other frames)."""
        if self.state != self.STATE_OPEN or self._closing:
            return
        self.writer.write(framed(event, "ws", frame))

    def _drop_slow(self, limit):
        self._closing = True
        self.connection.close()                 # no more events: it is no longer among the subscribers
        counters = self.factory.counters
        counters.dropped.labels(counters.interface, "slow_consumer").inc()
        log.warn("closing WebSocket {peer}: slow consumer (more than {limit} bytes of events and answers unsent)",
                 peer=self.peer, limit=limit)
        # 1008 "policy violation"; Autobahn's sendClose allows only 1000 and 3000-4999.
        # The close handshake timeout (close_timeout) drops the connection when the client does not answer.
        self.sendCloseFrame(1008, f"slow consumer: more than {limit} bytes unsent".encode())
        if hasattr(self.transport, "resumeProducing"):
            self.transport.resumeProducing()    # read again: the client's close frame answers ours

    # the transport tells when its buffer is full / drained (writer.Producer)
    def _writer(self):
        return self.stomp.writer if self.stomp is not None else self.writer   # STOMP bounds its own frames

    # -- end -------------------------------------------------------------------------

    def going_away(self):
        """The node drains or the interface goes: close with 1001 "going
        away" so that clients reconnect (elsewhere) at once."""
        self._closing = True
        self.sendCloseFrame(1001, b"node going away")   # sendClose allows only 1000 and 3000-4999

    def _stomp_close(self, reason: str = ""):
        self.sendClose(1000, reason[:120] if reason else None)

    def onClose(self, wasClean, code, reason):
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.stomp is not None:
            self.stomp.connection_lost()
            self.stomp = None

    def connectionLost(self, reason):
        # The HTTP connection this one took over was admitted (TrackedChannel), and its channel is
        # told nothing more: closed here, whether the handshake was accepted or refused.
        self.factory.interface.closed(self.transport)
        if getattr(self, "closeHandshakeTimeoutCall", None) is not None:
            self.closeHandshakeTimeoutCall.cancel()     # Autobahn leaves it pending (close_timeout)
            self.closeHandshakeTimeoutCall = None
        if self._opened:
            self._opened = False
            self.factory.counters.connections.dec()
        super().connectionLost(reason)


for _name, _value in _AT_REST.items():
    setattr(MsgdWebSocket, _name, _value)


class MsgdWebSocketFactory(WebSocketServerFactory):
    """Connections are of a subclass of ``protocol`` (MsgdWebSocket or one of
    its subclasses) made for this factory, which holds its options.  Its
    JSON-RPC ``clients`` are the interface's usual ones unless given."""

    protocol = MsgdWebSocket

    def __init__(self, interface, protocol: type = MsgdWebSocket, clients: Clients | None = None):
        super().__init__(url=None, server="msgd")
        self.interface = interface
        self.counters = interface.shared.websocket
        self.clients = clients if clients is not None else Clients(
            interface, interface.options.max_batch, interface.options.ws_max_subscriptions)
        o = interface.options
        self.setProtocolOptions(
            maxMessagePayloadSize=o.ws_max_message, maxFramePayloadSize=o.ws_max_message,
            autoPingInterval=o.ws_ping_interval or 0, autoPingTimeout=o.ws_ping_timeout,
            allowedOrigins=["*"],   # checked in onConnect: Autobahn's check also requires our port
            allowNullOrigin=True,
            openHandshakeTimeout=10, closeHandshakeTimeout=o.close_timeout,
            # a protocol error (too big, invalid UTF-8) is answered with its close code (1009,
            # 1007), then the connection closes within close_timeout; not a bare TCP drop
            failByDrop=False,
            tcpNoDelay=True,
            applyMask=False, utf8validateIncoming=False,    # MsgdWebSocket unmasks and checks UTF-8
        )
        options = {name: getattr(self, name) for name in _PROTOCOL_OPTIONS}
        made: Any = type(protocol.__name__, (protocol,), {   # a function stays one, not a method
            name: staticmethod(v) if inspect.isfunction(v) else v for name, v in options.items()})
        self.protocol = made


def make_resource(interface):
    return WebSocketResource(MsgdWebSocketFactory(interface))
