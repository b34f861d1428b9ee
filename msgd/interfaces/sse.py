"""Server-Sent Events at ``/sse``: pub/sub (and long-poll sessions) for
browsers through ``EventSource``.  Every ``data:`` line is one JSON-RPC
message, the same as a ``/ws`` text message.

Wire protocol
-------------

``GET /sse?channel=C&channel=D``  (or ``?channels=C,D``)
    Subscribes to the channels (patterns allowed) and streams their events::

        id: E1:7:chat.lobby E2:3:news
        data: {"jsonrpc":"2.0","method":"rpc.event","params":{"channel":"chat.lobby","offset":7,…}}

    First comes, per channel, the subscribe answer as a notification
    ``{"jsonrpc":"2.0","method":"rpc.subscribed","params":{"channel","epoch","offset","recovered"}}``
    (after the events it replays, as on ``/ws``).  Each event's ``id`` holds
    the position (``epoch:offset:channel``) of every channel seen so far, so
    when the stream is cut, ``EventSource`` reconnects with that id in
    ``Last-Event-ID`` and each channel resumes exactly where it stopped (or is
    told ``recovered: false`` when history no longer covers the gap).  A
    client without ``EventSource`` can pass the id as ``?last_event_id=``.
``GET /sse?session=ID``
    The queue of a long-poll session (``/poll``): answers and events, sent as
    they come, instead of repeated GETs.  Calls go by ``POST /poll?session=ID``.

A comment line is sent every ``sse_ping`` seconds to keep proxies from
closing an idle stream.  A client that does not read gets at most
``poll_max_queue`` bytes queued, then its stream is ended (counted in
``msgd_poll_dropped_total{reason="slow_consumer"}``).
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.core.pubsub import Session, check_channel, is_pattern
from msgd.interfaces.poll import _arg, _reply, sessions


@implementer(IPushProducer)
class EventStream:
    """One open ``text/event-stream`` response, with bounded buffering while
    the client does not read."""

    log = Logger()

    def __init__(self, request, registry, on_close=None):
        self.request = request
        self.registry = registry
        self.limit = registry.options.poll_max_queue
        self.on_close = on_close
        self.paused = False
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0
        self.closed = False
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")      # nginx: do not buffer the stream
        request.registerProducer(self, True)
        request.write(b"retry: 1000\n\n")
        self.ping = LoopingCall(self.write, b": ping\n\n")
        self.ping.clock = registry.clock
        self.ping.start(registry.options.sse_ping, now=False)
        request.notifyFinish().addBoth(self._finished)

    def send(self, message: bytes, event_id: str | None = None):
        head = b"id: %s\n" % event_id.encode() if event_id is not None else b""
        self.write(head + b"data: " + message + b"\n\n")

    def write(self, frame: bytes):
        if self.closed:
            return
        if not self.paused:
            self.request.write(frame)
            return
        self.backlog.append(frame)
        self.backlog_bytes += len(frame)
        if self.backlog_bytes > self.limit:
            self.log.warn("ending SSE stream: slow consumer (more than {limit} bytes unsent)", limit=self.limit)
            self.registry.dropped.labels(self.registry.interface.name, "slow_consumer").inc()
            self.backlog, self.backlog_bytes = [], 0
            self.close()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        if self.backlog and not self.closed:
            data, self.backlog, self.backlog_bytes = b"".join(self.backlog), [], 0
            self.request.write(data)

    def stopProducing(self):
        self.backlog, self.backlog_bytes = [], 0

    def close(self):
        if not self.closed:
            self.request.unregisterProducer()
            self.request.finish()

    def _finished(self, _):
        self.closed = True
        if self.ping.running:
            self.ping.stop()
        if self.on_close is not None:
            self.on_close(self)


def parse_last_event_id(text: str | None) -> dict[str, tuple[str, int]]:
    """``"E:7:chat.lobby E2:3:news"`` → ``{"chat.lobby": ("E", 7), …}``;
    malformed parts are ignored (the channel then starts afresh)."""
    out = {}
    for part in (text or "").split():
        epoch, _, rest = part.partition(":")
        offset, _, channel = rest.partition(":")
        if epoch and offset.isdigit() and channel:
            out[channel] = (epoch, int(offset))
    return out


class ChannelStream:
    """The subscriber behind ``/sse?channel=…``."""

    def __init__(self, stream: EventStream, principal):
        self.stream = stream
        self.principal = principal
        self.positions: dict[str, tuple[str, int]] = {}

    def deliver(self, event):
        if event.epoch:      # not a pattern's gap nor a presence Notice (no position)
            self.positions[event.channel] = (event.epoch, event.offset)
        self.stream.send(event.notification(), self.event_id())

    def event_id(self) -> str:
        return " ".join(f"{e}:{o}:{c}" for c, (e, o) in self.positions.items())

    def subscribed(self, info: dict):
        if "epoch" in info:
            self.positions[info["channel"]] = (info["epoch"], info["offset"])
        self.stream.send(dumps({"jsonrpc": "2.0", "method": "rpc.subscribed", "params": info}),
                         self.event_id() if self.positions else None)


class SSEResource(resource.Resource):
    isLeaf = True
    session_ids = True     # the guard lets ?session=ID through: the id speaks for the session

    def __init__(self, interface):
        super().__init__()
        self.interface = interface
        self.registry = sessions(interface)

    def render_GET(self, request):
        sid = _arg(request, b"session")
        if sid is not None:
            session = self.registry.get(sid)
            if session is None:
                return _reply(request, 404, {"error": errors.Unavailable(
                    "no such long-poll session (expired?): open a new one").to_dict()})
            session.attach(EventStream(request, self.registry, on_close=session.detach))
            return NOT_DONE_YET
        names = [v.decode("utf-8", "replace") for v in request.args.get(b"channel", [])]
        for v in request.args.get(b"channels", []):
            names.extend(n for n in v.decode("utf-8", "replace").split(",") if n)
        limit = self.interface.options.ws_max_subscriptions
        try:
            if not names:
                raise errors.InvalidParams("give channel=NAME (repeatable) or channels=A,B, or session=ID")
            if len(set(names)) > limit:
                raise errors.TooLarge(f"at most {limit} channels per stream")
            principal = getattr(request, "principal", None)     # set by the interface's guard
            check = self.interface.node.new_request(self.interface.name, principal=principal)
            for n in names:
                self.interface.node.access.authorize_channel(check, "subscribe", check_channel(n, pattern_ok=True))
        except errors.Unauthorized as e:
            return _reply(request, 403, error_response(e))
        except errors.MsgdError as e:
            return _reply(request, 400, error_response(e))
        last = request.getHeader(b"last-event-id") or _arg(request, b"last_event_id")
        if isinstance(last, bytes):
            last = last.decode("utf-8", "replace")
        resume = parse_last_event_id(last)
        sub = ChannelStream(None, principal)
        pubsub = Session(self.interface.node.pubsub, sub, max_subscriptions=limit)
        sub.stream = EventStream(request, self.registry, on_close=lambda s: pubsub.close())
        sub.positions.update((c, p) for c, p in resume.items() if c in names)
        for name in dict.fromkeys(names):
            since, epoch = (None, None)
            if not is_pattern(name) and name in resume:
                epoch, since = resume[name]
            pubsub.subscribe(name, since, epoch).addCallback(sub.subscribed)
        return NOT_DONE_YET
