"""HTTP: one twisted.web Site per ``[interface:NAME] type=http``.

Paths on the Site::

    POST /rpc        JSON-RPC 2.0 (calls, notifications, batches); always
                     HTTP 200 with a JSON-RPC answer, 204 when there is none
    GET  /health     JSON: node, uptime, interfaces, modules, load errors
    GET  /metrics    Prometheus text format
    GET  /           a landing page (it opens the chat demo at /apps/chat/ when
                     that app is there)
    GET  /targets    a page listing the node's targets
    GET  /msgd.js    the browser client (/msgd.mjs: as an ES module)

Other interfaces mount on the same Site through :data:`MOUNTS`, each switched
by a key of this section: WebSocket at ``/ws``, XML-RPC at ``/RPC2``, SOAP
under ``/soap/``, Server-Sent Events at ``/sse``, long-poll at ``/poll``,
app packages' static files under ``/apps/NAME/``, the status page and admin
calls at ``/status`` and ``/admin``.  Each mount's module declares its keys
(a frozen options dataclass); :class:`Options`, the section's keys, is
assembled from them, the Site's own (:class:`SiteOptions`) and the security
keys.  What mounts share is the interface's :class:`Shared`.

Bodies larger than ``max_body`` are refused with 413 before they are read
whole (and before any ``100 Continue``); the connection then ends with a
lingering close (:class:`TrackedChannel`).  A client that goes away cancels
its call.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.interfaces import ISSLTransport
from twisted.web import http, resource, server

from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.interfaces import admin, appstatic, poll, soap, sse, websocket, xmlrpc
from msgd.interfaces.appstatic import Folder, WebFile
from msgd.interfaces.base import Listener
from msgd.interfaces.connection import STATELESS, Clients
from msgd.interfaces.responder import Answer, CallResource, json_reply
from msgd.options import boolean, choice, duration, integer, option, optional_duration, server_endpoint, size
from msgd.security import Guard, SecurityOptions
from msgd.services import Control


@dataclass(frozen=True, kw_only=True)
class SiteOptions:
    """the Site: ``/rpc``, ``/health``, ``/metrics``, ``/targets``, and the keys several mounts read"""

    endpoint: str = option(parse=server_endpoint, doc="where to listen, e.g. tcp:8080:interface=127.0.0.1")
    jsonrpc: bool = option(True, parse=boolean, doc="serve JSON-RPC 2.0 at /rpc")
    health: bool = option(True, parse=boolean, doc="serve /health")
    metrics: bool = option(True, parse=boolean, doc="serve /metrics")
    max_body: int = option(1024 * 1024, parse=size, doc="largest request body accepted (413 above)")
    max_batch: int = option(100, parse=integer(1),
                            doc="most calls in one JSON-RPC batch (and one XML-RPC system.multicall)")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of requests here (default: [node] request_timeout)")
    idle_timeout: float = option(120.0, parse=duration, doc="close HTTP connections idle this long")
    close_timeout: float = option(10.0, parse=duration,
                                  doc="how long a client the node closes (WebSocket close, a slow consumer's "
                                      "last SSE message) has to read it before the connection is aborted")
    ws_max_subscriptions: int = option(1000, parse=integer(1),
                                       doc="most subscriptions per connection (WebSocket, long-poll session, "
                                           "SSE stream)")
    xml_max_depth: int = option(64, parse=integer(4, 1000), doc="deepest element nesting in XML-RPC and SOAP bodies")
    forwarded_header: str = option("x-forwarded-for", parse=choice("x-forwarded-for", "forwarded"),
                                   doc="the header trusted_proxies tell the client's address in: "
                                       "x-forwarded-for or forwarded (RFC 7239)")


@dataclass(frozen=True, kw_only=True)
class Options(admin.AdminOptions, poll.PollOptions, sse.SSEOptions, appstatic.AppStaticOptions,
              soap.SOAPOptions, xmlrpc.XMLRPCOptions, websocket.WebSocketOptions, SiteOptions, SecurityOptions):
    """The keys of ``type = http``: the security keys (docs/security.rst), the
    Site's, then each mount's (fields come in the reverse order of the bases)."""


@dataclass(frozen=True)
class Mount:
    """A resource on the Site, switched on by the boolean key ``key`` of
    :class:`Options` (its module declares it among its keys).  ``make(interface)``
    builds it; ``guarded`` puts it behind the guard (authentication, rates);
    ``refuse(request, error)`` words the refusal of a body above ``max_body``
    in the mount's protocol, told by the request's headers (the body is never
    read): ``(status line, content type, body)``, or None when the request is
    not its own (XML-RPC and SOAP clients get a fault, not JSON)."""

    key: str
    segment: bytes
    make: Callable[[Any], resource.Resource]
    guarded: bool = False
    refuse: Callable | None = None


MOUNTS = (
    Mount("websocket", b"ws", websocket.make_resource),
    Mount("xmlrpc", b"RPC2", xmlrpc.XMLRPCResource, guarded=True, refuse=xmlrpc.refuse),
    Mount("soap", b"soap", soap.SOAPResource, guarded=True, refuse=soap.refuse),
    Mount("apps_static", b"apps", appstatic.AppStaticResource),
    Mount("sse", b"sse", sse.SSEResource, guarded=True),
    Mount("poll", b"poll", poll.PollResource, guarded=True),
    Mount("status", b"status", admin.make_status),
    Mount("admin", b"admin", admin.make_admin),
)


class Shared:
    """What the mounts of one HTTP interface share, made by the interface
    before them (``interface.shared``): the long-poll sessions (``/poll``
    and ``/sse?session=``), the WebSocket counters (``/ws`` and the status
    page's socket).  None where no mount uses it."""

    def __init__(self, interface: "HTTPInterface"):
        o = interface.options
        self.poll_sessions = poll.Sessions(interface) if o.poll or o.sse else None
        self.websocket = (websocket.Counters(interface.services.metrics, interface.name)
                          if o.websocket or o.status else None)


class BoundedRequest(server.Request):
    """A Request that refuses bodies above the Site's ``max_body`` with 413
    as soon as it knows (Content-Length, before any ``100 Continue``; or
    while chunks arrive)."""

    _received = 0
    _rejected = False

    def handleContentChunk(self, data):
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.reject_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def reject_too_large(self):
        self._rejected = True
        error = errors.TooLarge(f"request body larger than {self.channel.site.max_body} bytes")
        answer = next(filter(None, (refuse(self, error) for refuse in self.channel.site.refusals)), None)
        self.channel.refuse(*answer or (b"413 Payload Too Large", b"application/json", dumps(error_response(error))))


class TrackedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that tells its interface when it opens and closes,
    so the interface can close every connection when it stops.  A connection
    past the interface's connection limits is answered 429 and closed.

    A refusal (429, 413) is the connection's last answer, and it is closed
    the way nginx's *lingering close* does it, so that a client still
    sending its request gets to read the answer instead of a connection
    reset: the channel parses nothing more, shuts down its sending side once
    the answer is out (on TCP), and reads and discards what still comes,
    until the client closes or ``linger_idle`` seconds pass without data, and
    for at most ``linger_time`` seconds and ``linger_bytes`` bytes; then the
    connection is aborted."""

    linger_time = 5.0
    linger_idle = 1.0
    linger_bytes = 32 * 1024 * 1024

    _admitted = False
    _lingering: list | None = None        # [bytes discarded, idle timer, deadline timer] once refused

    def connectionMade(self):
        super().connectionMade()
        self._admitted = self.site.interface.admit(self.transport, self._too_many, forwarded=True)

    def _too_many(self, limit: str) -> None:
        self.refuse(b"429 Too Many Requests", b"application/json",
                    dumps(error_response(errors.Overloaded(f"too many connections ({limit})"))), b"Retry-After: 1\r\n")

    def allHeadersReceived(self):
        guard = self.site.interface.guard
        if guard.addresses.networks and self._admitted:
            # through a trusted proxy the connection is the client's of this request: its limits apply
            hit = guard.readmit(self.transport, guard.client_address(self.requests[-1]))
            if hit is not None:
                self._too_many(hit)
                return
        if self.length is not None and self.length > self.site.max_body:
            # refused before twisted.web could answer "Expect: 100-continue"
            self.requests[-1].reject_too_large()
            return
        super().allHeadersReceived()

    # -- refusing and lingering ---------------------------------------------------------

    def refuse(self, status: bytes, content_type: bytes, body: bytes, headers: bytes = b"") -> None:
        """Answer ``status`` (``b"413 Payload Too Large"``) with ``body`` as
        the connection's last bytes, then linger (see above)."""
        if self._lingering is not None:
            return
        self.setTimeout(None)
        # nothing more is parsed: not the rest of this read, not what comes later
        self._buffer = b""
        self.lineReceived = self.rawDataReceived = self.allContentReceived = _ignore  # type: ignore[method-assign]
        self.dataReceived = self._discard  # type: ignore[method-assign]   # nothing more is parsed
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%sConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (status, content_type, headers, len(body), body))
        if hasattr(transport, "loseWriteConnection") and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()      # FIN once the answer is out; reading goes on
        self._lingering = [0, self.callLater(self.linger_idle, self._linger_end),
                           self.callLater(self.linger_time, self._linger_end)]

    def _discard(self, data: bytes) -> None:
        lingering = self._lingering
        assert lingering is not None
        lingering[0] += len(data)
        if lingering[0] > self.linger_bytes:
            self._linger_end()
        elif lingering[1].active():
            lingering[1].reset(self.linger_idle)

    def _linger_end(self) -> None:
        self._stop_lingering()
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _stop_lingering(self) -> None:
        for call in (self._lingering or [])[1:]:
            if call.active():
                call.cancel()

    def connectionLost(self, reason):
        self._stop_lingering()
        if self._admitted:
            self._admitted = False
            self.site.interface.closed(self.transport)
        super().connectionLost(reason)


def _ignore(*args):
    return None


class MsgdSite(server.Site):
    requestFactory = BoundedRequest
    protocol = TrackedChannel   # type: ignore[assignment]   # an HTTPChannel, as Site's default factory makes

    def __init__(self, root, interface: "HTTPInterface"):
        # Nothing here takes HTML form posts: bodies are JSON or XML, arguments come
        # from the query string.  Twisted would otherwise parse every POST's
        # Content-Type with the email package (tens of microseconds) and a
        # multipart body in full before any resource saw the request.
        super().__init__(root, timeout=interface.options.idle_timeout, parsePOSTFormSubmission=False,
                         reactor=interface.services.reactor)
        self.interface = interface
        self.max_body = interface.options.max_body
        self.refusals = interface.refusals
        self.displayTracebacks = False
        self.noisy = False
        self.responses = interface.services.metrics.counter(
            "msgd_http_responses_total", "HTTP responses by interface and status code", ["interface", "code"])
        self._by_code: dict = {}

    def log(self, request):
        # access logging is the metrics' job; twisted.web's per-request line is noise here
        counter = self._by_code.get(request.code)
        if counter is None:
            counter = self._by_code[request.code] = self.responses.labels(self.interface.name, str(request.code))
        counter.inc()


class JSONRPCResource(CallResource):
    def __init__(self, interface: "HTTPInterface"):
        super().__init__(interface)
        clients = Clients(interface, interface.options.max_batch, 0, STATELESS)
        self.jsonrpc, self.builtins = clients.jsonrpc, clients.stateless()

    def render_GET(self, request):
        request.setHeader(b"allow", b"POST")
        return json_reply(request, 405, error_response(errors.InvalidRequest("use POST for JSON-RPC")), pretty=True)

    def render_POST(self, request):
        outcome = self.jsonrpc.answer(request.content.read(), lambda: self.new_request(request), self.builtins)
        return self.respond(request, outcome, _jsonrpc_answer, lambda e: Answer(500, None, None),
                            "JSON-RPC over HTTP failed")


def _jsonrpc_answer(data: bytes | None) -> Answer:
    return Answer(204, None, None) if data is None else Answer(200, b"application/json", data)


class Page(resource.Resource):
    """A leaf answering GET with ``render(request)``."""

    isLeaf = True

    def __init__(self, render: Callable[[Any], bytes]):
        super().__init__()
        self.content = render

    def render_GET(self, request):
        return self.content(request)


def health_page(services) -> Page:
    """``/health``: ``services.health()``, 503 when the node is down."""
    def render(request):
        report = services.health()
        return json_reply(request, 200 if report["status"] != "down" else 503, report, pretty=True)
    return Page(render)


def metrics_page(registry) -> Page:
    """``/metrics``: the registry in Prometheus' text format."""
    def render(request):
        request.setHeader(b"content-type", registry.content_type.encode())
        return registry.render()
    return Page(render)


def targets_page(services) -> Page:
    """``/targets``: what this node offers, for a person with a browser."""
    def render(request):
        apps, name = services.apps, html.escape(services.settings.name)
        rows = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in apps.targets())
        errs = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(str(e))}</li>"
                       for n, e in apps.errors().items())
        page = (f"<!doctype html><meta charset=utf-8><title>msgd {name}</title><h1>msgd node {name}</h1>"
                f"<p>JSON-RPC 2.0: <code>POST /rpc</code>, WebSocket <code>/ws</code> &middot; "
                f"<a href=/health>/health</a> &middot; <a href=/metrics>/metrics</a></p>"
                f"<h2>Targets</h2><ul>{rows}</ul>"
                + (f"<h2>Load errors</h2><ul>{errs}</ul>" if errs else ""))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode()
    return Page(render)


class HTTPInterface(Listener):
    """The Site and its mounts.  ``control`` (:class:`msgd.services.Control`,
    the node's reload and log levels) is for ``/admin`` and ``/status``;
    ``shared`` (:class:`Shared`) is what the mounts share."""

    Options = Options
    type_name = "http"

    def __init__(self, name, options, services):
        super().__init__(name, options, services)
        self.control: Control | None = services if isinstance(services, Control) else None
        self.guard = Guard(self)
        self.shared = Shared(self)
        mounts = [m for m in MOUNTS if getattr(options, m.key)]
        self.refusals = [m.refuse for m in mounts if m.refuse is not None]

        def put(segment, res, guarded=False):
            self.root.putChild(segment, self.guard.protect(res, self.refusals) if guarded else res)
        self.root = Folder(WebFile("index.html"))
        put(b"targets", targets_page(services), guarded=True)
        put(b"msgd.js", WebFile("msgd.js"))
        put(b"msgd.mjs", WebFile("msgd.mjs"))
        if options.jsonrpc:
            put(b"rpc", JSONRPCResource(self), guarded=True)
        if options.health:
            put(b"health", health_page(services))
        if options.metrics:
            put(b"metrics", metrics_page(services.metrics))
        for m in mounts:
            put(m.segment, m.make(self), m.guarded)
        self.site = MsgdSite(self.root, self)

    def factory(self):
        return self.site

    def close_connections(self):
        # Long-poll sessions outlive their connections: end them with the interface.
        if self.shared.poll_sessions is not None:
            self.shared.poll_sessions.close_all()
        return super().close_connections()
