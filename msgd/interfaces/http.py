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
calls at ``/status`` and ``/admin``.

Bodies larger than ``max_body`` are refused with 413 before they are read
whole (and before any ``100 Continue``); the connection then ends with a
lingering close (:class:`TrackedChannel`).  A client that goes away cancels
its call.
"""

from __future__ import annotations

import html
import importlib
import importlib.resources
import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.web import http, pages, resource, server

from msgd.config import (boolean, choice, duration, integer, networks, option, optional_duration, server_endpoint,
                         size, words)
from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.interfaces.base import Listener
from msgd.interfaces.connection import STATELESS, Clients
from msgd.interfaces.responder import Answer, respond
from msgd.security import Guard, SecurityOptions

# key -> (path segment, "module:factory"); factory(interface) -> Resource
MOUNTS: dict[str, tuple[bytes, str]] = {
    "websocket": (b"ws", "msgd.interfaces.websocket:make_resource"),
    "xmlrpc": (b"RPC2", "msgd.interfaces.xmlrpc:XMLRPCResource"),
    "soap": (b"soap", "msgd.interfaces.soap:SOAPResource"),
    "apps_static": (b"apps", "msgd.interfaces.appstatic:AppStaticResource"),
    "sse": (b"sse", "msgd.interfaces.sse:SSEResource"),
    "poll": (b"poll", "msgd.interfaces.poll:PollResource"),
    "status": (b"status", "msgd.interfaces.admin:make_status"),
    "admin": (b"admin", "msgd.interfaces.admin:make_admin"),
}

# How a protocol words the refusal of a body above max_body, told apart by the
# request's headers (the body is never read): refuse(request, error) ->
# (status line, content type, body), or None when the request is not its own.
# XML-RPC and SOAP add theirs so their clients get a fault, not JSON.
REFUSALS: list = []


@dataclass(frozen=True)
class Options(SecurityOptions):     # auth, anonymous, tokens and limits: see docs/security.rst
    endpoint: str = option(parse=server_endpoint, doc="where to listen, e.g. tcp:8080:interface=127.0.0.1")
    jsonrpc: bool = option(True, parse=boolean, doc="serve JSON-RPC 2.0 at /rpc")
    health: bool = option(True, parse=boolean, doc="serve /health")
    metrics: bool = option(True, parse=boolean, doc="serve /metrics")
    max_body: int = option(1024 * 1024, parse=size, doc="largest request body accepted (413 above)")
    max_batch: int = option(100, parse=integer(1), doc="most calls in one JSON-RPC batch")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of requests here (default: [node] request_timeout)")
    idle_timeout: float = option(120.0, parse=duration, doc="close HTTP connections idle this long")
    xmlrpc: bool = option(True, parse=boolean, doc="serve XML-RPC at /RPC2")
    xmlrpc_allow_none: bool = option(False, parse=boolean, doc="send None as the XML-RPC <nil/> extension")
    xmlrpc_i8: bool = option(False, parse=boolean, doc="send integers past 32 bits as the XML-RPC <i8> extension")
    soap: bool = option(True, parse=boolean, doc="serve SOAP 1.1/1.2 at /soap/MODULE (WSDL at ?wsdl)")
    soap_address: str = option("", doc="base URL of /soap/ put in WSDLs (default: from each request)")
    xml_max_depth: int = option(64, parse=integer(4, 1000), doc="deepest element nesting in XML-RPC and SOAP bodies")
    websocket: bool = option(True, parse=boolean, doc="serve WebSocket (JSON-RPC, pub/sub, STOMP) at /ws")
    ws_max_message: int = option(1024 * 1024, parse=size, doc="largest WebSocket message accepted")
    ws_max_pending: int = option(1024 * 1024, parse=size,
                                 doc="events queued for a client that does not read; past it the client is dropped")
    ws_max_subscriptions: int = option(1000, parse=integer(1), doc="most subscriptions per connection")
    ws_ping_interval: float = option(30.0, parse=duration, doc="keep-alive ping interval (0: none)")
    ws_ping_timeout: float = option(10.0, parse=duration, doc="close when no pong arrives within this")
    close_timeout: float = option(10.0, parse=duration,
                                  doc="how long a client the node closes (WebSocket close, a slow consumer's "
                                      "last SSE message) has to read it before the connection is aborted")
    ws_origins: tuple = option(("*",), parse=words,
                               doc="allowed Origin patterns, e.g. https://app.example.org http://localhost:*")
    apps_static: bool = option(True, parse=boolean, doc="serve app packages' static/ files at /apps/NAME/")
    apps_static_max_age: float = option(0.0, parse=duration,
                                        doc="Cache-Control max-age of /apps/ files (0: no-cache, revalidate)")
    sse: bool = option(True, parse=boolean, doc="serve Server-Sent Events (pub/sub, poll sessions) at /sse")
    poll: bool = option(True, parse=boolean, doc="serve JSON-RPC and pub/sub by HTTP long-poll at /poll")
    poll_wait: float = option(25.0, parse=duration, doc="longest a GET /poll waits for messages")
    poll_idle: float = option(60.0, parse=duration, doc="a long-poll session nobody polls this long expires")
    poll_max_queue: int = option(1024 * 1024, parse=size,
                                 doc="bytes queued per long-poll session or SSE stream; past it it is ended")
    poll_max_sessions: int = option(10000, parse=integer(1), doc="most long-poll sessions at once")
    sse_ping: float = option(15.0, parse=duration, doc="keep-alive comment interval of SSE streams")
    status: bool = option(False, parse=boolean, doc="serve the live status page at /status (see admin_allow)")
    status_interval: float = option(1.0, parse=duration, doc="how often the status page gets a new snapshot")
    admin: bool = option(False, parse=boolean,
                         doc="serve admin calls at /admin (reload config, set log levels; see admin_allow)")
    admin_allow: tuple = option(("127.0.0.1", "::1"), parse=networks,
                                doc="addresses/networks allowed to use /status and /admin")
    admin_token: str = option("", doc="when set, /status and /admin also need it (Authorization: Bearer, ?token=)")
    forwarded_header: str = option("x-forwarded-for", parse=choice("x-forwarded-for", "forwarded"),
                                   doc="the header trusted_proxies tell the client's address in: "
                                       "x-forwarded-for or forwarded (RFC 7239)")


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
        answer = next(filter(None, (refuse(self, error) for refuse in REFUSALS)), None)
        status, ctype, body = answer or (b"413 Payload Too Large", b"application/json",
                                         dumps(error_response(error)))
        self.channel.refuse(b"HTTP/1.1 %s\r\nContent-Type: %s\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, ctype, len(body), body))


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
        body = dumps(error_response(errors.Overloaded(f"too many connections ({limit})")))
        self.refuse(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

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

    def refuse(self, response: bytes) -> None:
        """Send ``response`` (a whole HTTP response with ``Connection:
        close``) as the connection's last bytes, then linger (see above)."""
        if self._lingering is not None:
            return
        self.setTimeout(None)
        # nothing more is parsed: not the rest of this read, not what comes later
        self._buffer = b""
        self.lineReceived = self.rawDataReceived = self.allContentReceived = _ignore  # type: ignore[method-assign]
        self.dataReceived = self._discard  # type: ignore[method-assign]   # nothing more is parsed
        transport: Any = self.transport
        transport.write(response)
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
        for call in (self._lingering or [])[1:]:
            if call.active():
                call.cancel()
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason):
        if self._lingering is not None:
            for call in self._lingering[1:]:
                if call.active():
                    call.cancel()
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
                         reactor=interface.node.reactor)
        self.interface = interface
        self.max_body = interface.options.max_body
        self.displayTracebacks = False
        self.noisy = False
        self.responses = interface.node.metrics.counter(
            "msgd_http_responses_total", "HTTP responses by interface and status code", ["interface", "code"])
        self._by_code: dict = {}

    def log(self, request):
        # access logging is the metrics' job; twisted.web's per-request line is noise here
        counter = self._by_code.get(request.code)
        if counter is None:
            counter = self._by_code[request.code] = self.responses.labels(self.interface.name, str(request.code))
        counter.inc()


def _json(request, status: int, obj) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj, indent=1).encode() + b"\n"


class JSONRPCResource(resource.Resource):
    isLeaf = True

    def __init__(self, interface: "HTTPInterface"):
        super().__init__()
        self.interface = interface
        clients = Clients(interface, interface.options.max_batch, 0, STATELESS)
        self.jsonrpc, self.builtins = clients.jsonrpc, clients.stateless()

    def render_GET(self, request):
        request.setHeader(b"allow", b"POST")
        return _json(request, 405, error_response(errors.InvalidRequest("use POST for JSON-RPC")))

    def render_POST(self, request):
        iface = self.interface
        node = iface.node
        body = request.content.read()
        timeout = iface.timeout()

        def make_request():
            return node.new_request(iface.name, timeout=timeout, principal=getattr(request, "principal", None))

        return respond(request, self.jsonrpc.answer(body, make_request, self.builtins), _jsonrpc_answer,
                       lambda e: Answer(500, None, None), log=iface.log, event="JSON-RPC over HTTP failed")


def _jsonrpc_answer(data: bytes | None) -> Answer:
    return Answer(204, None, None) if data is None else Answer(200, b"application/json", data)


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, node):
        super().__init__()
        self.node = node

    def render_GET(self, request):
        health = self.node.health()
        return _json(request, 200 if health["status"] != "down" else 503, health)


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, node):
        super().__init__()
        self.node = node

    def render_GET(self, request):
        request.setHeader(b"content-type", self.node.metrics.content_type.encode())
        return self.node.metrics.render()


class TargetsResource(resource.Resource):
    """``/targets``: what this node offers, for a person with a browser."""

    isLeaf = True

    def __init__(self, node):
        super().__init__()
        self.node = node

    def render_GET(self, request):
        node = self.node
        rows = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in node.apps.targets())
        errs = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(str(e))}</li>"
                       for n, e in node.apps.errors().items())
        page = (f"<!doctype html><meta charset=utf-8><title>msgd {html.escape(node.name_)}</title>"
                f"<h1>msgd node {html.escape(node.name_)}</h1>"
                f"<p>JSON-RPC 2.0: <code>POST /rpc</code>, WebSocket <code>/ws</code> &middot; "
                f"<a href=/health>/health</a> &middot; <a href=/metrics>/metrics</a></p>"
                f"<h2>Targets</h2><ul>{rows}</ul>"
                + (f"<h2>Load errors</h2><ul>{errs}</ul>" if errs else ""))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode()


class WebFile(resource.Resource):
    """A file shipped in msgd/web, read once."""

    isLeaf = True

    def __init__(self, name: str, content_type: bytes):
        super().__init__()
        self.body = importlib.resources.files("msgd.web").joinpath(name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return pages.notFound().render(request)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body


class Root(resource.Resource):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def getChild(self, path, request):
        if path == b"":
            return self.index
        return pages.notFound()


class HTTPInterface(Listener):
    Options = Options
    type_name = "http"

    def __init__(self, name, options, node):
        super().__init__(name, options, node)
        self.guard = Guard(self)
        guarded = {b"rpc", b"RPC2", b"soap", b"targets", b"poll", b"sse"}    # what needs authentication (and may be refused)

        def put(segment, res):
            self.root.putChild(segment, self.guard.protect(res, REFUSALS) if segment in guarded else res)
        self.root = Root(WebFile("index.html", b"text/html; charset=utf-8"))
        put(b"targets", TargetsResource(node))
        self.root.putChild(b"msgd.js", WebFile("msgd.js", b"text/javascript; charset=utf-8"))
        self.root.putChild(b"msgd.mjs", WebFile("msgd.mjs", b"text/javascript; charset=utf-8"))
        if options.jsonrpc:
            put(b"rpc", JSONRPCResource(self))
        if options.health:
            self.root.putChild(b"health", HealthResource(node))
        if options.metrics:
            self.root.putChild(b"metrics", MetricsResource(node))
        for key, (segment, factory) in MOUNTS.items():
            if getattr(options, key, False):
                modname, _, attr = factory.partition(":")
                make = getattr(importlib.import_module(modname), attr)
                put(segment, make(self))
        self.site = MsgdSite(self.root, self)

    def factory(self):
        return self.site

    def close_connections(self):
        # Long-poll sessions outlive their connections: end them with the interface.
        sessions = getattr(self, "poll_sessions", None)
        if sessions is not None:
            sessions.close_all()
        return super().close_connections()
