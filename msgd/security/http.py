"""HTTP's side of security: :class:`Protected` wraps a mount so it runs
only after the interface's guard authenticated the request; the browser
helpers (the token cookie, ``Origin`` checks) that the guard's HTTP and
WebSocket authentication use."""

from __future__ import annotations

import fnmatch

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.core import errors

log = Logger(namespace="msgd.security")

TOKEN_COOKIE = "msgd_token"
TOKEN_SUBPROTOCOL = "bearer."      # WebSocket: offer "bearer.TOKEN" beside "jsonrpc"


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

    def __init__(self, inner, guard, refusals: list):
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
