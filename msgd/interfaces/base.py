"""What every interface shares: a named child service of the node, and for
listeners the endpoint, the set of open connections and an orderly stop.

Stopping a listener happens in two steps so that the node can drain:
:meth:`Listener.stop_accepting` closes the port; :meth:`Interface.stopService`
then closes the remaining connections (flushing what was written), aborting
those that do not close within a grace period.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

from msgd.interfaces.writer import Turn
from msgd.security.addresses import ProxyProtocolFactory
from msgd.services import Services


class StartupError(Exception):
    """A part of the node could not start.  The message is one line for the
    operator that names the section; ``fields`` go with it into the log (tap
    logs that one line and exits 1, without a traceback)."""

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


class Interface(Service):
    """Base of every ``[interface:NAME]``.  Subclasses declare ``Options``.

    An interface is built as ``cls(name, options, services)``: ``services``
    (:class:`msgd.services.Services`) is all that an interface and the parts
    it builds use — reactor, metrics, dispatcher, pub/sub, access, apps,
    ``run_blocking``, ``new_request``, ``settings`` (the ``[node]`` section in
    force), ``adapter``, ``received``, ``health`` — so it runs on a
    :class:`msgd.testing.AppHarness` as well as on the node."""

    log = Logger()
    name: str  # type: ignore[assignment]   # the section's NAME, always set (twisted's Service says None)

    def __init__(self, name: str, options, services: Services):
        self.name = name
        self.options = options
        self.services: Services = services
        self.ready: defer.Deferred[None] = defer.Deferred()   # fires when the interface accepts work

    def describe(self) -> dict:
        """For /health and the status page."""
        return {"type": getattr(self, "type_name", type(self).__name__), "running": bool(self.running)}

    def stop_accepting(self):
        """Stop taking new work; in-flight work goes on."""
        return defer.succeed(None)

    def timeout(self) -> float:
        """The default deadline of requests through this interface."""
        own = getattr(self.options, "request_timeout", None)
        return own if own is not None else self.services.settings.request_timeout

    def new_request(self, principal=None, timeout: float | None = None):
        """A request of this interface: its name, ``principal``, and
        ``timeout`` or else the interface's deadline (:meth:`timeout`)."""
        return self.services.new_request(self.name, timeout=self.timeout() if timeout is None else timeout,
                                         principal=principal)


class Listener(Interface):
    """An interface that listens on ``options.endpoint``."""

    close_grace = 2.0
    guard: Any = None    # the listener's msgd.security.Guard, set by subclasses that take connections

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.port = None
        self.connections: set = set()   # transports of open connections
        self.goodbyes: dict = {}        # transport -> how to close it politely (e.g. WebSocket 1001)
        self.turn = Turn(services.reactor)  # its connections' writes go out at the end of the reactor turn
        self._aborts: dict = {}         # transport -> the abort of a connection the node is closing
        self._closing: list = []
        services.metrics.gauge("msgd_interface_connections", "Open connections per listening interface",
                               ["interface"]).labels(name).set_function(lambda: len(self.connections))

    def factory(self):
        raise NotImplementedError

    def privilegedStartService(self):
        # Listen before privileges are dropped and before the reactor runs, so
        # that "address in use" stops start-up instead of leaving a half node.
        super().privilegedStartService()
        self._listen(strict=True)

    def startService(self):
        super().startService()
        if self.port is None and not self.ready.called:
            self._listen(strict=False)

    def _listen(self, strict: bool):
        endpoint = serverFromString(self.services.reactor, self.options.endpoint)
        factory = self.factory()
        if getattr(self.options, "proxy_protocol", False):      # see msgd.security.addresses
            factory = ProxyProtocolFactory(factory, self.guard.addresses, self.services.reactor, self.name)
        d = endpoint.listen(factory)
        early: list = []

        def keep(r):
            early.append(r)
            return r
        d.addBoth(keep)
        if strict and early and isinstance(early[0], Failure):
            d.addErrback(lambda f: None)
            error = early[0].value
            reason = getattr(getattr(error, "socketError", None), "strerror", None) or early[0].getErrorMessage()
            raise StartupError(f"[interface:{self.name}] cannot listen on {self.options.endpoint}: {reason}",
                               interface=self.name, endpoint=self.options.endpoint)
        d.addBoth(self._listening)

    def _listening(self, result):
        if isinstance(result, Failure):
            self.log.critical("interface {interface} cannot listen on {endpoint}: {error}",
                              interface=self.name, endpoint=self.options.endpoint, error=result.value)
            if not self.ready.called:
                self.ready.errback(result)
            return None
        self.port = result
        self.log.info("interface {interface} ({type}) listening on {address}", interface=self.name,
                      type=getattr(self, "type_name", ""), address=self.address())
        if not self.ready.called:
            self.ready.callback(self)
        return None

    def address(self) -> str:
        if self.port is None:
            return ""
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        name = getattr(host, "name", host)      # a unix socket's path (bytes)
        return os.fsdecode(name) if isinstance(name, bytes) else str(name)

    def describe(self) -> dict:
        return dict(super().describe(), listening=self.address(), connections=len(self.connections))

    def stop_accepting(self):
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    gauge = None        # a protocol's own gauge of open connections (msgd_stream_connections, …)

    def admit(self, transport, refuse, forwarded: bool = False) -> bool:
        """Admission of a new connection, for every protocol: within the
        guard's connection limits (see :meth:`msgd.security.Guard.admit`
        for ``forwarded``) it is counted open — call :meth:`closed` when it
        closes — and True; else ``refuse(limit)`` answers in the protocol's
        own form (and closes), and False."""
        hit = self.guard.admit(transport, forwarded)
        if hit is not None:
            refuse(hit)
            return False
        self.connection_opened(transport)
        if self.gauge is not None:
            self.gauge.inc()
        return True

    def closed(self, transport) -> None:
        """An admitted connection ended (nothing for one that was refused)."""
        self.guard.release(transport)
        if transport in self.connections:
            if self.gauge is not None:
                self.gauge.dec()
            self.connection_closed(transport)

    def connection_opened(self, transport) -> None:
        self.connections.add(transport)

    def connection_closed(self, transport) -> None:
        self.connections.discard(transport)
        self.goodbyes.pop(transport, None)
        abort = self._aborts.pop(transport, None)
        if abort is not None and abort.active():
            abort.cancel()
        if not self.connections and self._closing:
            waiting, self._closing = self._closing, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def close_within(self, transport, timeout: float) -> None:
        """Close a connection once what it holds is sent, and abort it if
        that has not happened within ``timeout`` seconds (a client that does
        not read never lets the last bytes go)."""
        transport.unregisterProducer()      # else a paused producer is resumed instead of the close
        transport.loseConnection()
        if transport in self.connections and transport not in self._aborts:
            self._aborts[transport] = self.services.reactor.callLater(timeout, transport.abortConnection)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        yield self.stop_accepting()
        yield self.close_connections()

    def close_connections(self):
        """Close every connection, flushing pending writes (through its
        ``goodbyes`` entry when it has one); abort those still open after
        ``close_grace`` seconds."""
        if not self.connections:
            return defer.succeed(None)
        for t in list(self.connections):
            self.goodbyes.get(t, t.loseConnection)()
        d = defer.Deferred()
        self._closing.append(d)
        reactor = self.services.reactor

        def abort():
            for t in list(self.connections):
                if hasattr(t, "abortConnection"):
                    t.abortConnection()
            self.connections.clear()
            if not d.called:
                d.callback(None)
        call = reactor.callLater(self.close_grace, abort)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d


def discard_unsent(transport) -> None:
    """Drop what ``transport`` holds that it has not begun to send: the part
    of a slow consumer's stream that can still go, so that a last message (a
    close frame, an ERROR frame, an ``rpc.closing`` line) is next in line
    instead of last.

    Only whole ``write`` calls are dropped — the bytes of Twisted's
    ``FileDescriptor`` queue that were never merged into the buffer the
    socket is being fed from — so a protocol whose every write is whole
    frames or lines stays well-formed on the wire.  A wrapper that passes
    bytes through unchanged (the PROXY protocol's) is looked through; other
    transports (TLS, where the bytes are already encrypted; test fakes)
    keep everything.
    """
    while isinstance(transport, ProtocolWrapper) and type(transport).write is ProtocolWrapper.write:
        transport = transport.transport
    if isinstance(getattr(transport, "__dict__", {}).get("_tempDataBuffer"), list):
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
