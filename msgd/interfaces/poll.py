"""HTTP long-poll at ``/poll``: JSON-RPC and pub/sub for clients that cannot
hold a WebSocket.  The messages are exactly those of ``/ws``; only the way
they travel differs.

Wire protocol
-------------

``POST /poll``  (no ``session``)
    Opens a session: ``201 {"session": ID, "wait": SECONDS, "idle": SECONDS}``.
    The id is a secret: whoever has it speaks for the session, with the
    principal it was opened by (``Authorization``, or the ``msgd_token``
    cookie from an allowed ``Origin``: see ``msgd.security.http.Protected``);
    requests naming a session bring no credentials.
``POST /poll?session=ID``  body: one JSON-RPC message (call, notification, batch)
    ``202 {"queued": true}``.  The answer is *queued* in the session like the
    events, so a ``rpc.subscribe`` answer always comes after the events it
    replays, as on ``/ws``.
``GET /poll?session=ID&wait=SECONDS``
    ``200 [MESSAGE, …]``: everything queued, at once if anything is, else as
    soon as something arrives, else ``[]`` after ``wait`` seconds (at most
    ``poll_wait``).  A newer GET answers a waiting older one with ``[]``.
``GET /sse?session=ID``
    The same queue as a Server-Sent Events stream (see ``msgd.interfaces.sse``).
``DELETE /poll?session=ID``
    Ends the session and its subscriptions.

An unknown or expired session is ``404 {"error": {"code": -32003, …}}``: open
a new one and subscribe again with ``since``/``epoch`` to resume.

A session lives on the node that opened it.  Behind a load balancer every
request of a session must reach that node: requests may carry an
``affinity=KEY`` query parameter that the node ignores and the balancer
hashes (msgd.js sends the same random key with each ``/poll`` and
``/sse?session=`` request of a client; see docs/cluster.rst).

Bounds: a session nobody polls for ``poll_idle`` seconds expires; its queue
holds at most ``poll_max_queue`` bytes, past which the session is ended (a
slow consumer, counted in ``msgd_poll_dropped_total``: its next request —
or the GET waiting — is answered ``410`` with the reason, ``"session ended:
slow consumer: …"``, for ``poll_idle`` seconds, then 404); at most
``poll_max_sessions`` sessions exist at once (503 past that).
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.core import errors
from msgd.core.jsonrpc import error_response, kept
from msgd.interfaces.connection import Clients
from msgd.interfaces.responder import json_reply
from msgd.options import boolean, duration, integer, option, size


@dataclass(frozen=True, kw_only=True)
class PollOptions:
    """``/poll``: long-poll (switch ``poll``; its sessions also stream at ``/sse?session=``)"""

    poll: bool = option(True, parse=boolean, doc="serve JSON-RPC and pub/sub by HTTP long-poll at /poll")
    poll_wait: float = option(25.0, parse=duration, doc="longest a GET /poll waits for messages")
    poll_idle: float = option(60.0, parse=duration, doc="a long-poll session nobody polls this long expires")
    poll_max_queue: int = option(1024 * 1024, parse=size,
                                 doc="bytes queued per long-poll session or SSE stream; past it it is ended")
    poll_max_sessions: int = option(10000, parse=integer(1), doc="most long-poll sessions at once")


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


def _arg(request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


ENDED_KEPT = 10000     # sessions whose end reason is kept for their client's next request


class PollSession:
    """One client's queue of outgoing messages, its subscriptions, and the
    GET (or SSE stream) currently waiting for them."""

    def __init__(self, registry: "Sessions", sid: str, principal):
        self.registry = registry
        self.id = sid
        self.connection = registry.clients.connect(self.deliver, principal)
        self.queue: deque[bytes] = deque()
        self.queued = 0          # bytes
        self.waiter: tuple | None = None       # (request, timer) of the GET waiting
        self.stream = None       # an attached sse.EventStream
        self.last_seen = registry.clock.seconds()
        self._flush = None
        self.closed: str | None = None

    # -- outgoing --------------------------------------------------------------

    def deliver(self, event):
        self.push(event.notification())

    def push(self, message: bytes):
        if self.closed:
            return
        if self.stream is not None:
            self.stream.send(message)
            return
        self.queue.append(message)
        self.queued += len(message)
        limit = self.registry.options.poll_max_queue
        if self.queued > limit:
            self.registry.close(self, f"slow consumer: more than {limit} bytes queued", "slow_consumer")
        elif self.waiter is not None and self._flush is None:
            # answer on the next turn, so a burst (a replay, a batch) goes in one response
            self._flush = self.registry.clock.callLater(0, self._answer_waiter)

    def take(self) -> bytes:
        data = b"[" + b",".join(self.queue) + b"]"
        self.queue.clear()
        self.queued = 0
        return data

    # -- waiting GETs ----------------------------------------------------------

    def wait(self, request, seconds: float):
        self._answer_waiter()          # only one waiter: an older GET gets what there is (often [])
        self.last_seen = self.registry.clock.seconds()
        if self.queue or seconds <= 0:
            return json_reply(request, 200, self.take())
        timer = self.registry.clock.callLater(seconds, self._answer_waiter)
        self.waiter = (request, timer)
        request.notifyFinish().addErrback(lambda f: self._gone(request))
        return NOT_DONE_YET

    def _take_waiter(self):
        """The GET waiting, no longer waiting (None when there is none)."""
        _cancel(self._flush)
        self._flush = None
        if self.waiter is None:
            return None
        (request, timer), self.waiter = self.waiter, None
        _cancel(timer)
        self.last_seen = self.registry.clock.seconds()
        return request

    def _answer_waiter(self):
        request = self._take_waiter()
        if request is not None:
            request.write(json_reply(request, 200, self.take()))
            request.finish()

    def _gone(self, request):
        if self.waiter is not None and self.waiter[0] is request:
            self._take_waiter()

    # -- SSE ---------------------------------------------------------------------

    def attach(self, stream):
        """Send the queue, then everything new, to an SSE stream (replacing
        any stream attached before)."""
        if self.stream is not None:
            self.stream.close()
        self._answer_waiter()
        self.stream = stream
        for message in self.queue:
            stream.send(message)
        self.queue.clear()
        self.queued = 0

    def detach(self, stream):
        if self.stream is stream:
            self.stream = None
            self.last_seen = self.registry.clock.seconds()

    def idle(self, now: float) -> bool:
        return self.waiter is None and self.stream is None and now - self.last_seen > self.registry.options.poll_idle

    def end(self, reason: str):
        self.closed = reason
        self.connection.close()
        request = self._take_waiter()
        if request is not None:
            request.write(_ended(request, reason))
            request.finish()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.queue.clear()


class Sessions:
    """The long-poll sessions of one HTTP interface.  The expiry check runs
    only while sessions exist, so an idle node has no timer."""

    log = Logger()

    def __init__(self, interface):
        self.interface = interface
        self.options = interface.options
        self.clock = interface.services.reactor
        self.sessions: dict[str, PollSession] = {}
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()   # id -> why the node ended it, when
        self.clients = Clients(interface, self.options.max_batch, self.options.ws_max_subscriptions)
        self._expiry: LoopingCall | None = None
        m = interface.services.metrics
        self.gauge = m.gauge("msgd_poll_sessions", "Open long-poll sessions", ["interface"]).labels(interface.name)
        self.dropped = m.counter("msgd_poll_dropped_total", "Long-poll sessions ended by the node",
                                 ["interface", "reason"])

    def open(self, principal) -> PollSession:
        if len(self.sessions) >= self.options.poll_max_sessions:
            raise errors.Overloaded(f"too many long-poll sessions ({len(self.sessions)})")
        session = PollSession(self, os.urandom(16).hex(), principal)
        self.sessions[session.id] = session
        self.gauge.inc()
        if self._expiry is None:
            self._expiry = LoopingCall(self.expire)
            self._expiry.clock = self.clock
            self._expiry.start(max(0.05, self.options.poll_idle / 4), now=False)
        return session

    def get(self, sid: str | None) -> PollSession | None:
        return self.sessions.get(sid) if sid else None

    def close(self, session: PollSession, reason: str, metric: str | None = None):
        if self.sessions.pop(session.id, None) is None:
            return
        self.gauge.dec()
        if metric:
            self.dropped.labels(self.interface.name, metric).inc()
            self.log.info("long-poll session ended: {reason}", reason=reason)
        if metric == "slow_consumer":
            self._remember(session.id, reason)      # its client has not come for it: tell it why when it does
        session.end(reason)
        if not self.sessions and self._expiry is not None:
            if self._expiry.running:
                self._expiry.stop()
            self._expiry = None

    def _remember(self, sid: str, reason: str):
        """Keep why the node ended a session, for its client's next request
        (at most ``poll_idle`` seconds, and a bounded number of them)."""
        now = self.clock.seconds()
        self.ended[sid] = (reason, now)
        while self.ended and (len(self.ended) > ENDED_KEPT
                              or next(iter(self.ended.values()))[1] < now - self.options.poll_idle):
            self.ended.popitem(last=False)

    def gone(self, request, sid: str | None) -> bytes:
        """The answer about a session that is not there: 410 with the reason
        when the node ended it lately, else 404."""
        reason, when = self.ended.get(sid, (None, 0.0)) if sid else (None, 0.0)
        if reason is not None and when >= self.clock.seconds() - self.options.poll_idle:
            return _ended(request, reason)
        return json_reply(request, 404, {"error": errors.Unavailable(
            "no such long-poll session (expired?): open a new one").to_dict()})

    def find(self, request) -> tuple[PollSession | None, bytes | None]:
        """``(session, None)`` for the ``?session=ID`` of ``request``, else
        ``(None, the answer about it)`` (see :meth:`gone`)."""
        sid = _arg(request, b"session")
        session = self.get(sid)
        return (session, None) if session is not None else (None, self.gone(request, sid))

    def close_all(self, reason: str = "interface stopped"):
        for s in list(self.sessions.values()):
            self.close(s, reason)

    def expire(self):
        if not self.interface.running:
            return self.close_all()
        now = self.clock.seconds()
        for s in [s for s in self.sessions.values() if s.idle(now)]:
            self.close(s, "idle", "idle")

def _ended(request, reason: str) -> bytes:
    return json_reply(request, 410, {"error": errors.Unavailable(f"session ended: {reason}").to_dict()})


class PollResource(resource.Resource):
    """``/poll``: on the interface's :class:`Sessions` (``interface.shared.poll_sessions``,
    shared with ``/sse?session=``)."""

    isLeaf = True
    session_ids = True     # the guard lets ?session=ID through: the id speaks for the session

    def __init__(self, interface):
        super().__init__()
        self.registry = interface.shared.poll_sessions

    def render_POST(self, request):
        if _arg(request, b"session") is None:
            try:
                session = self.registry.open(getattr(request, "principal", None))
            except errors.Overloaded as e:
                return json_reply(request, 503, {"error": e.to_dict()})
            o = self.registry.options
            return json_reply(request, 201, {"session": session.id, "wait": o.poll_wait, "idle": o.poll_idle})
        session, refusal = self.registry.find(request)
        if session is None:
            return refusal
        session.last_seen = self.registry.clock.seconds()
        session.connection.answer(request.content.read(), lambda data: session.push(kept(data)))   # queued: right-sized
        return json_reply(request, 202, {"queued": True})

    def render_GET(self, request):
        session, refusal = self.registry.find(request)
        if session is None:
            return refusal
        limit = self.registry.options.poll_wait
        try:
            wait = min(limit, max(0.0, float(_arg(request, b"wait") or limit)))
        except ValueError:
            return json_reply(request, 400, error_response(errors.InvalidParams("wait must be a number of seconds")))
        return session.wait(request, wait)

    def render_DELETE(self, request):
        session, refusal = self.registry.find(request)
        if session is None:
            return refusal
        self.registry.close(session, "closed by the client")
        return json_reply(request, 200, {"closed": True})
