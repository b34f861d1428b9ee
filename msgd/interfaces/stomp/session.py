"""One STOMP server connection, without a transport.

The TCP listener (:mod:`.listener`) and the WebSocket subprotocols
``v12.stomp``/``v11.stomp``/``v10.stomp`` (:mod:`msgd.interfaces.websocket`)
both build a :class:`StompSession` with a ``write(bytes)`` and a
``close(reason)`` callable, its :class:`SessionOptions` and a ``discard``
callable (which drops what the transport has not begun to send; its
writer's, see :mod:`msgd.interfaces.writer`) and feed it what arrives, so
every rule below is written once.  Given the listener's ``turn``, what a session writes
during a reactor turn (the MESSAGE frames of a burst of events, receipts,
an ERROR after them) reaches the transport in one write at its end.

Pub/sub goes through the connection's :class:`msgd.core.pubsub.Session`, as
on every protocol: each SUBSCRIBE id is one subscriber of it, so the bound
on subscriptions (``max_subscriptions``), the channel check
(``Session.check``), presence and the end of every subscription with the
connection are the Session's.

Wire protocol
-------------

``CONNECT``/``STOMP``
    ``accept-version`` (none: 1.0, or the WebSocket subprotocol's version),
    ``login``/``passcode`` (checked by ``options.authenticate``: the
    listener's security keys, or the WebSocket handshake's principal),
    ``heart-beat``.  Answered ``CONNECTED`` with ``version``, ``heart-beat``,
    ``session``, ``server``.
``SUBSCRIBE destination:/topic/CHANNEL id:ID ack:auto|client|client-individual``
    Subscribes to the pub/sub channel (or pattern, ``/topic/news.*``), shared
    with WebSocket JSON-RPC subscribers.  ``msgd-since``/``msgd-epoch``
    resume after a known offset; for a pattern ``msgd-since`` lists the
    positions held, ``epoch:offset:channel`` separated by spaces (a matched
    channel it does not name is replayed from its first event).  The
    ``RECEIPT`` (when asked for) tells how it went: ``msgd-recovered``
    (``false``: events were lost), and ``msgd-epoch``/``msgd-offset`` (a
    pattern: ``msgd-positions``, the same list for every matched channel
    with events).  Each event arrives as ``MESSAGE`` with
    ``destination``, ``subscription``, ``message-id``, ``ack`` (1.2, not in
    auto mode), ``content-type:application/json``, ``msgd-channel``,
    ``msgd-offset``, ``msgd-epoch`` and the event's data as JSON body.
``SUBSCRIBE destination:/temp-queue/NAME id:ID``
    Where this connection's ``reply-to:/temp-queue/NAME`` answers go (they
    then carry ``subscription:ID``).
``UNSUBSCRIBE id:ID``
``ACK``/``NACK``
    ``id`` (1.2) or ``message-id`` (1.0/1.1).  ``client`` acks cumulatively.
    Pub/sub events are not redelivered: acks bound how many events a client
    may leave unacknowledged (``max_unacked``; past it the client is
    dropped), NACK only counts.
``SEND destination:/topic/CHANNEL``
    Publishes the body: JSON when ``content-type`` is JSON (or absent and the
    body parses), else the text.
``SEND destination:/app/module.function``
    Calls the app: a JSON array body is the positional arguments, an object
    the keyword arguments, another value the one argument, an empty body
    none.  ``receipt`` is answered only after the call succeeded; with
    ``reply-to`` the result is sent there first (``/topic/C`` publishes it,
    any other destination comes back to this connection as a ``MESSAGE``
    with that destination and the request's ``correlation-id``).  A failed
    call is an ``ERROR`` frame (``message``: the error's message,
    ``msgd-code``/``msgd-error``: its taxonomy code and name, ``receipt-id``)
    and the connection is closed, as STOMP requires after ERROR.
``BEGIN``/``COMMIT``/``ABORT``
    SENDs with a ``transaction`` header wait for COMMIT (run in order) or
    are dropped by ABORT.
``DISCONNECT``
    Waits for the calls still running, answers ``receipt``, closes.

Bad input (a malformed frame, a frame before CONNECT, an unknown command
or destination) gets one ``ERROR`` frame and the connection is closed.
Bounds: the codec's :class:`~msgd.stomp.codec.Limits`, subscriptions
(topics and ``/temp-queue/`` destinations together, bounded by the pub/sub
Session), unacked messages, calls in flight, transactions, and ``max_pending`` bytes queued
for a client whose socket does not drain (then what was not yet handed to
the socket is dropped and the client gets an ERROR frame, reason ``slow
consumer``, before the connection is closed).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import msgd
from msgd.core import errors
from msgd.core.jsonrpc import dumps, loads
from msgd.core.pubsub import Session, check_channel, format_positions, is_pattern, parse_positions
from msgd.interfaces.writer import BoundedWriter, Turn
from msgd.stomp.codec import (Decoder, Frame, Limits, ProtocolError, encode, negotiate_heartbeat, negotiate_version,
                              parse_heartbeat)

TOPIC = "/topic/"
APP = "/app/"
TEMP = "/temp-queue/"
ACK_MODES = ("auto", "client", "client-individual")
_session_ids = itertools.count(1)


@dataclass(frozen=True)
class SessionOptions:
    """Per-connection rules: the listener builds them from its ``Options``,
    the WebSocket layer from the HTTP interface's (:meth:`within`)."""
    limits: Limits = field(default_factory=Limits)
    heartbeat: tuple[int, int] = (10000, 10000)   # ms: we can send, we want to receive
    connect_timeout: float = 10.0
    request_timeout: float | None = None
    max_subscriptions: int = 100
    max_unacked: int = 1000
    max_in_flight: int = 100
    max_pending: int = 1024 * 1024
    max_transactions: int = 16
    max_transaction_frames: int = 1000
    authenticate: Callable[[str, str], Any] | None = None   # (login, passcode) -> principal | Deferred

    @classmethod
    def within(cls, max_message: int, max_pending: int, request_timeout: float | None, **kw) -> SessionOptions:
        """The rules of a session inside another protocol's messages (a
        WebSocket's): no frame longer than ``max_message`` bytes, at most
        ``max_pending`` bytes queued, ``request_timeout`` for /app calls."""
        return cls(limits=Limits(max_frame=max_message, max_body=min(max_message, Limits.max_body)),
                   max_pending=max_pending, request_timeout=request_timeout, **kw)


class _Subscription:
    """One SUBSCRIBE: a subscriber of the connection's pub/sub Session."""

    __slots__ = ("session", "id", "destination", "channel", "ack", "unacked")
    notices = False      # rpc.join / rpc.leave have no STOMP form

    def __init__(self, session, id, destination, channel, ack):
        self.session, self.id, self.destination, self.channel, self.ack = session, id, destination, channel, ack
        self.unacked: dict[str, None] = {}    # message ids, oldest first

    @property
    def principal(self):
        return self.session.principal

    def deliver(self, event):
        self.session.deliver(self, event)


class StompSession:
    log = Logger()

    def __init__(self, services, interface_name: str, write: Callable[[bytes], Any], close: Callable[[str], Any],
                 peer: str = "", version_hint: str | None = None, options: SessionOptions | None = None,
                 turn: Turn | None = None, discard: Callable[[], Any] | None = None):
        self.services = services        # msgd.services.Services
        self.interface = interface_name
        self._write_out = write
        self._close_out = close
        self.peer = peer
        self.hint = f"{version_hint[0]}.{version_hint[1]}" if version_hint else None
        self.options = options or SessionOptions()
        self.decoder = Decoder(self.options.limits)
        self.clock = services.reactor
        self.id = f"{os.urandom(3).hex()}-{next(_session_ids)}"
        self.version = "1.2"
        self.principal = None
        # subscribing, channel access and publishing go through the pub/sub Session, as on every
        # protocol; each SUBSCRIBE is one of its subscribers
        self.pubsub = Session(services.pubsub, None, max_subscriptions=self.options.max_subscriptions,
                              authorize=services.access.authorize_channel)
        self.state = "new"             # new → connecting → connected → closed
        self.subscriptions: dict[str, _Subscription] = {}
        self.temp: dict[str, str] = {}     # /temp-queue/NAME -> subscription id
        self.unacked: dict[str, _Subscription] = {}
        self.transactions: dict[str, list[Frame]] = {}
        self.in_flight: set = set()
        # the transport's pauseProducing/resumeProducing pause and resume it; with a turn, what is
        # written during a reactor turn goes out at its end in one write
        self.writer = BoundedWriter(self._out, self.options.max_pending, self._slow, discard, turn)
        self.last_read = self.last_write = self.clock.seconds()
        self._ids = itertools.count(1)
        self._loops: list[LoopingCall] = []
        self._errors = services.metrics.counter("msgd_stomp_errors_total", "STOMP ERROR frames sent, by kind",
                                            ["interface", "kind"])
        self._connect_timer = self.clock.callLater(self.options.connect_timeout, self._no_connect) \
            if self.options.connect_timeout else None

    # -- input ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.last_read = self.clock.seconds()
        if self.state == "connecting":
            # the login is being checked: keep the bytes (boundedly) until the
            # version, which decides how they decode, is settled
            self.decoder.buf += data
            if len(self.decoder.buf) > self.options.limits.max_frame:
                self.error("too much data before CONNECTED", kind="protocol")
            return
        try:
            frames = self.decoder.feed(data)
            while frames:
                for frame in frames:
                    self.frame_received(frame)
                    if self.state in ("closed", "connecting"):
                        return
                frames = self.decoder.feed(b"") if self.decoder.pending() else []
        except ProtocolError as e:
            self.error(str(e), kind="protocol")
        except Exception:
            self.log.failure("STOMP session {peer} failed", peer=self.peer)
            self.error("internal error", kind="internal")

    def frame_received(self, frame: Frame) -> None:
        if self.state == "disconnecting":
            return
        if self.state == "new":
            if frame.command not in ("CONNECT", "STOMP"):
                raise ProtocolError(f"expected CONNECT, got {frame.command}")
            self.on_connect(frame)
            return
        handler = getattr(self, "on_" + frame.command.lower(), None)
        if handler is None or frame.command in ("CONNECT", "STOMP"):
            raise ProtocolError(f"unexpected command {frame.command}")
        try:
            handler(frame)
        except errors.MsgdError as e:
            self.error(e.message, receipt=frame.get("receipt"), err=e, kind="request")

    # -- CONNECT ---------------------------------------------------------------

    def on_connect(self, frame: Frame) -> None:
        self.version = negotiate_version(frame.get("accept-version"), self.hint)
        peer_hb = parse_heartbeat(frame.get("heart-beat")) if self.version != "1.0" else (0, 0)
        self.state = "connecting"
        auth = self.options.authenticate
        if auth is None:
            d = defer.succeed(frame.get("login") or None)
        else:
            d = defer.maybeDeferred(auth, frame.get("login") or "", frame.get("passcode") or "")
        d.addCallbacks(self._connected, self._refused, callbackArgs=(peer_hb,))

    def _refused(self, f: Failure) -> None:
        if f.check(errors.Overloaded):      # login throttling (msgd.security)
            self.error(f.value.message, err=f.value, kind="auth")
            return
        if not f.check(errors.Unauthorized):
            self.log.failure("STOMP login check failed", f)
        self.error("login failed" if f.check(errors.Unauthorized) else "login could not be checked", kind="auth")

    def _connected(self, principal, peer_hb) -> None:
        if self.state == "closed":
            return
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self.principal = principal
        self.state = "connected"
        self.decoder.version = self.version
        send_ms, expect_ms = negotiate_heartbeat(peer_hb, self.options.heartbeat)
        headers = [("version", self.version), ("session", self.id), ("server", f"msgd/{msgd.__version__}")]
        if self.version != "1.0":
            headers.append(("heart-beat", f"{self.options.heartbeat[0] if send_ms else 0},"
                                          f"{self.options.heartbeat[1] if expect_ms else 0}"))
        self.send(Frame("CONNECTED", headers))
        if send_ms:
            self._loop(self._beat, send_ms / 1000.0)
        if expect_ms:
            # the spec allows for network delay: tolerate twice the interval
            self._loop(self._check_alive, expect_ms / 1000.0, expect_ms * 2 / 1000.0)
        self.data_received(b"")      # what arrived meanwhile

    def _loop(self, fn, interval, *args):
        loop = LoopingCall(fn, interval, *args)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    def _beat(self, interval):
        if self.clock.seconds() - self.last_write >= interval * 0.9 and not self.writer.paused:
            self._write(b"\n")

    def _check_alive(self, interval, grace):
        if self.clock.seconds() - self.last_read > grace:
            self.error(f"no heart-beat or frame for {grace:g}s", kind="heartbeat")

    def _no_connect(self):
        if self.state == "new":
            self.error(f"no CONNECT within {self.options.connect_timeout:g}s", kind="protocol")

    # -- subscriptions -----------------------------------------------------------

    def on_subscribe(self, frame: Frame) -> None:
        dest = _required(frame, "destination")
        sid = frame.get("id") or (dest if self.version == "1.0" else _required(frame, "id"))
        ack = frame.get("ack", "auto")
        if ack not in ACK_MODES:
            raise errors.InvalidRequest(f"ack must be one of {', '.join(ACK_MODES)}")
        if not dest.startswith((TOPIC, TEMP)):
            raise errors.NotFound(f"cannot subscribe to {dest!r}: use /topic/CHANNEL or /temp-queue/NAME")
        if sid in self.subscriptions or sid in self.temp.values():
            raise errors.InvalidRequest(f"subscription id {sid!r} is already in use")
        if dest.startswith(TEMP):     # replies of this connection's /app calls: not the broker's
            self.pubsub.reserve()     # but they count with the topics, bounded by the Session
            self.temp[dest] = sid
            self.receipt(frame)
            return
        channel = check_channel(dest[len(TOPIC):], pattern_ok=True)
        since, epoch = frame.get("msgd-since"), frame.get("msgd-epoch")
        if since is not None and is_pattern(channel):
            held = parse_positions(since, strict=True)
            since, epoch = {c: o for c, (_, o) in held.items()}, {c: e for c, (e, _) in held.items()}
        elif since is not None:
            if not since.isdigit():
                raise errors.InvalidParams("msgd-since must be an offset")
            since = int(since)
        self._authorize("subscribe", channel)
        # known before the Session subscribes it: what is replayed is delivered at once
        sub = self.subscriptions[sid] = _Subscription(self, sid, dest, channel, ack)
        try:
            d = self.pubsub.subscribe(channel, since, epoch, subscriber=sub)     # bounded by the Session
        except Exception:
            self.subscriptions.pop(sid, None)
            raise
        if self.state == "closed":      # dropped during the replay (max_unacked), before the broker added it
            self.pubsub.unsubscribe(channel, sub)
            return
        d.addCallback(lambda info: self.receipt(frame, _subscribed(info)))

    def on_unsubscribe(self, frame: Frame) -> None:
        sid = frame.get("id") or (frame.get("destination") if self.version == "1.0" else None)
        sub = self.subscriptions.pop(sid or _required(frame, "id"), None)
        for dest, temp_id in list(self.temp.items()):
            if temp_id == sid:
                del self.temp[dest]
                self.pubsub.release()
                self.receipt(frame)
                return
        if sub is None:
            raise errors.InvalidRequest(f"no subscription with id {sid!r}")
        self.pubsub.unsubscribe(sub.channel, sub)
        for mid in sub.unacked:
            self.unacked.pop(mid, None)
        self.receipt(frame)

    def deliver(self, sub: _Subscription, event) -> None:
        """Called by the broker for each event on a subscribed channel."""
        if self.state != "connected" or sub.id not in self.subscriptions:
            return
        mid = f"{self.id}-{next(self._ids)}"
        headers = [("destination", sub.destination if not is_pattern(sub.channel) else TOPIC + event.channel),
                   ("subscription", sub.id), ("message-id", mid), ("content-type", "application/json"),
                   ("msgd-channel", event.channel), ("msgd-offset", str(event.offset)),
                   ("msgd-epoch", event.epoch)]
        if event.gap:       # events may be missing before this point (docs/websocket.rst)
            headers.append(("msgd-gap", "true"))
        if sub.ack != "auto":
            if self.version == "1.2":
                headers.append(("ack", mid))
            sub.unacked[mid] = None
            self.unacked[mid] = sub
            if len(self.unacked) > self.options.max_unacked:
                self.drop(f"more than {self.options.max_unacked} unacknowledged messages", "unacked")
                return
        self.send(Frame("MESSAGE", headers, b"" if event.gap else event.data_json()))

    def on_ack(self, frame: Frame) -> None:
        self._settle(frame)

    def on_nack(self, frame: Frame) -> None:
        self._settle(frame)

    def _settle(self, frame: Frame) -> None:
        if frame.get("transaction"):
            self._in_transaction(frame)
            return
        mid = frame.get("id") if self.version == "1.2" else _required(frame, "message-id")
        mid = mid if mid is not None else _required(frame, "id")
        sub = self.unacked.get(mid)
        if sub is not None:
            if sub.ack == "client":     # cumulative: this one and every earlier one
                for earlier in list(sub.unacked):
                    del sub.unacked[earlier]
                    del self.unacked[earlier]
                    if earlier == mid:
                        break
            else:
                del sub.unacked[mid]
                del self.unacked[mid]
        self.receipt(frame)

    # -- SEND ----------------------------------------------------------------------

    def on_send(self, frame: Frame) -> None:
        if frame.get("transaction"):
            self._in_transaction(frame)
            return
        dest = _required(frame, "destination")
        if dest.startswith(TOPIC):
            channel = check_channel(dest[len(TOPIC):])
            d = self.pubsub.publish(self._request(), channel, _body(frame, text_ok=True))
            d.addCallback(lambda _: self.receipt(frame))
        elif dest.startswith(APP):
            self._call(frame, dest[len(APP):])
        else:
            raise errors.NotFound(f"unknown destination {dest!r}: use /topic/CHANNEL or /app/module.function")

    def _authorize(self, action: str, channel: str) -> None:
        """The node's ``[access:*]`` rules for a channel (msgd.security)."""
        self.pubsub.check(self._request(), action, channel)

    def _request(self, timeout: float | None = None):
        """A request of this session's principal; ``timeout``, else the node's deadline."""
        return self.services.new_request(self.interface, timeout=timeout, principal=self.principal)

    def _call(self, frame: Frame, target: str) -> None:
        if len(self.in_flight) >= self.options.max_in_flight:
            raise errors.Overloaded(f"more than {self.options.max_in_flight} calls in flight on this connection")
        reply_to = frame.get("reply-to") or ""
        if reply_to.startswith(TOPIC):      # checked before the call runs, not after
            self._authorize("publish", check_channel(reply_to[len(TOPIC):]))
        data = _body(frame, text_ok=False) if frame.body else None
        args: tuple | list
        kwargs: dict
        if frame.body == b"":
            args, kwargs = (), {}
        elif isinstance(data, list):
            args, kwargs = data, {}
        elif isinstance(data, dict):
            args, kwargs = (), data
        else:
            args, kwargs = (data,), {}
        d = self.services.dispatcher.call(self._request(self.options.request_timeout), target, args, kwargs)
        self.in_flight.add(d)
        d.addBoth(self._called, d, frame)

    def _called(self, result, d, frame: Frame) -> None:
        self.in_flight.discard(d)
        if self.state not in ("connected", "disconnecting"):
            return None
        if isinstance(result, Failure):
            err = result.value if isinstance(result.value, errors.MsgdError) else errors.InternalError()
            self.error(err.message, receipt=frame.get("receipt"), err=err, kind="app")
            return None
        reply_to = frame.get("reply-to")
        if reply_to:
            if reply_to.startswith(TOPIC):
                try:
                    self.services.pubsub.publish(check_channel(reply_to[len(TOPIC):]), result)
                except errors.MsgdError as e:
                    self.error(e.message, receipt=frame.get("receipt"), err=e, kind="app")
                    return None
            else:
                headers = [("destination", reply_to), ("message-id", f"{self.id}-{next(self._ids)}"),
                           ("content-type", "application/json")]
                if reply_to in self.temp:
                    headers.append(("subscription", self.temp[reply_to]))
                if frame.get("correlation-id") is not None:
                    headers.append(("correlation-id", frame.get("correlation-id")))
                self.send(Frame("MESSAGE", headers, dumps(result)))
        self.receipt(frame)
        return None

    # -- transactions ------------------------------------------------------------------

    def on_begin(self, frame: Frame) -> None:
        tx = _required(frame, "transaction")
        if tx in self.transactions:
            raise errors.InvalidRequest(f"transaction {tx!r} already begun")
        if len(self.transactions) >= self.options.max_transactions:
            raise errors.TooLarge(f"at most {self.options.max_transactions} open transactions")
        self.transactions[tx] = []
        self.receipt(frame)

    def _in_transaction(self, frame: Frame) -> None:
        tx = self._transaction(frame)
        if len(tx) >= self.options.max_transaction_frames:
            raise errors.TooLarge(f"at most {self.options.max_transaction_frames} frames per transaction")
        tx.append(frame)

    def _transaction(self, frame: Frame) -> list:
        tx = _required(frame, "transaction")
        try:
            return self.transactions[tx]
        except KeyError:
            raise errors.InvalidRequest(f"no transaction {tx!r}") from None

    def on_commit(self, frame: Frame) -> None:
        frames = self._transaction(frame)
        del self.transactions[frame.get("transaction")]
        for f in frames:
            f.headers = [(k, v) for k, v in f.headers if k != "transaction"]
            self.frame_received(f)
            if self.state != "connected":
                return
        self.receipt(frame)

    def on_abort(self, frame: Frame) -> None:
        self._transaction(frame)
        del self.transactions[frame.get("transaction")]
        self.receipt(frame)

    # -- DISCONNECT ----------------------------------------------------------------------

    def on_disconnect(self, frame: Frame) -> None:
        self.state = "disconnecting"
        running = [d for d in self.in_flight]
        done = defer.DeferredList(running, consumeErrors=True) if running else defer.succeed(None)

        def finish(_):
            if self.state == "disconnecting":
                self.receipt(frame)
                self.close("disconnected")
        done.addCallback(finish)

    # -- output ------------------------------------------------------------------------------

    def receipt(self, frame: Frame, headers: Sequence = ()) -> None:
        r = frame.get("receipt")
        if r is not None and self.state in ("connected", "disconnecting"):
            self.send(Frame("RECEIPT", [("receipt-id", r), *headers]))

    def send(self, frame: Frame) -> None:
        self._write(encode(frame, self.version))

    def _write(self, data: bytes) -> None:
        if self.state != "closed":
            self.writer.write(data)

    def _out(self, data: bytes) -> None:
        self.last_write = self.clock.seconds()
        self._write_out(data)

    def _slow(self, limit: int) -> None:
        self.drop(f"slow consumer: more than {limit} bytes unsent", "slow_consumer")

    def error(self, message: str, receipt: str | None = None, err: errors.MsgdError | None = None,
              kind: str = "protocol") -> None:
        """Send one ERROR frame and close (STOMP allows nothing after ERROR)."""
        if self.state == "closed":
            return
        headers = [("message", message.replace("\n", " ")[:500]), ("content-type", "text/plain")]
        if err is not None:
            headers += [("msgd-code", str(err.code)), ("msgd-error", err.name)]
        if receipt is not None:
            headers.append(("receipt-id", receipt))
        self._errors.labels(self.interface, kind).inc()
        self.log.info("STOMP {peer}: ERROR {message}", peer=self.peer, message=message)
        self.writer.last(encode(Frame("ERROR", headers, message.encode()), self.version))   # not into the bound
        self.close(message)

    def drop(self, reason: str, kind: str) -> None:
        """End a connection that broke a bound, from inside a delivery."""
        self.log.warn("dropping STOMP client {peer}: {reason}", peer=self.peer, reason=reason)
        self.error(reason, kind=kind)

    def close(self, reason: str) -> None:
        if self.state == "closed":
            return
        self.connection_lost()
        self._close_out(reason)

    def connection_lost(self) -> None:
        """The transport is gone: end subscriptions and timers.  Calls still
        running finish; their results are dropped."""
        if self.state == "closed":
            return
        self.state = "closed"
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self.pubsub.close()
        self.subscriptions.clear()
        self.unacked.clear()
        self.transactions.clear()
        self.writer.close()


def _subscribed(info: dict) -> list:
    """The RECEIPT headers of a SUBSCRIBE: how its resume went, and where it starts."""
    headers = [("msgd-recovered", "true" if info["recovered"] else "false")]
    if info.get("pattern"):
        return headers + [("msgd-positions", format_positions({c: (e, info["offset"][c])
                                                               for c, e in info["epoch"].items()}))]
    return headers + [("msgd-epoch", info["epoch"]), ("msgd-offset", str(info["offset"]))]


def _required(frame: Frame, name: str) -> str:
    v = frame.get(name)
    if v is None or v == "":
        raise errors.InvalidRequest(f"{frame.command} needs a {name} header")
    return v


def _body(frame: Frame, text_ok: bool):
    """The body as a JSON value: parsed when its content-type is JSON (or
    absent and it parses), else the text (``text_ok``)."""
    ctype = (frame.get("content-type") or "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return loads(frame.body)
    if not ctype:
        try:
            return loads(frame.body)
        except errors.ParseError:
            if not text_ok:
                raise
    if not text_ok and not ctype.startswith("text/"):
        raise errors.ParseError(f"cannot pass a {ctype} body to an app function: send JSON")
    try:
        return frame.body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.ParseError("the body is neither JSON nor UTF-8 text") from None
