"""Perspective Broker: ``[interface:NAME] type=pb``.

Peer nodes and plain Python programs log in through a :mod:`twisted.cred`
portal (``pb.PBClientFactory().login(UsernamePassword(user, password))``)
and get a perspective that offers:

``call(target, args=(), kwargs={}, deadline=None)``
    Run the app function ``target`` (``module.function``) and answer its
    result.  ``deadline`` is the caller's remaining time in *seconds*
    (relative, so the two clocks need not agree); this node enforces it and
    fails the call with ``timeout`` when it passes.  Without it the
    interface's ``request_timeout`` applies.
``publish(channel, data)``
    Publish on this node's pub/sub (shared by the cluster with
    ``[pubsub] backend=redis``); answers the event's offset.
``send(target, args, kwargs, message_id, expires=None)``
    An asynchronous message (what a peer's outbox delivers).  It is handled
    once per ``message_id``: a copy that arrives again within the receiver's
    retention window is answered ``{"duplicate": true}`` without running the
    handler.  ``expires`` is a Unix time; a message past it (allowing
    ``clock_skew``) is refused with ``timeout`` and not handled.  The answer
    comes after the handler succeeded, so a failed handler makes the sender
    retry.  The handler is not cancelled when the connection drops: it runs
    on and its id is remembered when it succeeds (``Received.handle``).

Errors are the core taxonomy: the remote failure's type is
``msgd.interfaces.pb.PBError`` and its value a JSON object
``{"code", "name", "message", "data"}``; :func:`rebuild` turns a failure
back into the :class:`~msgd.core.errors.MsgdError` subclass.

Logins: PB's own challenge-response login (``factory.login(UsernamePassword
(...))``) is checked against ``users``/``users_file``: it needs the password
on the server, so it cannot use bcrypt hashes or LDAP.  For those (``auth =
password | ldap``, and for tokens) a client logs in anonymously and then
through the interface's guard, like every other interface::

    door = await factory.login(Anonymous())
    perspective = await door.callRemote("login", "alice", "secret")   # or ("token", TOKEN)

The password crosses the wire as is: use an ``ssl:``/``mtls:`` endpoint.
Connection limits and per-principal rates of ``docs/security.rst`` apply.
When a connection drops, the calls it had running are cancelled (not the
handlers of its messages, see ``send``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from twisted.cred import checkers, portal
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.spread import pb
from zope.interface import implementer

from msgd.cluster.outbox import bad_message_id
from msgd.cluster.wire import PBError, rebuild  # noqa: F401  (rebuild: part of this module's documented API)
from msgd.config import Invalid, duration, option, optional_duration, optional_path, server_endpoint
from msgd.core import errors
from msgd.core.pubsub import Session, check_channel
from msgd.interfaces.base import Listener, StartupError
from msgd.options import pairs
from msgd.security import Guard, SecurityOptions
from msgd.services import Services


@dataclass(frozen=True, kw_only=True)
class Options(SecurityOptions):     # auth, token, limits: see docs/security.rst
    endpoint: str = option(parse=server_endpoint, doc="where to listen, e.g. tcp:8789:interface=127.0.0.1")
    users: tuple = option((), parse=pairs("NAME:PASSWORD", value_needed=True),
                          doc="logins as NAME:PASSWORD words (e.g. node-a:secret app:pw)")
    users_file: str | None = option(None, parse=optional_path,
                                    doc="a file of NAME:PASSWORD lines, read at start (# comments allowed)")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of calls that carry none (default: [node] request_timeout)")
    clock_skew: float = option(5.0, parse=duration,
                               doc="allowance for the sender's clock when checking a message's expiry")

    def check(self):
        super().check()
        if not self.users and not self.users_file and self.auth == "none" and not self.token_secret:
            raise Invalid("set users, users_file, auth or token_secret: nobody could log in", "users")


class Perspective(pb.Avatar):
    """One logged-in client."""

    def __init__(self, interface: "PBInterface", user: str):
        self.interface = interface
        self.services = interface.services
        self.user = user
        self.pending: set[defer.Deferred] = set()
        self.pubsub = Session(self.services.pubsub, self, authorize=self.services.access.authorize_channel)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self.pending.add(d)

        def done(result):
            self.pending.discard(d)
            if hasattr(result, "check") and result.check(errors.MsgdError):
                raise PBError(result.value)
            return result
        return d.addBoth(done)

    def _guard(self, fn, *args) -> defer.Deferred:
        """Run ``fn``; its taxonomy errors, raised or failed, become PBError."""
        return self._track(defer.maybeDeferred(fn, *args))

    def perspective_call(self, target, args=(), kwargs=None, deadline=None):
        # a synchronous app function is answered at once, without Deferreds (dispatcher.run)
        try:
            result = self._call(target, args, kwargs, deadline)
        except errors.MsgdError as e:
            raise PBError(e) from None
        return self._track(result) if isinstance(result, defer.Deferred) else result

    def _call(self, target, args, kwargs, deadline):
        if not isinstance(target, str):
            raise errors.InvalidRequest("target must be a string")
        if deadline is not None and (not isinstance(deadline, (int, float)) or deadline < 0):
            raise errors.InvalidRequest("deadline must be a number of seconds >= 0")
        req = self.interface.new_request(self.user, None if deadline is None else float(deadline))
        return self.services.dispatcher.run(req, target, list(args or ()), dict(kwargs or {}))

    def perspective_publish(self, channel, data=None):
        return self._guard(self._publish, channel, data)

    def _publish(self, channel, data):
        req = self.interface.new_request(self.user)
        return self.pubsub.publish(req, check_channel(channel), data)

    def perspective_send(self, target, args=(), kwargs=None, message_id=None, expires=None):
        return self._guard(self._send, target, args, kwargs, message_id, expires)

    def _send(self, target, args, kwargs, message_id, expires):
        if problem := bad_message_id(message_id):
            raise errors.InvalidRequest(problem)
        if expires is not None and time.time() > float(expires) + self.interface.options.clock_skew:
            raise errors.Timeout(f"message {message_id} expired before it arrived")

        def handle():
            return defer.maybeDeferred(self._call, target, args, kwargs, None)
        return self.interface.received.handle(message_id, handle).addCallback(
            lambda duplicate: {"message_id": message_id, "duplicate": duplicate})

    def logout(self):
        for d in list(self.pending):
            d.cancel()


class Door(pb.Avatar):
    """What an anonymous PB login gets: the way in through the guard
    (bcrypt file, LDAP, tokens, login throttling), nothing else."""

    def __init__(self, interface: "PBInterface"):
        self.interface = interface
        self.perspectives: list[Perspective] = []

    def perspective_login(self, user, password):
        if not isinstance(user, str) or not isinstance(password, str):
            raise PBError(errors.InvalidRequest("user and password must be strings"))
        return self._enter(self.interface.guard.login(user, password))

    def perspective_token(self, token):
        if not isinstance(token, str):
            raise PBError(errors.InvalidRequest("token must be a string"))
        return self._enter(self.interface.guard.login("", token))

    def _enter(self, d: defer.Deferred) -> defer.Deferred:
        def admitted(principal):
            perspective = Perspective(self.interface, principal)
            self.perspectives.append(perspective)
            return pb.AsReferenceable(perspective, "perspective")

        def refused(f):
            f.trap(errors.MsgdError)
            raise PBError(f.value)
        return d.addCallbacks(admitted, refused)

    def _closed(self, *args, **kwargs):
        raise PBError(errors.Unauthorized("log in first: login(user, password) or token(TOKEN)"))

    perspective_call = perspective_publish = perspective_send = _closed

    def logout(self):
        for perspective in self.perspectives:
            perspective.logout()


@implementer(portal.IRealm)
class Realm:
    def __init__(self, interface: "PBInterface"):
        self.interface = interface

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives")
        if avatarId is checkers.ANONYMOUS:
            door = Door(self.interface)
            return pb.IPerspective, door, door.logout
        user = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        avatar = Perspective(self.interface, user)
        return pb.IPerspective, avatar, avatar.logout


class _Portal(portal.Portal):
    """A refused login is answered as ``unauthorized`` (and is not logged
    as a server error).  With ``cert_principal = yes`` (on an ``mtls:``
    endpoint) the login name must be the CN of the client's certificate —
    a peer node proves its name twice — and, since PB's anonymous login does
    not show the connection, only challenge-response logins are taken."""

    def __init__(self, interface: "PBInterface", realm, checkers_):
        super().__init__(realm, checkers_)
        self.interface = interface

    def login(self, credentials, mind, *interfaces):
        guard = self.interface.guard
        name = getattr(credentials, "username", b"")
        key = "user:" + (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name))

        def refused(failure):
            if failure.check(errors.Overloaded):      # login throttling, as on every interface
                raise PBError(failure.value)
            failure.trap(UnauthorizedLogin, UnhandledCredentials)    # wrong password; anonymous
            raise PBError(errors.Unauthorized("login refused"))
        d = guard.throttled((key,), lambda: portal.Portal.login(self, credentials, mind, *interfaces), key)
        if self.interface.options.cert_principal:
            d.addCallback(self._named_by_certificate, credentials)
        return d.addErrback(refused)

    def _named_by_certificate(self, result, credentials):
        _, avatar, logout = result
        transport = getattr(getattr(credentials, "broker", None), "transport", None)   # PB's challenger
        named = self.interface.guard.certificate_principal(transport)
        cn = named.name if named is not None else None
        user = getattr(avatar, "user", None)
        if cn is None or cn != user:
            logout()
            self.interface.guard.denied("certificate", user, "", f"certificate names {cn!r}")
            raise PBError(errors.Unauthorized("the client certificate does not name this login"))
        return result


class _Broker(pb.Broker):
    def connectionMade(self):
        super().connectionMade()
        self.factory.interface.admit(self.transport, lambda limit: self.transport.abortConnection())

    def connectionLost(self, reason):
        self.factory.interface.closed(self.transport)
        super().connectionLost(reason)


class _Factory(pb.PBServerFactory):
    protocol = _Broker

    def __init__(self, interface, root):
        super().__init__(root)
        self.interface = interface


class PBInterface(Listener):
    Options = Options

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.received = services.received     # the store of handled peer message ids (msgd.cluster.outbox)
        self.guard = Guard(self)
        self.portal = _Portal(self, Realm(self), self.checkers())

    def checkers(self) -> list:
        """The credential checkers of the portal.  Override (or replace
        ``self.portal.checkers``) to plug in other ones."""
        db = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        for name, password in self.options.users:
            db.addUser(name.encode(), password.encode())
        if self.options.users_file:
            try:
                with open(self.options.users_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise StartupError(f"[interface:{self.name}] users_file: cannot read: {e.strerror}") from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    name, _, password = line.partition(":")
                    db.addUser(name.strip().encode(), password.strip().encode())
        if (self.guard.checker is not None or self.options.token_secret) and not self.options.cert_principal:
            return [db, checkers.AllowAnonymousAccess()]     # the Door: logins through the guard
        return [db]

    def factory(self):
        return _Factory(self, self.portal)
