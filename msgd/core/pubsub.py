"""The pub/sub broker, transport-free.

Channels are created on first use.  Every event gets a per-channel
``offset`` (1, 2, 3, … — monotonic) and every channel has an ``epoch``: a
random token that changes whenever the channel's history may have been lost
(the channel was dropped while idle, the node restarted with the memory
backend).  A subscriber that saw offset N of epoch E can resume with
``since=N, epoch=E``: when the kept history still covers N+1 onwards it
receives exactly the missed events (``recovered: true``), otherwise it is told
``recovered: false`` and should reload its state.

History is bounded per channel by count and age (``[pubsub] history_size``,
``history_age``, overridable per pattern by ``[channel:PATTERN]`` sections).

Subscriptions are to a channel (``chat.lobby``) or a pattern with shell-style
wildcards (``news.*``).  Resuming (``since``) applies to channel subscriptions.

A *subscriber* is any object with ``deliver(event)`` and a ``principal``
attribute (for presence).  ``deliver`` is called in the reactor thread and
must not block: transports queue the event's pre-encoded bytes
(:meth:`Event.notification`, serialized once per event however many
subscribers there are).

Ordering: replayed events are delivered before the ``subscribe`` Deferred
fires, and live events never interleave with a replay.

Gaps: when a subscriber still connected may have missed events (a shared
backend came back without the history to replay them, or this node had to
go on alone), it is handed a *gap* event (``Event.gap``) at that point
instead of silence: ``rpc.gap`` on the wire, with the position the channel
continues from (see docs/websocket.rst).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.core import errors
from msgd.core.jsonrpc import dumps, param

MAX_CHANNEL = 200
_CHANNEL = re.compile(r"^[^\s*?\[\]]+$")
_PATTERN = re.compile(r"^[^\s]+$")


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def check_channel(name: Any, pattern_ok: bool = False) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_CHANNEL:
        raise errors.InvalidParams(f"channel must be a non-empty string of at most {MAX_CHANNEL} characters")
    if not (_PATTERN if pattern_ok else _CHANNEL).match(name):
        raise errors.InvalidParams(f"invalid channel name {name!r}" +
                                   ("" if pattern_ok else " (wildcards are only for subscribing)"))
    return name


def new_epoch() -> str:
    return os.urandom(6).hex()


@dataclass(eq=False, slots=True)
class Event:
    channel: str
    offset: int
    epoch: str
    data: Any
    time: float
    gap: bool = False      # not an event: events before this point may be missing (data "local":
                           # and events published elsewhere will be, until the next gap)
    cache: dict = field(default_factory=dict)   # per-transport pre-encoded forms

    def params(self) -> dict:
        if self.gap:
            if not self.epoch:      # for a pattern: any channel it matches
                return {"channel": self.channel, "pattern": True}
            if self.data == "local":    # this node goes on alone
                return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch, "local": True}
            return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch}
        return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch, "data": self.data}

    def notification(self) -> bytes:
        """The JSON-RPC ``rpc.event`` (or ``rpc.gap``) notification, encoded once."""
        b = self.cache.get("json")
        if b is None:
            method = "rpc.gap" if self.gap else "rpc.event"
            b = self.cache["json"] = dumps({"jsonrpc": "2.0", "method": method, "params": self.params()})
        return b

    def data_json(self) -> bytes:
        """Just the data, encoded once (STOMP bodies, SSE)."""
        b = self.cache.get("data")
        if b is None:
            b = self.cache["data"] = dumps(self.data)
        return b


class Channel:
    __slots__ = ("name", "epoch", "offset", "history", "subscribers", "max_size", "max_age", "last_used",
                 "shared_at")

    def __init__(self, name: str, max_size: int, max_age: float, now: float):
        self.name = name
        self.epoch = new_epoch()
        self.offset = 0
        self.history: deque[Event] = deque(maxlen=max_size)
        self.subscribers: set = set()
        self.max_size = max_size
        self.max_age = max_age
        self.last_used = now
        # with a shared backend: None while epoch and offset are the shared ones, else the
        # last shared (epoch, offset) before this node went on alone (("", 0): never shared)
        self.shared_at: tuple[str, int] | None = None

    def trim(self, now: float) -> None:
        h = self.history
        limit = now - self.max_age
        while h and h[0].time < limit:
            h.popleft()

    def covers(self, since: int) -> bool:
        """Can every event after ``since`` be replayed?"""
        if since >= self.offset:
            return since == self.offset
        if since < 0:
            return False
        return bool(self.history) and self.history[0].offset <= since + 1


class Broker:
    """One node's pub/sub.  ``overrides`` is ``[(pattern, size|None, age|None)]``
    for per-channel history; the first matching pattern wins."""

    log = Logger()

    def __init__(self, clock, history_size: int = 1000, history_age: float = 3600.0,
                 overrides: Iterable[tuple[str, int | None, float | None]] = (), metrics=None,
                 gc_interval: float = 60.0):
        self.clock = clock
        self.history_size = history_size
        self.history_age = history_age
        self.overrides = list(overrides)
        self.channels: dict[str, Channel] = {}
        self.patterns: dict[str, set] = {}
        self._matches: dict[str, list[str]] = {}   # channel -> patterns matching it (cache)
        self.gc_interval = gc_interval
        self._gc: LoopingCall | None = None
        self.listeners: list[Callable[[Event], None]] = []   # e.g. a cluster bridge
        self.backend = None    # shares channels between nodes when set (msgd.cluster.redis_pubsub)
        self._waiting: dict[str, set] = {}     # subscribers waiting for the backend to join a channel
        self._m = None
        if metrics is not None:
            self._m = (metrics.counter("msgd_pubsub_published_total", "Events published"),
                       metrics.counter("msgd_pubsub_deliveries_total", "Events handed to subscribers"),
                       metrics.gauge("msgd_pubsub_channels", "Channels in memory"),
                       metrics.gauge("msgd_pubsub_subscriptions", "Subscriptions (channels and patterns)"))
            self._m[2].set_function(lambda: len(self.channels))
            self._m[3].set_function(lambda: sum(len(c.subscribers) for c in self.channels.values())
                                    + sum(len(s) for s in self.patterns.values()))

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.gc_interval:
            self._gc = LoopingCall(self.collect)
            self._gc.clock = self.clock
            self._gc.start(self.gc_interval, now=False)

    def stop(self) -> None:
        if self._gc is not None and self._gc.running:
            self._gc.stop()

    def collect(self) -> int:
        """Drop channels with no subscribers and no history left; returns how
        many.  (Their epoch is gone with them: a later resume is told
        ``recovered: false``.)"""
        now = self.clock.seconds()
        dead = []
        for name, ch in self.channels.items():
            ch.trim(now)
            if not ch.subscribers and not ch.history and now - ch.last_used > self.gc_interval:
                dead.append(name)
        for name in dead:
            del self.channels[name]
            self._matches.pop(name, None)
        return len(dead)

    # -- channels ---------------------------------------------------------------

    def _limits(self, name: str) -> tuple[int, float]:
        for pattern, size, age in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return (self.history_size if size is None else size, self.history_age if age is None else age)
        return self.history_size, self.history_age

    def channel(self, name: str) -> Channel:
        ch = self.channels.get(name)
        if ch is None:
            size, age = self._limits(name)
            ch = self.channels[name] = Channel(name, size, age, self.clock.seconds())
            if self.backend is not None:
                ch.shared_at = ("", 0)      # made here: resync() tells its subscribers what they lost
        return ch

    def _patterns_for(self, name: str) -> list[str]:
        m = self._matches.get(name)
        if m is None:
            if len(self._matches) > 10000:      # channels seen only through patterns: keep it bounded
                self._matches.clear()
            m = self._matches[name] = [p for p in self.patterns if fnmatch.fnmatchcase(name, p)]
        return m

    # -- subscribing ----------------------------------------------------------------

    def subscribe(self, name: str, subscriber, since: int | None = None, epoch: str | None = None) -> defer.Deferred:
        """Subscribe; fires with ``{"channel", "epoch", "offset", "recovered"}``
        (epoch/offset only for channels).  Missed events since ``since`` are
        delivered first when history covers them."""
        if is_pattern(name):
            check_channel(name, pattern_ok=True)
            answer = {"channel": name, "pattern": True, "recovered": since is None}
            watching = None
            if name not in self.patterns:
                self.patterns[name] = set()
                self._matches.clear()
                if self.backend is not None:
                    watching = self.backend.watch(name)
            self.patterns[name].add(subscriber)
            return watching.addCallback(lambda _: answer) if watching is not None else defer.succeed(answer)
        check_channel(name)
        if self.backend is not None:
            # the backend delivers the channel's events here from now on; when it must first
            # learn the shared epoch, offset and history, the subscriber waits for that
            joining = self.backend.follow(name)
            if joining is not None:
                waiting = self._waiting.setdefault(name, set())
                waiting.add(subscriber)
                return joining.addCallback(lambda _: self._joined(name, subscriber, since, epoch))
        return defer.succeed(self._subscribe(name, subscriber, since, epoch))

    def _joined(self, name: str, subscriber, since, epoch) -> dict:
        waiting = self._waiting.get(name)
        if waiting is None or subscriber not in waiting:
            # unsubscribed (its connection closed) while waiting
            return {"channel": name, "epoch": None, "offset": 0, "recovered": False}
        waiting.discard(subscriber)
        if not waiting:
            del self._waiting[name]
        return self._subscribe(name, subscriber, since, epoch)

    def _subscribe(self, name: str, subscriber, since, epoch) -> dict:
        ch = self.channel(name)
        ch.last_used = self.clock.seconds()
        recovered = since is None
        if since is not None:
            ch.trim(self.clock.seconds())
            if (epoch is None or epoch == ch.epoch) and ch.covers(since):
                recovered = True
                for ev in list(ch.history):
                    if ev.offset > since:
                        subscriber.deliver(ev)
        ch.subscribers.add(subscriber)
        return {"channel": name, "epoch": ch.epoch, "offset": ch.offset, "recovered": recovered}

    def unsubscribe(self, name: str, subscriber) -> bool:
        if is_pattern(name):
            subs = self.patterns.get(name)
            if not subs or subscriber not in subs:
                return False
            subs.discard(subscriber)
            if not subs:
                del self.patterns[name]
                self._matches.clear()
                if self.backend is not None:
                    self.backend.unwatch(name)
            return True
        waiting = self._waiting.get(name)
        if waiting is not None and subscriber in waiting:
            waiting.discard(subscriber)
            if not waiting:
                del self._waiting[name]
            self.forget(name)
            return True
        ch = self.channels.get(name)
        if ch is None or subscriber not in ch.subscribers:
            return False
        ch.subscribers.discard(subscriber)
        ch.last_used = self.clock.seconds()
        self.forget(name)
        return True

    def forget(self, name: str) -> None:
        """With a shared backend, a channel without local subscribers is not
        followed and leaves no state here (Redis holds its history)."""
        if self.backend is None or name in self._waiting:
            return
        ch = self.channels.get(name)
        if ch is not None and ch.subscribers:
            return
        self.channels.pop(name, None)
        self._matches.pop(name, None)
        self.backend.unfollow(name)

    def unsubscribe_all(self, subscriber, names: Iterable[str]) -> None:
        for name in list(names):
            self.unsubscribe(name, subscriber)

    # -- publishing --------------------------------------------------------------------

    def publish(self, name: str, data: Any, principal=None) -> defer.Deferred:
        """Publish ``data``; fires with the event's offset."""
        check_channel(name)
        try:
            dumps(data)
        except (TypeError, ValueError) as e:
            raise errors.InvalidParams(f"data is not JSON serializable: {e}") from None
        if self.backend is not None and self.backend.available(name):
            # offset from the shared channel; delivered here when it comes back through receive()
            return self.backend.publish(name, data).addErrback(self._publish_alone, name, data)
        return self._publish_alone(None, name, data)

    def _publish_alone(self, failure, name: str, data: Any) -> defer.Deferred:
        """Publish on this node only (memory backend, or the shared one is away)."""
        if failure is not None:
            self.log.warn("shared publish on {channel} failed ({error}); delivering on this node only",
                          channel=name, error=failure.getErrorMessage())
        ch = self.channel(name)
        now = self.clock.seconds()
        if self.backend is not None:
            if ch.shared_at is None:
                # leave the shared stream: a local epoch, announced first — events published
                # elsewhere no longer reach these subscribers
                ch.shared_at = (ch.epoch, ch.offset)
                ch.history.clear()
                self._gap(ch, new_epoch(), ch.offset, now, "local")
            self.backend.forked(name)
        ch.offset += 1
        ev = Event(name, ch.offset, ch.epoch, data, now)
        if ch.max_size:
            ch.history.append(ev)
            ch.trim(now)
        ch.last_used = now
        self.deliver(ev, ch)
        for listener in self.listeners:
            listener(ev)
        return defer.succeed(ev.offset)

    # -- shared channels (a backend calls these) ------------------------------------

    def receive(self, ev: Event, force: bool = False) -> bool:
        """An event of a shared channel.  A channel not followed here (no
        channel subscribers) goes to pattern subscribers and leaves no state.
        Returns False, doing nothing, when ``ev`` does not follow the channel's
        last event (the backend then reads the channel again: see
        :meth:`resync`); with ``force`` the subscribers are told of the gap and
        get ``ev``.  An event already delivered is dropped."""
        ch = self.channels.get(ev.channel)
        if ch is None:
            if self.patterns:
                self.deliver(ev, None)
            return True
        if ev.epoch == ch.epoch and ch.shared_at is None:
            if ev.offset <= ch.offset:
                return True
            if ev.offset != ch.offset + 1 and not force:
                return False
        elif not force:
            return False
        now = self.clock.seconds()
        if ev.epoch != ch.epoch or ev.offset != ch.offset + 1 or ch.shared_at is not None:
            ch.history.clear()
            ch.shared_at = None
            self._gap(ch, ev.epoch, ev.offset - 1, now)
        ch.offset = ev.offset
        if ch.max_size:
            ch.history.append(ev)
            ch.trim(now)
        ch.last_used = now
        self.deliver(ev, ch)
        return True

    def resync(self, name: str, epoch: str, offset: int, events: list[Event]) -> Channel:
        """Take a channel's shared state (``events``: its history, in order).
        Subscribers still connected get the events they missed since the last
        shared position this node had when the history covers it, else a gap
        event and then the history there is; a new channel simply starts
        there.  A channel that went on alone here (:meth:`_publish_alone`)
        always gets a gap event first: it leaves its local epoch."""
        now = self.clock.seconds()
        ch = self.channels.get(name)
        if ch is None:
            ch = self.channel(name)
            ch.shared_at = None
            ch.epoch, ch.offset = epoch, offset
            ch.history.extend(e for e in events if e.offset <= offset)
            ch.trim(now)
            return ch
        base_epoch, base = ch.shared_at or (ch.epoch, ch.offset)
        branched = ch.shared_at is not None
        missed = [e for e in events if base < e.offset <= offset]
        covered = base_epoch == epoch and base <= offset and (
            base == offset or (missed and missed[0].offset == base + 1 and missed[-1].offset == offset))
        ch.shared_at = None
        ch.history.clear()
        if covered:
            ch.epoch, ch.offset = epoch, base
            ch.history.extend(e for e in events if e.offset <= base)
            if branched:
                self._gap(ch, epoch, base, now)
        else:
            missed = [e for e in events if e.offset <= offset]
            self._gap(ch, epoch, missed[0].offset - 1 if missed else offset, now)
        for e in missed:
            ch.offset = e.offset
            ch.history.append(e)
            self.deliver(e, ch)
        ch.trim(now)
        ch.last_used = now
        return ch

    def _gap(self, ch: Channel, epoch: str, offset: int, now: float, why=None) -> None:
        """The channel goes on at ``epoch``/``offset`` after events its
        subscribers may have missed: tell them."""
        ch.epoch, ch.offset = epoch, offset
        self.deliver(Event(ch.name, offset, epoch, why, now, gap=True), ch)

    def pattern_gap(self) -> None:
        """Pattern subscribers may have missed events of any channel (a shared
        backend was away): tell them, once per pattern."""
        now = self.clock.seconds()
        for pattern, subs in list(self.patterns.items()):
            ev = Event(pattern, 0, "", None, now, gap=True)
            for sub in list(subs):
                try:
                    sub.deliver(ev)
                except Exception:
                    self.log.failure("subscriber {sub!r} failed on {channel}", sub=sub, channel=pattern)

    def deliver(self, ev: Event, ch: Channel | None = None) -> int:
        """Hand ``ev`` to the channel's and the matching patterns'
        subscribers (each once); returns how many."""
        ch = ch or self.channels.get(ev.channel)
        targets = ch.subscribers if ch is not None else set()
        pats = self._patterns_for(ev.channel) if self.patterns else ()
        if pats:
            targets = set(targets)
            for p in pats:
                targets |= self.patterns.get(p, set())
        n = 0
        for sub in list(targets):
            try:
                sub.deliver(ev)
                n += 1
            except Exception:
                self.log.failure("subscriber {sub!r} failed on {channel}", sub=sub, channel=ev.channel)
        if self._m is not None and not ev.gap:
            self._m[0].inc()
            self._m[1].inc(n)
        return n

    def presence(self, name: str) -> dict:
        check_channel(name)
        ch = self.channels.get(name)
        subs = ch.subscribers if ch is not None else ()
        principals = sorted({_principal_name(s.principal) for s in subs if getattr(s, "principal", None)})
        return {"channel": name, "count": len(subs), "principals": principals}

    # -- JSON-RPC -------------------------------------------------------------------------

    def http_builtins(self) -> dict:
        """``rpc.*`` methods for transports without a connection (HTTP)."""
        return {"rpc.publish": self._rpc_publish, "rpc.presence": self._rpc_presence}

    def _rpc_publish(self, request, params):
        channel = check_channel(param(params, "channel", 0, str))
        data = param(params, "data", 1, required=False)
        return self.publish(channel, data, principal=request.principal).addCallback(
            lambda offset: {"channel": channel, "offset": offset})

    def _rpc_presence(self, request, params):
        return self.presence(param(params, "channel", 0, str))


def _principal_name(p) -> str:
    return str(getattr(p, "name", p))


class Session:
    """The pub/sub side of one connection (WebSocket, stream, STOMP…):
    remembers its subscriptions so that they end with the connection, and
    offers the connection-bound ``rpc.*`` methods.  It can be passed as the
    ``builtins`` of :class:`msgd.core.jsonrpc.JSONRPC` itself (``get``), so
    that an idle connection carries no per-connection table of methods."""

    __slots__ = ("broker", "subscriber", "names", "max_subscriptions", "authorize")
    _BUILTINS = {"rpc.subscribe": "rpc_subscribe", "rpc.unsubscribe": "rpc_unsubscribe",
                 "rpc.publish": "rpc_publish", "rpc.presence": "rpc_presence"}

    def __init__(self, broker: Broker, subscriber, max_subscriptions: int = 1000,
                 authorize: Callable | None = None):
        self.broker = broker
        self.subscriber = subscriber
        self.names: set[str] = set()
        self.max_subscriptions = max_subscriptions
        self.authorize = authorize     # authorize(request, action, channel) raises Unauthorized

    def get(self, method: str, default=None):
        name = self._BUILTINS.get(method)
        return getattr(self, name) if name is not None else default

    def builtins(self) -> dict:
        return {method: getattr(self, name) for method, name in self._BUILTINS.items()}

    def rpc_subscribe(self, request, params):
        name = check_channel(param(params, "channel", 0, str), pattern_ok=True)
        since = param(params, "since", 1, int, required=False)
        epoch = param(params, "epoch", 2, str, required=False)
        if self.authorize is not None:
            self.authorize(request, "subscribe", name)
        return self.subscribe(name, since, epoch)

    def subscribe(self, name: str, since=None, epoch=None) -> defer.Deferred:
        if name not in self.names and len(self.names) >= self.max_subscriptions:
            raise errors.TooLarge(f"at most {self.max_subscriptions} subscriptions per connection")
        self.names.add(name)
        return self.broker.subscribe(name, self.subscriber, since, epoch)

    def rpc_unsubscribe(self, request, params):
        name = check_channel(param(params, "channel", 0, str), pattern_ok=True)
        self.names.discard(name)
        return {"channel": name, "unsubscribed": self.broker.unsubscribe(name, self.subscriber)}

    def rpc_publish(self, request, params):
        channel = check_channel(param(params, "channel", 0, str))
        if self.authorize is not None:
            self.authorize(request, "publish", channel)
        return self.broker._rpc_publish(request, params)

    def rpc_presence(self, request, params):
        channel = check_channel(param(params, "channel", 0, str))
        if self.authorize is not None:
            self.authorize(request, "subscribe", channel)   # who is on a channel is as private as its events
        return self.broker.presence(channel)

    def close(self) -> None:
        self.broker.unsubscribe_all(self.subscriber, self.names)
        self.names.clear()
