"""A STOMP 1.2 client connection to a broker (RabbitMQ, ActiveMQ, …), shared
by the consumer interface and the STOMP adapter.

:class:`StompClient` sends CONNECT as soon as the socket is up; ``handshake``
fires on CONNECTED (fails on ERROR or a lost connection).  ``send`` with a
receipt fires only when the broker confirmed; ``subscribe`` hands each
MESSAGE to a callback; ``ack``/``nack`` settle a message of this connection.
Heart-beats both ways: a broker silent for twice the negotiated interval
is taken as dead and the connection aborted, so a cut that the kernel does
not report still ends in a reconnect.
"""

from __future__ import annotations

import itertools
from typing import Callable

from twisted.internet import defer, error as neterror
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.stomp.codec import Decoder, Frame, Limits, ProtocolError, encode, negotiate_heartbeat, parse_heartbeat


class BrokerError(Exception):
    """The broker answered with an ERROR frame (``message`` header and body)."""

    def __init__(self, frame: Frame):
        self.frame = frame
        text = frame.get("message", "")
        detail = frame.body.decode("utf-8", "replace").strip()
        super().__init__(f"{text}: {detail}" if detail and detail != text else text)


class NotConnected(neterror.ConnectError):
    """Nothing was sent: the connection is not (or no longer) up."""


class StompClient(Protocol):
    log = Logger()
    transport: ITCPTransport   # set by connectionMade, before any use

    def __init__(self, clock, login: str = "", passcode: str = "", vhost: str = "/", heartbeat: float = 10.0,
                 limits: Limits = Limits(max_frame=64 * 1024 * 1024 + 65536, max_body=64 * 1024 * 1024)):
        self.clock = clock
        self.login, self.passcode, self.vhost = login, passcode, vhost
        self.heartbeat_ms = int(heartbeat * 1000)
        self.decoder = Decoder(limits)
        self.handshake: defer.Deferred[StompClient] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()       # fires (with None) when the connection has ended
        self.up = False
        self.receipts: dict[str, defer.Deferred] = {}
        self.handlers: dict[str, Callable[[Frame], None]] = {}
        self._ids = itertools.count(1)
        self._loops: list[LoopingCall] = []
        self.last_read = self.last_write = clock.seconds()

    # -- connection ----------------------------------------------------------

    def connectionMade(self):
        headers = [("accept-version", "1.2"), ("host", self.vhost),
                   ("heart-beat", f"{self.heartbeat_ms},{self.heartbeat_ms}")]
        if self.login:
            headers += [("login", self.login), ("passcode", self.passcode)]
        self._send(Frame("CONNECT", headers))

    def dataReceived(self, data):
        self.last_read = self.clock.seconds()
        try:
            frames = self.decoder.feed(data)
            while frames:
                for frame in frames:
                    self.frame_received(frame)
                frames = self.decoder.feed(b"") if self.decoder.pending() else []
        except ProtocolError as e:
            self.log.error("bad frame from the broker: {error}", error=e)
            self.transport.abortConnection()

    def frame_received(self, frame: Frame):
        if frame.command == "CONNECTED":
            self._on_connected(frame)
        elif frame.command == "MESSAGE":
            handler = self.handlers.get(frame.get("subscription", ""))
            if handler is not None:
                handler(frame)
        elif frame.command == "RECEIPT":
            d = self.receipts.pop(frame.get("receipt-id", ""), None)
            if d is not None:
                d.callback(frame)
        elif frame.command == "ERROR":
            err = BrokerError(frame)
            self.up = False      # nothing more may be sent: the broker closes after ERROR
            self.log.warn("broker ERROR: {error}", error=err)
            # an ERROR names the frame it answers by receipt-id; without one
            # (RabbitMQ, for a bad destination) it ends every pending receipt
            rid = frame.get("receipt-id")
            if rid is not None:
                failed = [self.receipts.pop(rid)] if rid in self.receipts else []
            else:
                failed, self.receipts = list(self.receipts.values()), {}
            for d in failed:
                d.errback(err)
            if not self.handshake.called:
                self.handshake.errback(err)
            self.transport.loseConnection()     # the broker closes after ERROR anyway

    def _on_connected(self, frame: Frame):
        self.decoder.version = frame.get("version", "1.0")
        self.version = self.decoder.version
        send_ms, expect_ms = negotiate_heartbeat(parse_heartbeat(frame.get("heart-beat")),
                                                 (self.heartbeat_ms, self.heartbeat_ms))
        if send_ms:
            self._loop(self._beat, send_ms / 1000.0)
        if expect_ms:
            self._loop(self._check_alive, expect_ms / 1000.0)
        self.up = True
        self.handshake.callback(self)

    def _loop(self, fn, interval):
        loop = LoopingCall(fn, interval)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    def _beat(self, interval):
        if self.clock.seconds() - self.last_write >= interval * 0.9:
            self._write(b"\n")

    def _check_alive(self, interval):
        if self.clock.seconds() - self.last_read > 2 * interval:
            self.log.warn("broker silent for {seconds:g}s: dropping the connection", seconds=2 * interval)
            self.transport.abortConnection()

    def connectionLost(self, reason):
        self.up = False
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if not self.handshake.called:
            self.handshake.errback(reason)
        pending, self.receipts = self.receipts, {}
        for d in pending.values():
            d.errback(neterror.ConnectionLost("connection to the broker lost before its receipt"))
        self.lost.callback(None)

    # -- operations ------------------------------------------------------------------

    def _send(self, frame: Frame):
        self._write(encode(frame, getattr(self, "version", "1.2")))

    def _write(self, data: bytes):
        self.last_write = self.clock.seconds()
        self.transport.write(data)

    def _with_receipt(self, frame: Frame) -> defer.Deferred:
        if not self.up:
            return defer.fail(NotConnected("not connected to the broker"))
        rid = f"r{next(self._ids)}"
        frame.headers.append(("receipt", rid))
        def forget(_: defer.Deferred) -> None:
            self.receipts.pop(rid, None)

        d = self.receipts[rid] = defer.Deferred(forget)
        self._send(frame)
        return d

    def send(self, destination: str, body: bytes, headers=(), receipt: bool = True) -> defer.Deferred:
        """SEND; with ``receipt`` the Deferred fires when the broker confirmed."""
        frame = Frame("SEND", [("destination", destination), *headers], body)
        if receipt:
            return self._with_receipt(frame)
        if not self.up:
            return defer.fail(NotConnected("not connected to the broker"))
        self._send(frame)
        return defer.succeed(None)

    def subscribe(self, destination: str, handler: Callable[[Frame], None], ack: str = "client-individual",
                  headers=()) -> defer.Deferred:
        sid = f"s{next(self._ids)}"
        self.handlers[sid] = handler
        return self._with_receipt(Frame("SUBSCRIBE", [("destination", destination), ("id", sid), ("ack", ack),
                                                      *headers]))

    def ack(self, message: Frame) -> bool:
        return self._settle("ACK", message)

    def nack(self, message: Frame, headers=()) -> bool:
        return self._settle("NACK", message, headers)

    def _settle(self, command: str, message: Frame, headers=()) -> bool:
        """False when the connection that delivered ``message`` is gone (the
        broker then redelivers it)."""
        if not self.up:
            return False
        if self.version == "1.2":
            ids = [("id", message.get("ack", ""))]
        else:
            ids = [("message-id", message.get("message-id", "")), ("subscription", message.get("subscription", ""))]
        self._send(Frame(command, ids + list(headers)))
        return True

    def disconnect(self) -> defer.Deferred:
        """DISCONNECT with a receipt, then close (at once when not up)."""
        if not self.up:
            self.transport.loseConnection()
            return defer.succeed(None)
        d = self._with_receipt(Frame("DISCONNECT"))
        d.addTimeout(5, self.clock)
        d.addBoth(lambda _: self.transport.loseConnection())
        return d


class StompClientFactory(Factory):
    """Builds :class:`StompClient` with the given settings."""

    def __init__(self, clock, **settings):
        self.clock = clock
        self.settings = settings

    def buildProtocol(self, addr):
        p = StompClient(self.clock, **self.settings)
        p.factory = self
        return p
