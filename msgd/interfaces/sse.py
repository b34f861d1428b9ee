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
    pattern adds ``-:0:PATTERN`` to the id, and the positions of the channels
    it matched (those its answer gave, those its events came from): it
    resumes every matched channel from there — one the id does not name from
    its first event — and says ``recovered: false`` unless all of them could
    be.  A client without ``EventSource`` can pass the id as
    ``?last_event_id=``.
``GET /sse?session=ID``
    The queue of a long-poll session (``/poll``): answers and events, sent as
    they come, instead of repeated GETs.  Calls go by ``POST /poll?session=ID``.

A comment line is sent every ``sse_ping`` seconds to keep proxies from
closing an idle stream.  A client that does not read gets at most
``poll_max_queue`` bytes queued, then what was not yet handed to the socket
is dropped, a last message says why (``{"jsonrpc":"2.0","method":
"rpc.closing","params":{"reason":"slow consumer: …"}}``, no ``id``: a
reconnecting ``EventSource`` resumes after the last event it got), and the
stream and its connection are ended — aborted when the client has not read
that within ``close_timeout`` (counted in
``msgd_poll_dropped_total{reason="slow_consumer"}``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.core import errors
from msgd.core.jsonrpc import dumps, error_response
from msgd.core.pubsub import check_channel, format_positions, is_pattern, parse_positions
from msgd.interfaces.base import discard_unsent
from msgd.interfaces.connection import closing
from msgd.interfaces.poll import _arg
from msgd.interfaces.responder import json_reply
from msgd.interfaces.writer import BoundedWriter, Producer
from msgd.options import boolean, duration, option


@dataclass(frozen=True, kw_only=True)
class SSEOptions:
    """``/sse``: Server-Sent Events (switch ``sse``; bounded by ``poll_max_queue``)"""

    sse: bool = option(True, parse=boolean, doc="serve Server-Sent Events (pub/sub, poll sessions) at /sse")
    sse_ping: float = option(15.0, parse=duration, doc="keep-alive comment interval of SSE streams")


class EventStream(Producer):
    """One open ``text/event-stream`` response, with bounded buffering while
    the client does not read (the request's producer; no ``transport`` of
    its own to stop reading)."""

    log = Logger()

    def __init__(self, request, registry, on_close=None):
        self.request = request
        self.registry = registry
        self.limit = registry.options.poll_max_queue
        self.on_close = on_close
        self.writer = BoundedWriter(request.write, self.limit, self._slow, lambda: discard_unsent(request.transport),
                                    registry.interface.turn)
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
        if not self.closed:
            self.writer.write(frame)

    def _slow(self, limit: int):
        self.log.warn("ending SSE stream: slow consumer (more than {limit} bytes unsent)", limit=limit)
        self.registry.dropped.labels(self.registry.interface.name, "slow_consumer").inc()
        # what was not handed to the socket is dropped (whole chunks): the reason is the next message read
        self.writer.last(b"data: " + closing(f"slow consumer: more than {limit} bytes unsent") + b"\n\n")
        transport = self.request.transport
        self.close()
        iface = self.registry.interface
        iface.close_within(transport, iface.options.close_timeout)

    def close(self):
        if not self.closed:
            self.writer.close()         # what this turn gave goes before the end of the response
            self.request.unregisterProducer()
            self.request.finish()

    def _finished(self, _):
        self.closed = True
        self.writer.close()
        if self.ping.running:
            self.ping.stop()
        if self.on_close is not None:
            self.on_close(self)


PATTERN_HELD = "-"     # the epoch of a pattern's own entry in an event id: the stream held it


class ChannelStream:
    """What ``/sse?channel=…`` delivers its connection's events to."""

    def __init__(self):
        self.stream: Any = None        # the EventStream, once the request is accepted
        self.positions: dict[str, tuple[str, int]] = {}

    def deliver(self, event):
        if event.epoch:      # not a pattern's gap nor a presence Notice (no position)
            held = self.positions.get(event.channel)
            if held is not None and held[0] == event.epoch and event.offset <= held[1]:
                return      # replayed again (for the channel and for a pattern): sent once
            self.positions[event.channel] = (event.epoch, event.offset)
        self.stream.send(event.notification(), self.event_id())

    def event_id(self) -> str:
        return format_positions(self.positions)

    def subscribed(self, info: dict):
        if info.get("pattern"):
            self.positions[info["channel"]] = (PATTERN_HELD, 0)
            self.positions.update((c, (e, info["offset"][c])) for c, e in info["epoch"].items())
        else:
            self.positions[info["channel"]] = (info["epoch"], info["offset"])
        self.stream.send(dumps({"jsonrpc": "2.0", "method": "rpc.subscribed", "params": info}), self.event_id())

    @staticmethod
    def resume(name: str, held: dict[str, tuple[str, int]]) -> tuple:
        """``(since, epoch)`` for subscribing to ``name`` again, from the
        positions of a ``Last-Event-ID``."""
        if not is_pattern(name):
            epoch, since = held.get(name, (None, None))
            return since, epoch
        if name not in held:
            return None, None       # the stream did not hold this pattern: a new subscription
        mine = {c: p for c, p in held.items() if not is_pattern(c) and fnmatch.fnmatchcase(c, name)}
        return {c: o for c, (e, o) in mine.items()}, {c: e for c, (e, o) in mine.items()}


class SSEResource(resource.Resource):
    isLeaf = True
    session_ids = True     # the guard lets ?session=ID through: the id speaks for the session

    def __init__(self, interface):
        super().__init__()
        self.interface = interface
        self.registry = interface.shared.poll_sessions

    def render_GET(self, request):
        if _arg(request, b"session") is not None:
            session, refusal = self.registry.find(request)
            if session is None:
                return refusal
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
            sub = ChannelStream()
            # a connection of the interface's JSON-RPC clients (principal: set by the guard) that only subscribes
            connection = self.registry.clients.connect(sub.deliver, getattr(request, "principal", None))
            pubsub, check = connection.session, connection.new_request()
            for n in names:
                pubsub.check(check, "subscribe", check_channel(n, pattern_ok=True))
        except errors.Unauthorized as e:
            return json_reply(request, 403, error_response(e))
        except errors.MsgdError as e:
            return json_reply(request, 400, error_response(e))
        last = request.getHeader(b"last-event-id") or _arg(request, b"last_event_id")
        if isinstance(last, bytes):
            last = last.decode("utf-8", "replace")
        resume = parse_positions(last)
        sub.stream = EventStream(request, self.registry, on_close=lambda s: connection.close())
        sub.positions.update((c, p) for c, p in resume.items() if c in names and not is_pattern(c))
        for name in dict.fromkeys(names):
            pubsub.subscribe(name, *sub.resume(name, resume)).addCallback(sub.subscribed)
        return NOT_DONE_YET
