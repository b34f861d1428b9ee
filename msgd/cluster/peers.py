"""Peer nodes: ``[peer:NAME]`` → calls and async messages over PB.

Each endpoint of a peer gets a :class:`~twisted.application.internet.ClientService`
that keeps one PB connection logged in (reconnecting with back-off).  App
code uses the proxy from ``api.peer("NAME")``::

    result = await api.peer("billing").invoices.total(customer)    # a call
    result = await api.peer("billing").call("invoices.total", customer)
    message_id = await api.peer("billing").send("invoices.add", item)  # async, durable
    await api.peer("billing").send_with_id(f"invoice-{order}", "invoices.add", item)   # the caller's id

Calls go to a connected replica (round-robin); when none is connected they
fail at once with ``unavailable`` instead of waiting.  The caller's remaining
deadline (or ``[peer:NAME] timeout`` outside a request) travels as relative
seconds; the callee enforces it, and the caller stops waiting when it passes
here too (``timeout``), so clock differences between nodes do not matter.
Errors come back as the core taxonomy (see :mod:`msgd.cluster.wire`).
"""

from __future__ import annotations

import functools
import itertools

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.spread import pb

from msgd.core import errors
from msgd.core.request import current
from msgd.cluster.wire import rebuild


class _Factory(pb.PBClientFactory):
    """A PB client factory for one ClientService: the login is done per
    connection by :meth:`Peer._login` once the broker's ``negotiated``
    Deferred fired (after the dialect handshake), so the factory's own
    root-object bookkeeping is not used."""

    def buildProtocol(self, addr):
        broker = super().buildProtocol(addr)
        broker.negotiated = defer.Deferred()
        return broker

    def clientConnectionMade(self, broker):
        broker.negotiated.callback(broker)


class Peer(MultiService):
    """``[peer:NAME]``: one ClientService per endpoint, on ``reactor``;
    async messages go into ``outbox`` (:class:`msgd.cluster.outbox.Outbox`)."""

    log = Logger()
    grace = 1.0     # the caller waits this much past the deadline for the callee's own timeout answer

    def __init__(self, name: str, config, reactor, outbox, retry_policy=None):
        super().__init__()
        self.setName(f"peer:{name}")
        self.peer_name = name
        self.config = config
        self.reactor = reactor
        self.outbox = outbox
        self.ordered = config.ordered
        self.default_ttl = config.message_ttl
        self.live: list = []              # perspectives of connected endpoints
        self._next = itertools.count()
        self.listeners: list = []         # called with the peer name when an endpoint connects
        self.proxy = PeerProxy(self)
        policy = retry_policy or backoffPolicy(initialDelay=0.2, maxDelay=config.max_retry_delay)
        for ep in config.endpoints:
            svc = ClientService(clientFromString(reactor, ep), _Factory(), retryPolicy=policy,
                                clock=reactor, prepareConnection=functools.partial(self._login, endpoint=ep))
            svc.setServiceParent(self)

    @defer.inlineCallbacks
    def _login(self, broker, endpoint: str):
        try:
            yield broker.negotiated
            root = broker.remoteForName(b"root")
            challenge, challenger = yield root.callRemote("login", self.config.username.encode())
            perspective = yield challenger.callRemote(
                "respond", pb.respond(challenge, self.config.password.encode()), None)
        except Exception as e:
            self.log.error("peer {peer}: login at {endpoint} failed: {error}", peer=self.peer_name,
                           endpoint=endpoint, error=e)
            raise
        self.live.append(perspective)
        broker.notifyOnDisconnect(lambda: self._lost(perspective, endpoint))
        self.log.info("peer {peer}: connected to {endpoint}", peer=self.peer_name, endpoint=endpoint)
        for listener in list(self.listeners):
            listener(self.peer_name)

    def _lost(self, perspective, endpoint):
        if perspective in self.live:
            self.live.remove(perspective)
            if self.running:
                self.log.warn("peer {peer}: lost {endpoint}", peer=self.peer_name, endpoint=endpoint)

    def _pick(self):
        if not self.live:
            raise errors.Unavailable(f"peer {self.peer_name} is not connected")
        return self.live[next(self._next) % len(self.live)]

    def _remote(self, method: str, timeout: float, *args) -> defer.Deferred:
        try:
            perspective = self._pick()
            d = perspective.callRemote(method, *args)
        except errors.MsgdError as e:
            return defer.fail(e)
        except pb.DeadReferenceError as e:
            return defer.fail(errors.Unavailable(f"peer {self.peer_name}: {e}"))

        def expired(result, _):
            return defer.fail(errors.Timeout(f"peer {self.peer_name} did not answer {method} in time"))
        d.addTimeout(timeout + self.grace, self.reactor, onTimeoutCancel=expired)

        def failed(f):
            if f.check(errors.MsgdError):
                return f
            return defer.fail(rebuild(f))
        return d.addErrback(failed)

    def call(self, target: str, *args, **kwargs) -> defer.Deferred:
        """Call ``target`` on the peer within the current request's remaining
        time (or ``timeout`` outside a request)."""
        req = current.get()
        remaining = req.remaining() if req is not None else None
        timeout = remaining if remaining is not None else self.config.timeout
        if timeout <= 0:
            return defer.fail(errors.Timeout(f"deadline passed before calling {target} on {self.peer_name}"))
        return self._remote("call", timeout, target, list(args), kwargs, timeout)

    def send(self, target: str, *args, **kwargs) -> defer.Deferred:
        """Queue an async message in the outbox; fires with its id once it is
        on disk."""
        return self.outbox.send(self.peer_name, target, args, kwargs)

    def send_with_id(self, message_id: str, target: str, *args, **kwargs) -> defer.Deferred:
        """:meth:`send` under the caller's ``message_id``: sending it again
        (say, after this process was killed before ``send`` returned) is
        harmless, the peer handles it once."""
        return self.outbox.send(self.peer_name, target, args, kwargs, message_id=message_id)

    def deliver(self, msg) -> defer.Deferred:
        """Hand one outbox message to the peer (used by the outbox)."""
        return self._remote("send", self.config.timeout, msg.target, msg.args, msg.kwargs, msg.id, msg.expires)

    def describe(self) -> dict:
        return {"endpoints": list(self.config.endpoints), "connected": len(self.live)}


class PeerProxy:
    """What ``api.peer(NAME)`` returns: ``.call(target, ...)``,
    ``.send(target, ...)``, ``.send_with_id(message_id, target, ...)`` and
    ``.module.function(...)`` for calls."""

    __slots__ = ("_peer",)

    def __init__(self, peer: Peer):
        self._peer = peer

    def call(self, target: str, *args, **kwargs) -> defer.Deferred:
        return self._peer.call(target, *args, **kwargs)

    def send(self, target: str, *args, **kwargs) -> defer.Deferred:
        return self._peer.send(target, *args, **kwargs)

    def send_with_id(self, message_id: str, target: str, *args, **kwargs) -> defer.Deferred:
        return self._peer.send_with_id(message_id, target, *args, **kwargs)

    def __getattr__(self, module: str):
        if module.startswith("_"):
            raise AttributeError(module)
        return _Module(self._peer, module)


class _Module:
    __slots__ = ("_peer", "_name")

    def __init__(self, peer: Peer, name: str):
        self._peer, self._name = peer, name

    def __getattr__(self, function: str):
        if function.startswith("_"):
            raise AttributeError(function)
        target = f"{self._name}.{function}"
        return lambda *args, **kwargs: self._peer.call(target, *args, **kwargs)
