"""Authentication and limits of one interface, split by concern:

- :mod:`msgd.security.options`: :class:`SecurityOptions`, the keys an
  interface section gains by inheriting it (``auth``, ``anonymous``,
  tokens, limits).
- :class:`Guard` (here): built per interface from those keys.  Interfaces call
  ``authenticate(authorization, token, address)`` (HTTP, WebSocket),
  ``login(user, password, address)`` (STOMP, PB), ``admit(transport)`` /
  ``release(transport)`` for connections (``readmit`` for each request a
  trusted proxy's connection carries), and :meth:`protect` wraps HTTP
  resources.  Addresses are the clients' as ``guard.addresses``
  (:mod:`msgd.security.addresses`) decides them behind trusted proxies.
  Every refusal is counted and logged here; so are the login throttle
  (:meth:`Guard.throttled`, PB's portal too) and the client certificate's
  principal (:meth:`Guard.certificate_principal`).
- :mod:`msgd.security.http`: ``Protected``, an HTTP mount behind the guard.
- :mod:`msgd.security.access`: ``Access``, the node's ``dispatcher.authorize``
  and the channel check behind :class:`msgd.core.pubsub.Session`: rate per
  principal, then the ``[access:*]`` rules.

Refusals are always :class:`errors.Unauthorized` (-32001) with the same
message whether or not the target exists, or :class:`errors.Overloaded`
(-32005) for limits; each interface renders them in its own form.
"""

from __future__ import annotations

import base64
import os

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger

from msgd.core import errors
from msgd.security.access import denials
from msgd.security.addresses import ClientAddresses
from msgd.security.credentials import LDAPChecker, PasswordFileChecker
from msgd.security.limits import ConnectionLimits, LoginThrottle, RateLimit
from msgd.security.http import TOKEN_COOKIE, TOKEN_SUBPROTOCOL, Protected, _cookie, origin_allowed
from msgd.security.principal import Principal
from msgd.security.tls import peer_common_name
from msgd.security.tokens import Tokens

log = Logger(namespace="msgd.security")

class Guard:
    """Authentication and limits of one interface."""

    def __init__(self, interface):
        o = interface.options
        services = interface.services      # msgd.services.Services
        self.interface = interface.name
        self.options = o
        self.origins = getattr(o, "ws_origins", ("*",))    # where browsers may bring the token cookie from
        self.checker = None
        if o.auth == "password":
            self.checker = PasswordFileChecker(o.auth_file, services.run_blocking)
        elif o.auth == "ldap":
            self.checker = LDAPChecker(services.adapter, o.auth_adapter)   # through [adapter:NAME] type = ldap
        secret = o.token_secret.encode() if o.token_secret else os.urandom(32)
        self.tokens = Tokens(secret, services.reactor, o.token_ttl)
        self.addresses = ClientAddresses(o.trusted_proxies, getattr(o, "forwarded_header", "x-forwarded-for"))
        self.connections = ConnectionLimits(o.max_connections, o.max_connections_per_address)
        self._open: dict = {}          # admitted transport -> client address (None: a proxy's, not yet known)
        self.rate = RateLimit(services.reactor, o.rate, o.rate_burst or int(o.rate))
        self.throttle = LoginThrottle(services.reactor, o.login_attempts, o.login_window)
        m = services.metrics
        self._denied = denials(m)
        self._limited = m.counter("msgd_limited_total", "Work refused by a limit", ["interface", "limit"])

    # -- accounting ------------------------------------------------------------------

    def denied(self, reason: str, principal=None, address: str = "", detail: str = "") -> None:
        self._denied.labels(self.interface, reason).inc()
        log.info("denied on {interface}: {reason} ({detail}) principal={principal} address={address}",
                 interface=self.interface, reason=reason, detail=detail, principal=str(principal or "-"),
                 address=address)

    def limited(self, limit: str, key: str = "") -> None:
        self._limited.labels(self.interface, limit).inc()
        log.info("limit {limit} hit on {interface} by {key}", limit=limit, interface=self.interface, key=key)

    # -- connections ---------------------------------------------------------------------

    def admit(self, transport, forwarded: bool = False) -> str | None:
        """None when a new connection may stay open (then ``release``
        it when it closes), else the name of the limit it hits.  With
        ``forwarded`` (HTTP), a connection from a trusted proxy counts only
        towards ``max_connections`` until ``readmit`` names the client
        of each request it carries."""
        peer = self.addresses.of_connection(transport)
        address = None if forwarded and self.addresses.trusts(peer) else peer
        return self._count(transport, address, peer)

    def readmit(self, transport, address: str) -> str | None:
        """A request arrived through a trusted proxy's connection (see
        :meth:`admit`): from now on the connection counts as ``address``'s,
        the client of that request (a proxy may carry several clients' requests
        on one connection, one after the other).  None, or the limit hit
        (then the connection is no longer counted: close it)."""
        if transport not in self._open or self._open[transport] == address:
            return None
        self.connections.release(self._open.pop(transport))
        return self._count(transport, address, address)

    def _count(self, transport, address: str | None, shown: str) -> str | None:
        """Count ``transport`` as ``address``'s connection, or name the limit it hits."""
        hit = self.connections.admit(address)
        if hit is not None:
            self.limited(hit, shown)
        else:
            self._open[transport] = address
        return hit

    def release(self, transport) -> None:
        """Idempotent: a WebSocket releases the HTTP connection it took over."""
        if transport in self._open:
            self.connections.release(self._open.pop(transport))

    def client_address(self, request) -> str:
        """The client of a twisted.web request (through trusted proxies)."""
        return self.addresses.of_http(request)

    # -- authentication ----------------------------------------------------------------------

    def login(self, user: str, password: str, address: str = "") -> defer.Deferred:
        """Principal for a user name and password, or fail with
        Unauthorized (wrong), Overloaded (throttled), Unavailable (LDAP down).
        An empty user name with a password is a token given in its place
        (STOMP: ``login:`` empty, ``passcode:TOKEN``)."""
        if not user and password:
            try:
                return defer.succeed(self.verify_token(password, address))
            except errors.Unauthorized as e:
                return defer.fail(e)
        keys = (f"address:{address}", f"user:{user}") if address else (f"user:{user}",)

        def attempt():
            if self.checker is None:
                self.denied("credentials", user, address, "this interface checks no passwords")
                raise errors.Unauthorized("authentication failed")
            return self.checker.requestAvatarId(UsernamePassword(user, password))

        def refused(f):
            if f.check(UnauthorizedLogin):
                self.denied("credentials", user, address, f.getErrorMessage())
                raise errors.Unauthorized("authentication failed")
            if f.check(errors.MsgdError):       # throttled, or no checker
                return f
            log.failure("cannot check credentials on {interface}", f, interface=self.interface)
            raise errors.Unavailable("credentials cannot be checked now")
        return self.throttled(keys, attempt, f"{user}@{address}").addErrback(refused)

    def throttled(self, keys: tuple, attempt, who: str = "") -> defer.Deferred:
        """``attempt()`` (a login, its result or a Deferred) unless one of
        ``keys`` (``address:A``, ``user:U``) failed too often within
        ``login_window`` (then Overloaded); an ``UnauthorizedLogin`` from it
        counts against each key.  Every login of every protocol goes
        through here."""
        try:
            self.throttle.check(*keys)
        except errors.Overloaded as e:
            self.limited("login_throttle", who or " ".join(keys))
            return defer.fail(e)

        def failed(f):
            if f.check(UnauthorizedLogin):
                self.throttle.failed(*keys)
            return f
        return defer.maybeDeferred(attempt).addErrback(failed)

    def verify_token(self, token: str, address: str = "") -> Principal:
        try:
            return self.tokens.verify(token)
        except errors.Unauthorized as e:
            self.denied("token", None, address, e.message)
            raise errors.Unauthorized("authentication failed") from None

    def certificate_principal(self, transport) -> Principal | None:
        """With ``cert_principal = yes``: the CN of the client certificate an
        ``mtls:`` endpoint verified (None without one)."""
        cn = peer_common_name(transport) if self.options.cert_principal and transport is not None else None
        return Principal(cn, frozenset(), "certificate") if cn else None

    def anonymous(self, address: str = ""):
        if not self.options.anonymous:
            self.denied("anonymous", None, address)
            raise errors.Unauthorized("authentication required")
        return None

    def authenticate(self, authorization: str | None = None, token: str | None = None,
                     address: str = "", transport=None) -> defer.Deferred:
        """Principal (or None: anonymous) from an ``Authorization`` header
        (Basic or Bearer) or a token; fails with Unauthorized/Overloaded."""
        try:
            if authorization:
                scheme, _, value = authorization.strip().partition(" ")
                scheme = scheme.lower()
                if scheme == "basic":
                    try:
                        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
                    except (ValueError, UnicodeDecodeError):
                        sep = ""
                    if not sep:
                        self.denied("credentials", None, address, "malformed Basic credentials")
                        raise errors.Unauthorized("authentication failed")
                    return self.login(user, password, address)
                if scheme == "bearer":
                    return defer.succeed(self.verify_token(value.strip(), address))
                self.denied("credentials", None, address, f"unknown scheme {scheme[:20]!r}")
                raise errors.Unauthorized("authentication failed")
            if token:
                return defer.succeed(self.verify_token(token, address))
            return defer.succeed(self.certificate_principal(transport) or self.anonymous(address))
        except errors.MsgdError as e:
            return defer.fail(e)

    def authenticate_http(self, request, cookie: bool = False) -> defer.Deferred:
        """From the ``Authorization`` header; with ``cookie`` (opening a
        long-poll session or an SSE stream, what a browser cannot add a header
        to) also the ``msgd_token`` cookie, unless the request's ``Origin`` is
        not one of ``ws_origins`` (as on the WebSocket handshake)."""
        header = request.getHeader(b"authorization")
        token = None
        if cookie and header is None and origin_allowed(request.getHeader(b"origin"), self.origins):
            token = _cookie((request.getHeader(b"cookie") or b"").decode("latin-1"), TOKEN_COOKIE)
        return self.authenticate(header.decode("latin-1") if header else None, token,
                                 self.client_address(request), request.channel.transport)

    def authenticate_ws(self, request, transport) -> defer.Deferred:
        """From an Autobahn ConnectionRequest: ``Authorization`` header, a
        ``token`` query parameter, a ``bearer.TOKEN`` subprotocol, or the
        ``msgd_token`` cookie, in that order."""
        token = (request.params.get("token") or [None])[0]
        if token is None:
            token = next((p[len(TOKEN_SUBPROTOCOL):] for p in request.protocols
                          if p.startswith(TOKEN_SUBPROTOCOL)), None)
        if token is None:
            token = _cookie(request.headers.get("cookie", ""), TOKEN_COOKIE)
        address = self.addresses.of_handshake(request.headers, transport)
        return self.authenticate(request.headers.get("authorization"), token, address, transport)

    # -- tokens and limits -------------------------------------------------------------------

    def issue_token(self, name: str, roles=(), ttl: float | None = None) -> dict:
        token, exp = self.tokens.issue(name, roles, ttl)
        return {"token": token, "expires": exp}

    def check_rate(self, request) -> None:
        principal = request.principal
        key = getattr(principal, "name", None) or "anonymous"
        if not self.rate.take(key):
            self.limited("rate", key)
            raise errors.Overloaded("request rate limit exceeded")

    # -- HTTP ------------------------------------------------------------------------------------

    def protect(self, inner, refusals: list):
        """``inner`` (a leaf resource) behind this guard; ``refusals`` word a
        refusal in the protocol of the request (the mounts' ``Mount.refuse``, msgd.interfaces.http)."""
        return Protected(inner, self, refusals)

