"""The one narrow API every interface calls to authenticate, limit and
authorize.

- :class:`SecurityOptions`: the keys an interface section gains by
  inheriting it (``auth``, ``anonymous``, tokens, limits).
- :class:`Guard`: built per interface from those keys.  Interfaces call
  ``authenticate(authorization, token, address)`` (HTTP, WebSocket),
  ``login(user, password, address)`` (STOMP, PB), ``admit(transport)`` /
  ``release(transport)`` for connections (``readmit`` for each request a
  trusted proxy's connection carries), and :meth:`protect` wraps HTTP
  resources.  Addresses are the clients' as ``guard.addresses``
  (:mod:`msgd.security.addresses`) decides them behind trusted proxies.
  Every refusal is counted and logged here.
- :class:`Access`: the node's ``dispatcher.authorize`` and the channel check
  given to :class:`msgd.core.pubsub.Session`: rate per principal, then the
  ``[access:*]`` rules.

Refusals are always :class:`errors.Unauthorized` (-32001) with the same
message whether or not the target exists, or :class:`errors.Overloaded`
(-32005) for limits; each interface renders them in its own form.
"""

from __future__ import annotations

import base64
import fnmatch
import os
from dataclasses import dataclass

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.config import Invalid, boolean, choice, duration, integer, networks, option, optional_path, string
from msgd.core import errors
from msgd.security.addresses import ClientAddresses
from msgd.security.credentials import LDAPChecker, PasswordFileChecker
from msgd.security.limits import ConnectionLimits, LoginThrottle, RateLimit
from msgd.security.principal import Principal
from msgd.security.rules import Rules
from msgd.security.tls import peer_common_name
from msgd.security.tokens import Tokens

log = Logger(namespace="msgd.security")

TOKEN_COOKIE = "msgd_token"
TOKEN_SUBPROTOCOL = "bearer."      # WebSocket: offer "bearer.TOKEN" beside "jsonrpc"


@dataclass(frozen=True, kw_only=True)
class SecurityOptions:
    auth: str = option("none", parse=choice("none", "password", "ldap"),
                       doc="how logins are checked: none, password (auth_file) or ldap (auth_adapter)")
    auth_file: str | None = option(None, parse=optional_path,
                                   doc="password file (user:bcrypt-hash[:roles] lines; see msgd passwd)")
    auth_adapter: str = option("", parse=string, doc="name of the [adapter:NAME] type = ldap used by auth = ldap")
    anonymous: bool = option(True, parse=boolean, doc="allow callers without credentials (rules still apply)")
    token_secret: str = option("", parse=string,
                               doc="HMAC key of signed tokens, at least 16 characters; share it between "
                                   "interfaces and nodes that accept each other's tokens "
                                   "(empty: random per start)")
    token_ttl: float = option(3600.0, parse=duration, doc="lifetime of tokens issued here")
    max_connections: int = option(0, parse=integer(0), doc="most open connections (0: no limit)")
    max_connections_per_address: int = option(0, parse=integer(0),
                                               doc="most open connections from one client address (0: no limit)")
    rate: int = option(0, parse=integer(0),
                         doc="calls per second allowed per principal (anonymous callers share one; 0: no limit)")
    rate_burst: int = option(0, parse=integer(0), doc="calls allowed at once above the rate (default: rate)")
    login_attempts: int = option(5, parse=integer(0),
                                 doc="failed logins per client address or user within login_window "
                                     "before further logins are refused (0: no throttling)")
    login_window: float = option(60.0, parse=duration, doc="window of login_attempts")
    cert_principal: bool = option(False, parse=boolean,
                                  doc="a client certificate verified by an mtls: endpoint names the principal "
                                      "(its CN) when no other credentials are given (HTTP, WebSocket)")
    trusted_proxies: tuple = option((), parse=networks,
                                    doc="addresses/networks of reverse proxies and load balancers whose word on "
                                        "the client's address is believed (HTTP: forwarded_header; "
                                        "proxy_protocol); nobody else's is")
    proxy_protocol: bool = option(False, parse=boolean,
                                  doc="every connection starts with a PROXY protocol v1/v2 header, accepted from "
                                      "trusted_proxies only (HAProxy send-proxy, nginx stream proxy_protocol)")

    def check(self):
        if self.auth == "password" and not self.auth_file:
            raise Invalid("auth = password needs auth_file", "auth_file")
        if self.auth == "ldap" and not self.auth_adapter:
            raise Invalid("auth = ldap needs auth_adapter", "auth_adapter")
        if self.token_secret and len(self.token_secret.encode()) < 16:
            raise Invalid("must be at least 16 characters", "token_secret")
        if self.proxy_protocol and not self.trusted_proxies:
            raise Invalid("proxy_protocol needs trusted_proxies (the proxies allowed to send the header)",
                          "trusted_proxies")
        if self.proxy_protocol and getattr(self, "endpoint", "").partition(":")[0] in ("ssl", "mtls"):
            # the PROXY header comes before any TLS handshake, and Twisted's TLS endpoints read TLS first
            raise Invalid("proxy_protocol needs a plain endpoint (tcp:, unix:, systemd:): terminate TLS at "
                          "the proxy", "proxy_protocol")


class Guard:
    """Authentication and limits of one interface."""

    def __init__(self, interface):
        o = interface.options
        node = interface.node
        self.interface = interface.name
        self.node = node
        self.options = o
        self.origins = getattr(o, "ws_origins", ("*",))    # where browsers may bring the token cookie from
        self.checker = None
        if o.auth == "password":
            self.checker = PasswordFileChecker(o.auth_file, node.run_blocking)
        elif o.auth == "ldap":
            self.checker = LDAPChecker(node, o.auth_adapter)
        secret = o.token_secret.encode() if o.token_secret else os.urandom(32)
        self.tokens = Tokens(secret, node.reactor, o.token_ttl)
        self.addresses = ClientAddresses(o.trusted_proxies, getattr(o, "forwarded_header", "x-forwarded-for"))
        self.connections = ConnectionLimits(o.max_connections, o.max_connections_per_address)
        self._open: dict = {}          # admitted transport -> client address (None: a proxy's, not yet known)
        self.rate = RateLimit(node.reactor, o.rate, o.rate_burst or int(o.rate))
        self.throttle = LoginThrottle(node.reactor, o.login_attempts, o.login_window)
        m = node.metrics
        self._denied = m.counter("msgd_auth_denied_total", "Refused authentications and authorizations",
                                 ["interface", "reason"])
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
        """None when a new connection may stay open (then :meth:`release`
        it when it closes), else the name of the limit it hits.  With
        ``forwarded`` (HTTP), a connection from a trusted proxy counts only
        towards ``max_connections`` until :meth:`readmit` names the client
        of each request it carries."""
        peer = self.addresses.of_connection(transport)
        address = None if forwarded and self.addresses.trusts(peer) else peer
        hit = self.connections.admit(address)
        if hit is not None:
            self.limited(hit, peer)
        else:
            self._open[transport] = address
        return hit

    def readmit(self, transport, address: str) -> str | None:
        """A request arrived through a trusted proxy's connection (see
        :meth:`admit`): from now on the connection counts as ``address``'s,
        the client of that request (a proxy may carry several clients' requests
        on one connection, one after the other).  None, or the limit hit
        (then the connection is no longer counted: close it)."""
        if transport not in self._open or self._open[transport] == address:
            return None
        self.connections.release(self._open.pop(transport))
        hit = self.connections.admit(address)
        if hit is not None:
            self.limited(hit, address)
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
        try:
            self.throttle.check(*keys)
        except errors.Overloaded as e:
            self.limited("login_throttle", f"{user}@{address}")
            return defer.fail(e)
        if self.checker is None:
            self.denied("credentials", user, address, "this interface checks no passwords")
            return defer.fail(errors.Unauthorized("authentication failed"))
        d = defer.maybeDeferred(self.checker.requestAvatarId, UsernamePassword(user, password))

        def refused(f):
            if f.check(UnauthorizedLogin):
                self.throttle.failed(*keys)
                self.denied("credentials", user, address, f.getErrorMessage())
                raise errors.Unauthorized("authentication failed")
            log.failure("cannot check credentials on {interface}", f, interface=self.interface)
            raise errors.Unavailable("credentials cannot be checked now")
        return d.addErrback(refused)

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
        refusal in the protocol of the request (see ``http.REFUSALS``)."""
        return Protected(inner, self, refusals)

def origin_allowed(origin, patterns) -> bool:
    """Whether a browser's ``Origin`` (str, bytes or None: not a browser, or
    same-origin GET) matches one of ``patterns`` (``ws_origins``)."""
    if not origin or "*" in patterns:
        return True
    if isinstance(origin, bytes):
        origin = origin.decode("latin-1")
    return any(fnmatch.fnmatchcase(origin, p) for p in patterns)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"')
    return None


class Protected(resource.Resource):
    """An HTTP leaf resource that runs only after its guard authenticated
    the request: ``request.principal`` is set for the inner resource.
    Refused requests get 401 (with ``WWW-Authenticate``), 429 or 503, with
    a body in the request's protocol."""

    isLeaf = True

    def __init__(self, inner, guard: Guard, refusals: list):
        super().__init__()
        self.inner = inner
        self.guard = guard
        self.refusals = refusals
        # /poll and /sse: a request naming a long-poll session is the session's (its
        # id is the secret); opening one may bring the token cookie (see authenticate_http)
        self.sessions = getattr(inner, "session_ids", False)

    def render(self, request):
        guard = self.guard
        if guard.options.anonymous and not guard.options.cert_principal \
                and not request.requestHeaders.hasHeader(b"authorization") \
                and not (self.sessions and request.requestHeaders.hasHeader(b"cookie")):
            request.principal = None    # the common case, decided without Deferreds
            return self.inner.render(request)
        if self.sessions and b"session" in request.args:
            request.principal = None    # the session's principal applies; an unknown id is a 404
            return self.inner.render(request)
        d = guard.authenticate_http(request, cookie=self.sessions)
        result = []
        d.addCallbacks(lambda p: result.append(("ok", p)), lambda f: result.append(("no", f)))
        if result:                              # decided at once: no thread hop
            return self._then(request, *result[0])
        d.addCallback(lambda _: self._late(request, *result[0]))
        return NOT_DONE_YET

    def _then(self, request, outcome, value):
        if outcome == "no":
            return self._refuse(request, value)
        request.principal = value
        return self.inner.render(request)

    def _late(self, request, outcome, value):
        if request._disconnected or request.finished:
            return
        try:
            body = self._then(request, outcome, value)
        except Exception:
            request.processingFailed(Failure())
            return
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _refuse(self, request, failure) -> bytes:
        e = failure.value
        if not isinstance(e, errors.MsgdError):
            log.failure("authentication failed unexpectedly", failure)
            e = errors.Unavailable("credentials cannot be checked now")
        status = {errors.Unauthorized: 401, errors.Overloaded: 429}.get(type(e), 503)
        if status == 401:
            # no Basic challenge to msgd.js's fetch/EventSource: a browser would ask the user for a password
            if not self.sessions:
                request.responseHeaders.addRawHeader(b"www-authenticate", b'Basic realm="msgd", charset="UTF-8"')
            request.responseHeaders.addRawHeader(b"www-authenticate", b'Bearer realm="msgd"')
        if status == 429 and isinstance(e.data, dict) and "retry_after" in e.data:
            request.setHeader(b"retry-after", b"%d" % max(1, int(e.data["retry_after"] + 0.999)))
        answer = next(filter(None, (refuse(request, e) for refuse in self.refusals)), None)
        if answer is None:
            from msgd.core.jsonrpc import dumps, error_response
            ctype, body = b"application/json", dumps(error_response(e))
        else:
            ctype, body = answer[1], answer[2]
        request.setResponseCode(status)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"cache-control", b"no-store")
        return body


class Access:
    """The node's authorization: ``authorize(request, target)`` is the
    dispatcher's hook; ``authorize_channel(request, action, channel)`` is
    given to pub/sub Sessions.  Calls an app makes through ``api.call`` are
    not checked again (``request.meta["internal"]``)."""

    def __init__(self, node, sections=()):
        self.node = node
        self.rules = Rules(sections)
        self._denied = node.metrics.counter("msgd_auth_denied_total", "Refused authentications and authorizations",
                                            ["interface", "reason"])

    def update(self, sections) -> None:
        self.rules = Rules(sections)

    def guard(self, interface: str) -> Guard | None:
        return getattr(self.node.interfaces.get(interface), "guard", None)

    def _check(self, request, action: str, name: str) -> None:
        if request.meta.get("internal"):
            return
        guard = self.guard(request.interface)
        if guard is not None:
            if request.principal is None and not guard.options.anonymous:
                # where no handshake could refuse it first (a stream before rpc.login)
                self._denied.labels(request.interface, "anonymous").inc()
                raise errors.Unauthorized("authentication required")
            guard.check_rate(request)
        if not self.rules.allows(request.interface, request.principal, action, name):
            self._denied.labels(request.interface, "rule").inc()
            log.info("denied on {interface}: {principal} may not {action} {name}", interface=request.interface,
                     principal=str(request.principal or "anonymous"), action=action, name=name[:200])
            raise errors.Unauthorized("unauthorized")

    def authorize(self, request, target: str) -> None:
        self._check(request, "call", target)

    def authorize_channel(self, request, action: str, channel: str) -> None:
        self._check(request, action, channel)

    def check_visible(self, interface: str, principal, target: str) -> None:
        """For decoders that must look a target up before the dispatcher
        runs (SOAP): refuse, as the dispatcher would, a target the caller
        may not call, before its existence shows."""
        if not self.rules.allows(interface, principal, "call", target):
            self._denied.labels(interface, "rule").inc()
            raise errors.Unauthorized("unauthorized")

    def allows(self, request, target: str) -> bool:
        """For listings (XML-RPC ``system.listMethods``): no rate, no log."""
        return self.rules.allows(request.interface, request.principal, "call", target)
