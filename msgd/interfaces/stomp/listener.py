"""``[interface:NAME] type = stomp``: a STOMP 1.2 (1.0, 1.1) server on a TCP
(or TLS, UNIX) endpoint.  Each connection is a thin protocol feeding a
:class:`~msgd.interfaces.stomp.session.StompSession`, the same class the
WebSocket ``v1x.stomp`` subprotocols use; the wire protocol is documented
there and in docs/stomp.rst.

The protocol is its transport's push producer: when the socket buffer is
full the session queues (up to ``max_pending`` bytes, then the client is
dropped) and the node stops reading that client's frames.  What a session
writes during a reactor turn goes to the socket in one write at the end of
the turn (the interface's :class:`~msgd.interfaces.writer.Turn`), straight
to the socket when Twisted holds nothing unsent for it
(:func:`~msgd.net.write_now`).  A connection the
node closes gets ``close_timeout`` to read its last frame, then is aborted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Factory, Protocol

from msgd.config import Invalid, duration, integer, option, optional_duration, optional_path, server_endpoint, size
from msgd.interfaces.base import Listener, discard_unsent
from msgd.stomp.codec import Limits
from msgd.interfaces.stomp.session import SessionOptions, StompSession
from msgd.interfaces.writer import Producer
from msgd.net import write_now
from msgd.security import Guard, SecurityOptions
from msgd.security.credentials import PasswordFileChecker


@dataclass(frozen=True)
class Options(SecurityOptions):     # auth, anonymous, limits: see docs/security.rst
    endpoint: str = option(parse=server_endpoint, doc="where to listen, e.g. tcp:61613:interface=127.0.0.1")
    users: str | None = option(None, parse=optional_path,
                               doc="password file (lines login:bcrypt-hash[:roles], as auth_file); when set, "
                                   "CONNECT needs a valid login and passcode")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of /app calls (default: [node] request_timeout)")
    heartbeat: float = option(10.0, parse=duration,
                              doc="heart-beat interval offered both ways (0: none); a client silent for twice "
                                  "the negotiated interval is disconnected")
    connect_timeout: float = option(10.0, parse=duration, doc="close connections that send no CONNECT within this")
    max_frame: int = option(1024 * 1024 + 65536, parse=size, doc="largest frame (headers and body)")
    max_body: int = option(1024 * 1024, parse=size, doc="largest frame body")
    max_headers: int = option(64, parse=integer(1, 10000), doc="most headers in a frame")
    max_header_length: int = option(8192, parse=size, doc="longest header line")
    max_subscriptions: int = option(100, parse=integer(1), doc="most subscriptions per connection")
    max_unacked: int = option(1000, parse=integer(1),
                              doc="most unacknowledged messages (ack client/client-individual) per connection; "
                                  "past it the client is dropped")
    max_in_flight: int = option(100, parse=integer(1), doc="most /app calls running at once per connection")
    max_pending: int = option(1024 * 1024, parse=size,
                              doc="bytes queued for a client that does not read; past it the client is dropped")
    close_timeout: float = option(10.0, parse=duration,
                                  doc="how long a client the node closes has to read the last frame (ERROR) "
                                      "before the connection is aborted")

    def check(self):
        super().check()
        if self.max_body > self.max_frame:
            raise Invalid("max_body must not exceed max_frame", "max_body")


class StompProtocol(Producer, Protocol):
    transport: Any   # a TCP, TLS or unix transport (a consumer too), set before any use
    session: StompSession | None = None

    def _writer(self):
        return self.session.writer if self.session is not None else None

    def connectionMade(self):
        iface = self.factory.interface
        if not iface.admit(self.transport, self._refuse):
            return
        peer = self.transport.getPeer()
        address = iface.guard.addresses.of_connection(self.transport)     # its failed logins are throttled
        options = dataclasses.replace(iface.session_options,
                                      authenticate=lambda login, passcode: iface.authenticate(login, passcode, address))
        transport = self.transport
        self.session = StompSession(iface.services, iface.name, lambda data: write_now(transport, data), self._close,
                                    peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
                                    options=options, turn=iface.turn, discard=lambda: discard_unsent(transport))
        self.transport.registerProducer(self, True)

    def dataReceived(self, data):
        self.session.data_received(data)

    def _close(self, reason: str):
        self.factory.interface.close_within(self.transport, self.factory.interface.options.close_timeout)

    def _refuse(self, limit: str):        # past a connection limit: an ERROR frame, then close
        self.transport.write(b"ERROR\ncontent-type:text/plain\nmessage:too many connections (%s)\n"
                             b"msgd-code:-32005\n\n\x00" % limit.encode())
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.session is not None:
            self.session.connection_lost()
        self.factory.interface.closed(self.transport)


class StompInterface(Listener):
    Options = Options

    def __init__(self, name, options, services):
        super().__init__(name, options, services)
        o = options
        hb = int(o.heartbeat * 1000)
        self.session_options = SessionOptions(
            limits=Limits(max_frame=o.max_frame, max_headers=o.max_headers,
                          max_header_length=o.max_header_length, max_body=o.max_body),
            heartbeat=(hb, hb), connect_timeout=o.connect_timeout, request_timeout=self.timeout(),
            max_subscriptions=o.max_subscriptions, max_unacked=o.max_unacked, max_in_flight=o.max_in_flight,
            max_pending=o.max_pending, authenticate=self.authenticate)
        self.guard = Guard(self)
        if o.users:     # the older key: a password file checked by the guard like auth = password's
            self.guard.checker = PasswordFileChecker(o.users, self.services.run_blocking)
            self.guard.checker.users()     # read now: a missing or bad file stops start-up
        self.gauge = self.services.metrics.gauge("msgd_stomp_connections", "Open STOMP connections",
                                                    ["interface"]).labels(name)

    def factory(self):
        f = Factory.forProtocol(StompProtocol)
        f.interface = self
        return f

    def authenticate(self, login: str, passcode: str, address: str = ""):
        """The principal of a CONNECT from ``address``, through the
        interface's guard (``auth = password|ldap`` or the older ``users``
        file, tokens, ``anonymous``, login throttling per address and user;
        see msgd.security).  A login is never believed unchecked; with
        ``users`` set, CONNECT needs one."""
        if self.guard.checker is None and not (passcode and not login):
            return self.guard.anonymous(address)  # auth = none: anonymous, whatever login is claimed
        if login or passcode or not self.options.anonymous or self.options.users:
            return self.guard.login(login, passcode, address)
        return None
