"""Operator endpoints on an http interface: the live status page and admin
calls.  Both are off by default.

``status = yes``
    ``GET /status`` — the status page (msgd/web/status.html, on msgd.js);
    ``/status/ws`` — its WebSocket (JSON-RPC, subprotocol ``jsonrpc``) which
    offers only ``rpc.status`` (the current snapshot) and ``rpc.subscribe``
    to the channel ``msgd.status``, on which a snapshot is published every
    ``status_interval`` while someone watches.  The channel lives in a broker
    of its own: clients of ``/ws`` cannot see it.
``admin = yes``
    ``POST /admin/reload`` — re-read node.ini and apply it (as SIGHUP does);
    ``GET /admin/log-level`` — the levels in force;
    ``POST /admin/log-level`` with ``{"namespace": "msgd.core.apps", "level":
    "debug"}`` — change one while running (``"*"``: the default level).
    POSTs must be ``Content-Type: application/json``, which a page of another
    site cannot send without a CORS preflight (that the node never grants).

Who may use them: clients whose address is in ``admin_allow`` (default:
loopback only; behind a reverse proxy, the client's address as the
interface's ``trusted_proxies`` tell it: see ``msgd.security.addresses``)
and, when ``admin_token`` is set, that present it as
``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (how a browser passes it,
to the page and its WebSocket alike).

A snapshot (the wire format of ``msgd.status``)::

    {"node", "time", "uptime", "status", "in_flight",
     "interfaces": {NAME: {"type", "running", "listening", "connections"}},
     "adapters": {NAME: {"type", "running", "breaker", "pool", "last_error", ...}},
     "modules": {NAME: {"version", "loaded_at", "error"}},
     "requests": {"total", "errors", "rate", "error_rate", "p50", "p95"},
     "by_interface": {NAME: {"total", "errors"}},
     "last_reload": {"at", "ok", "error", ...} | null, "log_levels": {...}}

``rate``/``error_rate`` are calls per second and ``p50``/``p95`` latencies in
seconds (estimated from the histogram buckets) over the last interval.

Both read the node through the interface's ``services`` (reactor, metrics,
``health()``, ``settings``, dispatcher, apps) and its ``control``
(:class:`msgd.services.Control`: ``reload()``, ``logs``, ``last_reload``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from dataclasses import dataclass

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.core import errors
from msgd.core.pubsub import Broker
from msgd.interfaces.appstatic import Folder, WebFile
from msgd.interfaces.base import StartupError
from msgd.interfaces.connection import Clients
from msgd.interfaces.responder import json_reply
from msgd.interfaces.websocket import MsgdWebSocket, MsgdWebSocketFactory
from msgd.logging import BadLevel
from msgd.options import boolean, duration, networks, option
from msgd.security.addresses import ip
from msgd.services import Control

CHANNEL = "msgd.status"
log = Logger()


@dataclass(frozen=True, kw_only=True)
class AdminOptions:
    """``/status`` and ``/admin``: the status page and admin calls (switches ``status``, ``admin``)"""

    status: bool = option(False, parse=boolean, doc="serve the live status page at /status (see admin_allow)")
    status_interval: float = option(1.0, parse=duration, doc="how often the status page gets a new snapshot")
    admin: bool = option(False, parse=boolean,
                         doc="serve admin calls at /admin (reload config, set log levels; see admin_allow)")
    admin_allow: tuple = option(("127.0.0.1", "::1"), parse=networks,
                                doc="addresses/networks allowed to use /status and /admin")
    admin_token: str = option("", doc="when set, /status and /admin also need it (Authorization: Bearer, ?token=)")


def _json(request, status: int, obj) -> bytes:
    return json_reply(request, status, obj, pretty=True)


class Guard(resource.Resource):
    """Lets through only allowed addresses (and the token, when one is set)."""

    def __init__(self, inner: resource.Resource, interface):
        super().__init__()
        self.inner = inner
        self.guard = interface.guard
        self.allow = [ipaddress.ip_network(n, strict=False) for n in interface.options.admin_allow]
        self.token = interface.options.admin_token.encode()

    def refused(self, request) -> resource.Resource | None:
        """None when allowed, else the refusal (403, 401)."""
        address = self.guard.client_address(request)
        addr = ip(address)
        if addr is None or not any(addr in net for net in self.allow):
            self.guard.denied("address", None, address, request.path.decode("latin-1")[:100])
            return _Refused(403, "not allowed from this address")
        if self.token:
            auth = request.getHeader(b"authorization") or b""
            given = auth[7:] if auth.lower().startswith(b"bearer ") else (request.args.get(b"token") or [b""])[0]
            if not hmac.compare_digest(given, self.token):
                return _Refused(401, "a valid token is needed")
        return None

    def getChildWithDefault(self, path, request):
        return self.refused(request) or self.inner.getChildWithDefault(path, request)

    def render(self, request):
        return (self.refused(request) or self.inner).render(request)


class _Refused(resource.Resource):
    isLeaf = True

    def __init__(self, status: int, reason: str):
        super().__init__()
        self.status, self.reason = status, reason

    def render(self, request):
        if self.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="msgd"')
        return _json(request, self.status, {"error": self.reason})


# -- status ----------------------------------------------------------------------


def _quantile(deltas: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile from cumulative bucket counts [(le, count)], as
    Prometheus' histogram_quantile does (linear within a bucket)."""
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in deltas:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 0)
        prev_le, prev_n = le, n
    return prev_le


class StatusFeed:
    """Snapshots of one node (its ``services`` and ``control``), published on
    :data:`CHANNEL` of its own broker every ``interval`` while at least one
    status page is connected."""

    def __init__(self, services, control: Control | None, interval: float):
        self.services = services
        self.control = control
        self.interval = interval
        self.broker = Broker(services.reactor, history_size=0, gc_interval=0)
        self.watchers = 0
        self._loop: LoopingCall | None = None
        self._last: tuple | None = None      # (time, total, errors, buckets) of the last published snapshot

    def watcher_joined(self) -> None:
        self.watchers += 1
        if self._loop is None:
            self._loop = LoopingCall(self.publish)
            self._loop.clock = self.services.reactor
            self._loop.start(self.interval, now=True).addErrback(lambda f: log.failure("status feed stopped", f))

    def watcher_left(self) -> None:
        self.watchers -= 1
        if self.watchers <= 0 and self._loop is not None:
            self.watchers = 0
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def publish(self) -> None:
        self.broker.publish(CHANNEL, self.snapshot(advance=True))

    def _requests(self):
        total = errors = 0
        by_iface: dict = {}
        buckets: dict[float, float] = {}
        for metric in self.services.metrics.registry.collect():
            if metric.name == "msgd_requests":
                for s in metric.samples:
                    if s.name != "msgd_requests_total":
                        continue
                    bad = s.labels.get("outcome") != "ok"
                    total += s.value
                    errors += s.value if bad else 0
                    mine = by_iface.setdefault(s.labels.get("interface", ""), {"total": 0, "errors": 0})
                    mine["total"] += s.value
                    mine["errors"] += s.value if bad else 0
            elif metric.name == "msgd_request_duration_seconds":
                for s in metric.samples:
                    if s.name.endswith("_bucket"):
                        le = float(s.labels["le"])
                        buckets[le] = buckets.get(le, 0.0) + s.value
        return total, errors, by_iface, buckets

    def snapshot(self, advance: bool = False) -> dict:
        services, control = self.services, self.control
        now = services.reactor.seconds()
        total, errors, by_iface, buckets = self._requests()
        rate = error_rate = p50 = p95 = None
        if self._last is not None and now > self._last[0]:
            then, total0, errors0, buckets0 = self._last
            rate = (total - total0) / (now - then)
            error_rate = (errors - errors0) / (now - then)
            deltas = sorted((le, n - buckets0.get(le, 0.0)) for le, n in buckets.items())
            p50, p95 = _quantile(deltas, 0.5), _quantile(deltas, 0.95)
        if advance:
            self._last = (now, total, errors, buckets)
        health = services.health()
        logs = control.logs if control is not None else None
        return {
            "node": services.settings.name, "time": time.time(), "uptime": health["uptime"],
            "status": health["status"], "in_flight": services.dispatcher.in_flight,
            "interfaces": health["interfaces"], "adapters": health["adapters"],
            "modules": {n: {"version": m.version, "loaded_at": m.loaded_at,
                            "error": m.error.to_dict() if m.error is not None else None}
                        for n, m in services.apps.modules.items()},
            "load_errors": health["load_errors"],
            "requests": {"total": total, "errors": errors, "rate": rate, "error_rate": error_rate,
                         "p50": p50, "p95": p95},
            "by_interface": by_iface,
            "last_reload": control.last_reload if control is not None else None,
            "log_levels": logs.levels() if logs is not None else {},
        }


class StatusWebSocket(MsgdWebSocket):
    """A WebSocket that sees only the status feed: ``rpc.status`` and
    subscriptions to :data:`CHANNEL`."""

    def onOpen(self):
        super().onOpen()
        self.factory.feed.watcher_joined()
        self._watching = True

    def onClose(self, wasClean, code, reason):
        super().onClose(wasClean, code, reason)
        if getattr(self, "_watching", False):
            self._watching = False
            self.factory.feed.watcher_left()


class StatusRoot(Folder):
    def __init__(self, interface):
        super().__init__(WebFile("status.html"))
        feed = StatusFeed(interface.services, interface.control, interface.options.status_interval)
        # its own broker, the one channel, rpc.status, no app functions
        clients = Clients(interface, 10, 1, ("rpc.subscribe", "rpc.unsubscribe"), dispatcher=_NoApps(),
                          broker=feed.broker, authorize=_status_channel,
                          extra={"rpc.status": lambda connection, request, params: feed.snapshot()})
        factory = MsgdWebSocketFactory(interface, protocol=StatusWebSocket, clients=clients)
        factory.feed = feed
        self.putChild(b"ws", WebSocketResource(factory))


def _status_channel(request, action: str, channel: str) -> None:
    if channel != CHANNEL:
        raise errors.InvalidParams(f"only the channel {CHANNEL} is offered here")


class _NoApps:
    """The status WebSocket's dispatcher: it offers no app function."""

    def run(self, request, target, args=(), kwargs=None):
        raise errors.NotFound(f"method not found: {target} (the status socket offers rpc.status)")

    def call(self, request, target, args=(), kwargs=None):
        return defer.maybeDeferred(self.run, request, target, args, kwargs)


def make_status(interface) -> resource.Resource:
    return Guard(StatusRoot(interface), interface)


# -- admin -------------------------------------------------------------------------


class _JSONPost(resource.Resource):
    isLeaf = True

    def __init__(self, control: Control):
        super().__init__()
        self.control = control

    def body(self, request) -> dict | None:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return None
        raw = request.content.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


class ReloadResource(_JSONPost):
    def render_POST(self, request):
        if self.body(request) is None:
            return _json(request, 415, {"ok": False, "error": "POST a JSON object (content-type application/json)"})

        def done(changes):
            request.write(_json(request, 200, dict(ok=True, **changes)))
            request.finish()

        def failed(f):
            request.write(_json(request, 409, {"ok": False, "error": f.getErrorMessage()}))
            request.finish()
        self.control.reload().addCallbacks(done, failed)
        return NOT_DONE_YET


class LogLevelResource(_JSONPost):
    def render(self, request):
        if self.control.logs is None:
            return _json(request, 503, {"error": "log levels are managed by the process running the node"})
        return super().render(request)

    def render_GET(self, request):
        return _json(request, 200, {"levels": self.control.logs.levels()})

    def render_POST(self, request):
        logs = self.control.logs
        data = self.body(request)
        if data is None or not isinstance(data.get("namespace"), str) or not isinstance(data.get("level"), str):
            return _json(request, 400, {"error": 'POST {"namespace": "msgd.core.apps", "level": "debug"} '
                                                 "as application/json"})
        try:
            logs.set_level(data["namespace"], data["level"])
        except BadLevel as e:
            return _json(request, 400, {"error": str(e)})
        log.info("log level of {namespace} set to {new_level}", namespace=data["namespace"], new_level=data["level"])
        return _json(request, 200, {"levels": logs.levels()})


def make_admin(interface) -> resource.Resource:
    """``/admin`` on the node's controls (``interface.control``)."""
    control = interface.control
    if control is None:
        raise StartupError(f"[interface:{interface.name}] admin = yes needs a node to control")
    root = Folder()
    root.putChild(b"reload", ReloadResource(control))
    root.putChild(b"log-level", LogLevelResource(control))
    return Guard(root, interface)
