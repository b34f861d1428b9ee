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
``history_age``, overridable per pattern by ``[channel:PATTERN]`` sections)
and over all channels by memory (``history_memory``: past it the oldest
events of the channels holding the most are dropped, see ``Broker.shed``).

Subscriptions are to a channel (``chat.lobby``) or a pattern with shell-style
wildcards (``news.*``).  A pattern's subscribe answer gives the position
(``epoch``, ``offset``: objects by channel) of every matched channel that
has events; a pattern resumes with the positions the client holds (``since``
``{channel: offset}``, ``epoch`` ``{channel: epoch}``): every matched channel
is replayed from there — one it holds no position for from its first event,
as it began after the client's subscription — and ``recovered: true`` only
when every one of them could be.

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

Presence: ``presence(name)`` is who is subscribed here; with a cluster-wide
store (``Broker.presence_store``, :mod:`msgd.cluster.presence`)
``rpc.presence`` answers for every node.  Channels matching a
``[channel:PATTERN]`` with ``presence_events = yes`` tell their subscribers
who joins and leaves (:class:`Notice`: ``rpc.join`` / ``rpc.leave``
notifications, not events: no offset, no history); through a shared backend
every node's subscribers hear of every node's joins and leaves.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.core import errors
from msgd.core.jsonrpc import dumps, kept, loads, param

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


_HEAD = b'{"jsonrpc":"2.0","method":"rpc.event","params":{"channel":'
_GONE = object()

# What an event resting in history costs besides its encoded notification: the
# Event object, its offset and time, its slot in the deque (measured, CPython 3.11).
EVENT_OVERHEAD = 160


class Event:
    """One published event (or, with ``gap``, not an event: events before
    this point may be missing; data ``"local"``: and events published
    elsewhere will be, until the next gap).  Its JSON-RPC ``rpc.event``
    (``rpc.gap``) notification is encoded once (:meth:`notification`),
    however many subscribers there are, and ``cache`` holds each transport's
    framing of it while it is being delivered.  In history an event *rests*
    (``rest()``): it keeps only its notification, whose bytes are exactly
    as long as they need to be (orjson 3.12+ returns bytes that keep a 4 KB
    or larger buffer), ``cache`` is None and ``data`` is decoded from the
    notification again when asked for."""

    __slots__ = ("channel", "offset", "epoch", "time", "gap", "_data", "_json", "_at", "cache")

    def __init__(self, channel: str, offset: int, epoch: str, data: Any, time: float,
                 data_json: bytes | None = None, gap: bool = False):
        self.channel = channel
        self.offset = offset
        self.epoch = epoch
        self.time = time
        self.gap = gap
        self._data = data
        self._json: bytes | None = None
        self._at = 0
        self.cache: dict | None = {} if data_json is None else {"data": data_json}   # transports' forms

    def __repr__(self):
        return f"Event({self.channel!r}, {self.offset}, {self.epoch!r}{', gap' if self.gap else ''})"

    @property
    def data(self) -> Any:
        d = self._data
        return loads(self.data_json()) if d is _GONE else d

    def params(self) -> dict:
        if self.gap:
            if not self.epoch:      # for a pattern: any channel it matches
                return {"channel": self.channel, "pattern": True}
            if self.data == "local":    # this node goes on alone
                return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch, "local": True}
            return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch}
        return {"channel": self.channel, "offset": self.offset, "epoch": self.epoch, "data": self.data}

    def notification(self) -> bytes:
        """The JSON-RPC ``rpc.event`` (or ``rpc.gap``) notification, encoded
        once (an event's: the same bytes as ``dumps`` of it, built around
        ``data_json()``)."""
        b = self._json
        if b is None:
            if self.gap:
                b = self._json = kept(dumps({"jsonrpc": "2.0", "method": "rpc.gap", "params": self.params()}))
                return b
            head = b"".join((_HEAD, dumps(self.channel), b',"offset":%d,"epoch":' % self.offset,
                             dumps(self.epoch), b',"data":'))
            self._json = b = b"".join((head, self.data_json(), b"}}"))
            self._at = len(head)
        return b

    def data_json(self) -> bytes:
        """Just the data, encoded once (STOMP bodies)."""
        cache = self.cache
        b = cache.get("data") if cache is not None else None
        if b is None:
            b = dumps(self._data) if self._data is not _GONE else self._json[self._at:-2]   # type: ignore[index]
            if cache is not None:
                cache["data"] = b
        return b

    def size(self) -> int:
        """Bytes this event holds at rest, as counted against ``[pubsub] history_memory``."""
        return len(self.notification()) + EVENT_OVERHEAD

    def rest(self) -> None:
        """Delivered: keep only the notification (history replays it)."""
        self.notification()
        if not self.gap:
            self._data = _GONE
        self.cache = None


@dataclass(eq=False, slots=True)
class Notice:
    """A notification for a channel's subscribers that is not one of its
    events (no offset, no history, never replayed): ``rpc.join`` and
    ``rpc.leave``.  Subscribers take it through ``deliver`` like an event,
    except those whose ``notices`` attribute is false (STOMP)."""
    channel: str
    method: str
    params: dict
    cache: dict = field(default_factory=dict)
    offset = None
    epoch = None
    gap = False

    def notification(self) -> bytes:
        b = self.cache.get("json")
        if b is None:
            # right-sized: long-poll sessions queue it as it is (orjson's bytes keep 4 KB)
            b = self.cache["json"] = kept(dumps({"jsonrpc": "2.0", "method": self.method, "params": self.params}))
        return b


def framed(ev, key: str, make: Callable[[bytes], bytes]) -> bytes:
    """A transport's framing of ``ev`` (an :class:`Event` or a
    :class:`Notice`): ``make(notification)``, made once per event and kept in
    its ``cache`` while it is delivered; a resting event (a replay from
    history) keeps none, so it is framed again for each subscriber replayed to."""
    cache = ev.cache
    if cache is None:
        return make(ev.notification())
    b = cache.get(key)
    if b is None:
        b = cache[key] = make(ev.notification())
    return b


def presence_notice(channel: str, action: str, principal: str | None, count: int = 1) -> Notice:
    """``rpc.join`` / ``rpc.leave``: ``count`` subscriptions of ``principal``
    (None: anonymous) came or went."""
    return Notice(channel, f"rpc.{action}", {"channel": channel, "principal": principal, "count": count})


class Channel:
    __slots__ = ("name", "epoch", "offset", "history", "subscribers", "max_size", "max_age", "last_used",
                 "shared_at", "bytes", "owner")

    def __init__(self, name: str, max_size: int, max_age: float, now: float, owner: "Broker | None" = None):
        self.name = name
        self.epoch = new_epoch()
        self.offset = 0
        self.history: deque[Event] = deque()
        self.subscribers: set = set()
        self.max_size = max_size
        self.max_age = max_age
        self.last_used = now
        # with a shared backend: None while epoch and offset are the shared ones, else the
        # last shared (epoch, offset) before this node went on alone (("", 0): never shared)
        self.shared_at: tuple[str, int] | None = None
        self.bytes = 0          # what the history holds (Event.size), counted in owner.history_bytes too
        self.owner = owner

    def keep(self, ev: Event) -> None:
        """Append ``ev`` to the history (the oldest event goes past ``max_size``).
        It shares the channel's name and epoch strings: an event decoded from
        a shared backend came with its own (about 130 bytes more per event)."""
        if len(self.history) >= self.max_size:
            self.drop_oldest()
        if ev.channel == self.name:
            ev.channel = self.name
        if ev.epoch == self.epoch:
            ev.epoch = self.epoch
        self.history.append(ev)
        self._count(ev.size())

    def drop_oldest(self) -> None:
        self._count(-self.history.popleft().size())

    def clear(self) -> None:
        self.history.clear()
        self._count(-self.bytes)

    def _count(self, n: int) -> None:
        self.bytes += n
        if self.owner is not None:
            self.owner.history_bytes += n

    def trim(self, now: float) -> None:
        h = self.history
        limit = now - self.max_age
        while h and h[0].time < limit:
            self.drop_oldest()

    def covers(self, since: int) -> bool:
        """Can every event after ``since`` be replayed?"""
        return covers(self.offset, self.history, since)


def covers(offset: int, history, since: int) -> bool:
    """Can every event after ``since`` be replayed from ``history`` (the
    events up to ``offset``, in order)?"""
    if since >= offset:
        return since == offset
    if since < 0:
        return False
    return bool(history) and history[0].offset <= since + 1


class _Holder:
    """Stands for a pattern subscriber while its resume reads the shared
    backend: keeps what it is given, to be handed over after the replay."""

    __slots__ = ("principal", "events")

    def __init__(self, subscriber):
        self.principal = getattr(subscriber, "principal", None)
        self.events: list = []

    def deliver(self, ev) -> None:
        self.events.append(ev)


class Broker:
    """One node's pub/sub.  ``overrides`` is ``[(pattern, size|None, age|None)]``
    for per-channel history; the first matching pattern wins."""

    log = Logger()

    def __init__(self, clock, history_size: int = 1000, history_age: float = 3600.0,
                 overrides: Iterable[tuple[str, int | None, float | None]] = (), metrics=None,
                 gc_interval: float = 60.0, presence_events: Iterable[tuple[str, bool]] = (),
                 history_memory: int = 0):
        self.clock = clock
        self.history_size = history_size
        self.history_age = history_age
        self.history_memory = history_memory     # bound of history_bytes over all channels (0: none)
        self.history_bytes = 0
        self.overrides = list(overrides)
        self.presence_events = list(presence_events)   # [(pattern, yes/no)]: the first match decides
        self._announces: dict[str, bool] = {}
        self.presence_store = None   # cluster-wide presence when set (msgd.cluster.presence)
        self.channels: dict[str, Channel] = {}
        self.patterns: dict[str, set] = {}
        self._matches: dict[str, list[str]] = {}   # channel -> patterns matching it (cache)
        self._matched: dict[str, dict] = {}         # subscribed pattern -> channels here it matches (ordered)
        self._resuming: dict[tuple, _Holder] = {}   # (pattern, subscriber) -> its stand-in while reading
        self.gc_interval = gc_interval
        self._gc: LoopingCall | None = None
        self.backend = None    # shares channels between nodes when set (msgd.cluster.redis_pubsub)
        self._waiting: dict[str, set] = {}     # subscribers waiting for the backend to join a channel
        self._m = None
        if metrics is not None:
            self._m = (metrics.counter("msgd_pubsub_published_total", "Events published"),
                       metrics.counter("msgd_pubsub_deliveries_total", "Events handed to subscribers"),
                       metrics.gauge("msgd_pubsub_channels", "Channels in memory"),
                       metrics.gauge("msgd_pubsub_subscriptions", "Subscriptions (channels and patterns)"),
                       metrics.gauge("msgd_pubsub_history_bytes", "Bytes of events kept in history"),
                       metrics.counter("msgd_pubsub_history_shed_total",
                                       "Events dropped from history to stay within history_memory"))
            self._m[2].set_function(lambda: len(self.channels))
            self._m[4].set_function(lambda: self.history_bytes)
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
            for p in self._patterns_for(name) if self.patterns else ():
                self._matched[p].pop(name, None)
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
            ch = self.channels[name] = Channel(name, size, age, self.clock.seconds(), self)
            for p in self._patterns_for(name) if self.patterns else ():
                self._matched[p][name] = None
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

    def subscribe(self, name: str, subscriber, since=None, epoch=None) -> defer.Deferred:
        """Subscribe; fires with ``{"channel", "epoch", "offset", "recovered"}``
        (for a pattern, ``"pattern": true`` and epoch/offset objects by
        channel).  Missed events since ``since`` are delivered first when
        history covers them.  For a pattern, ``since``/``epoch`` are the
        positions the client holds: ``{channel: offset}``, ``{channel: epoch}``."""
        if is_pattern(name):
            return self._subscribe_pattern(name, subscriber, since, epoch)
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
        if subscriber not in ch.subscribers:
            ch.subscribers.add(subscriber)
            self._presence_changed(name, subscriber, "join")
        return {"channel": name, "epoch": ch.epoch, "offset": ch.offset, "recovered": recovered}

    def _matching(self, pattern: str, since: dict | None = None) -> list[str]:
        """The channels known here, or named in ``since``, that ``pattern``
        matches (kept up to date while the pattern has subscribers, so that
        its next subscriber does not look through every channel again)."""
        known = self._matched.get(pattern)
        match = re.compile(fnmatch.translate(pattern)).match
        names = dict(known) if known is not None else dict.fromkeys(filter(match, self.channels))
        names.update(dict.fromkeys(filter(match, since or ())))
        return list(names)

    def _subscribe_pattern(self, name: str, subscriber, since, epoch) -> defer.Deferred:
        check_channel(name, pattern_ok=True)
        backend = self.backend
        if backend is not None and getattr(backend, "no_patterns", None):
            raise errors.InvalidParams(backend.no_patterns)
        since, epoch = check_positions(since, epoch)
        if backend is None:
            return defer.succeed(self._resume_pattern(name, subscriber, since, epoch))
        if since is None:
            watching = self._add_pattern(name, subscriber)
            if watching is None:
                return defer.succeed(self._pattern_answer(name, True))
            return watching.addCallback(lambda _: self._pattern_answer(name, True))
        # Resuming through a shared backend: channels matched only by the pattern keep no
        # state here, so each matched channel is read from the backend once the pattern is
        # watched; what arrives meanwhile is held, and taken after the replay.
        holder = _Holder(subscriber)
        self._resuming[(name, subscriber)] = holder
        watching = self._add_pattern(name, holder) or defer.succeed(None)
        return watching.addCallback(lambda _: self._read_pattern(name, since)).addCallback(
            self._resumed_shared, name, subscriber, holder, since, epoch)

    def _add_pattern(self, name: str, subscriber) -> defer.Deferred | None:
        """Add a pattern subscriber; a Deferred when the backend must first
        start watching the pattern."""
        watching = None
        if name not in self.patterns:
            self._matched[name] = dict.fromkeys(self._matching(name))
            self.patterns[name] = set()
            self._matches.clear()
            if self.backend is not None:
                watching = self.backend.watch(name)
        self.patterns[name].add(subscriber)
        return watching

    def _resume_pattern(self, name: str, subscriber, since: dict | None, epoch: dict) -> dict:
        self._add_pattern(name, subscriber)
        recovered = True
        if since is not None:
            now = self.clock.seconds()
            states = {}
            names = self._matching(name, since)
            for n in names:
                ch = self.channels.get(n)
                if ch is not None:
                    ch.trim(now)
                    states[n] = (ch.epoch, ch.offset, ch.history)
            recovered, _ = self._replay_pattern(subscriber, names, states, since, epoch)
        return self._pattern_answer(name, recovered)

    def _read_pattern(self, name: str, since: dict) -> defer.Deferred:
        """The shared state of every channel ``name`` matches, named in
        ``since`` or kept in the backend: fires with ``(names, states,
        complete)``; ``states`` by channel (channels followed here: their
        state here), ``complete`` false when a channel or the list of them
        could not be read."""
        backend: Any = self.backend

        def listed(found):
            complete = found is not None
            names = list(dict.fromkeys([*self._matching(name, since), *(found or ())]))
            states: dict = {}
            reads = []
            for n in names:
                if (n not in self.channels or n in self._waiting) and backend.available(n):
                    reads.append(backend.read(n).addCallback(lambda st, n=n: states.__setitem__(n, st)))
            done = defer.gatherResults(reads, consumeErrors=True) if reads else defer.succeed(None)
            return done.addCallbacks(lambda _: (names, states, complete), lambda _: (names, states, False))

        def unlisted(failure):
            self.log.warn("pub/sub: could not list the channels of pattern {pattern} ({error})",
                          pattern=name, error=failure.getErrorMessage())
            return None
        return backend.channels(name).addErrback(unlisted).addCallback(listed)

    def _resumed_shared(self, read, name: str, subscriber, holder: _Holder, since: dict, epoch: dict) -> dict:
        names, states, complete = read
        if self._resuming.get((name, subscriber)) is not holder:
            # unsubscribed (its connection closed) while reading, or subscribed again meanwhile
            if holder in self.patterns.get(name, ()):
                self.unsubscribe(name, holder)
            return {"channel": name, "pattern": True, "epoch": {}, "offset": {}, "recovered": False}
        del self._resuming[(name, subscriber)]
        now = self.clock.seconds()
        for n in names:
            ch = self.channels.get(n)
            if ch is not None and n not in self._waiting:     # followed here: its state here is the one
                ch.trim(now)
                states[n] = (ch.epoch, ch.offset, ch.history)
        recovered, last = self._replay_pattern(subscriber, names, states, since, epoch)
        for ev in holder.events:        # arrived while reading: each taken once
            at = last.get(ev.channel)
            if at is not None and not ev.gap and ev.epoch == at[0] and ev.offset <= at[1]:
                continue
            if ev.epoch:
                last[ev.channel] = (ev.epoch, ev.offset)
            subscriber.deliver(ev)
        subs = self.patterns[name]
        subs.discard(holder)
        subs.add(subscriber)
        answer = self._pattern_answer(name, recovered and complete)
        for n, (e, o, _) in states.items():
            if o and n not in answer["offset"]:
                answer["epoch"][n], answer["offset"][n] = last.get(n, (e, o))
        return answer

    def _replay_pattern(self, subscriber, names, states: dict, since: dict, epoch: dict) -> tuple[bool, dict]:
        """Deliver to ``subscriber`` what it missed of each channel in
        ``names`` (``states``: ``(epoch, offset, history)`` by channel, a
        channel without one unknown): each channel from the position held
        in ``since``/``epoch``, one not named there from its first event.
        Returns (recovered, ``{channel: (epoch, offset)}`` where each now
        stands)."""
        recovered = True
        missed = []
        last = {}
        for n in names:
            state, held, held_epoch = states.get(n), since.get(n, 0), epoch.get(n)
            if state is None:   # forgotten (its history was gone) or unread: a position in it cannot be vouched for
                recovered = recovered and not held and held_epoch is None
                continue
            ch_epoch, offset, history = state
            last[n] = (ch_epoch, offset)
            if (held_epoch is None or held_epoch == ch_epoch) and covers(offset, history, held):
                missed.append([ev for ev in history if held < ev.offset <= offset])
            else:
                recovered = False
        # each channel in offset order, the channels interleaved by time (all in this turn)
        for ev in heapq.merge(*missed, key=lambda ev: ev.time):
            subscriber.deliver(ev)
        return recovered, last

    def _pattern_answer(self, name: str, recovered: bool) -> dict:
        held = [self.channels[n] for n in self._matched.get(name, ()) if self.channels[n].offset]
        return {"channel": name, "pattern": True, "epoch": {ch.name: ch.epoch for ch in held},
                "offset": {ch.name: ch.offset for ch in held}, "recovered": recovered}

    def unsubscribe(self, name: str, subscriber) -> bool:
        if is_pattern(name):
            subscriber = self._resuming.pop((name, subscriber), subscriber)
            subs = self.patterns.get(name)
            if not subs or subscriber not in subs:
                return False
            subs.discard(subscriber)
            if not subs:
                del self.patterns[name]
                del self._matched[name]
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
        self._presence_changed(name, subscriber, "leave")
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
        ch = self.channels.pop(name, None)
        if ch is not None:
            ch.clear()
            for p in self._patterns_for(name) if self.patterns else ():
                self._matched[p].pop(name, None)
        self._matches.pop(name, None)
        self.backend.unfollow(name)

    def unsubscribe_all(self, subscriber, names: Iterable[str]) -> None:
        for name in list(names):
            self.unsubscribe(name, subscriber)

    # -- publishing --------------------------------------------------------------------

    def publish(self, name: str, data: Any) -> defer.Deferred:
        """Publish ``data``; fires with the event's offset."""
        offset = self.publish_now(name, data)
        return offset if isinstance(offset, defer.Deferred) else defer.succeed(offset)

    def publish_now(self, name: str, data: Any) -> int | defer.Deferred:
        """Like :meth:`publish`, but the offset of an event published on this
        node alone is returned as it is, not in a Deferred (the fast path of
        ``rpc.publish``); a shared backend's is still a Deferred."""
        check_channel(name)
        try:
            data_json = dumps(data)
        except (TypeError, ValueError) as e:
            raise errors.InvalidParams(f"data is not JSON serializable: {e}") from None
        if self.backend is not None and self.backend.available(name):
            # offset from the shared channel; delivered here when it comes back through receive()
            return self.backend.publish(name, data_json).addErrback(self._shared_publish_failed, name, data, data_json)
        return self._publish_alone(name, data, data_json)

    def _shared_publish_failed(self, failure, name: str, data: Any, data_json: bytes) -> Any:
        if failure.check(defer.CancelledError):
            # the caller gave up (its deadline): the script sent still runs and its event comes
            # back through receive(); nothing is published here, the channel stays shared
            return failure
        self.log.warn("shared publish on {channel} failed ({error}); delivering on this node only",
                      channel=name, error=failure.getErrorMessage())
        return self._publish_alone(name, data, data_json)

    def _publish_alone(self, name: str, data: Any, data_json: bytes) -> int:
        """Publish on this node only (memory backend, or the shared one is away)."""
        ch = self.channel(name)
        now = self.clock.seconds()
        if self.backend is not None:
            if ch.shared_at is None:
                # leave the shared stream: a local epoch, announced first — events published
                # elsewhere no longer reach these subscribers
                ch.shared_at = (ch.epoch, ch.offset)
                ch.clear()
                self._gap(ch, new_epoch(), ch.offset, now, "local")
            self.backend.forked(name)
        ch.offset += 1
        ev = Event(ch.name, ch.offset, ch.epoch, data, now, data_json)
        ch.last_used = now
        self._deliver_and_keep(ev, ch, now)
        return ev.offset

    def _deliver_and_keep(self, ev: Event, ch: Channel, now: float) -> None:
        """Deliver ``ev`` and keep it in the channel's history, at rest."""
        if not ch.max_size:
            self.deliver(ev, ch)
            return
        ch.keep(ev)
        ch.trim(now)
        self.deliver(ev, ch)
        ev.rest()
        self._bound_memory()

    def _bound_memory(self) -> None:
        if self.history_memory and self.history_bytes > self.history_memory:
            self.shed()

    def shed(self) -> int:
        """History is over ``history_memory``: drop the oldest events of the
        channels that hold the most, until all history holds 90% of the bound
        (every channel above a common level is cut down to it).  A resume
        that needs a dropped event is told ``recovered: false``.  Returns how
        many events went."""
        target = self.history_memory * 9 // 10
        sizes = sorted((ch.bytes for ch in self.channels.values() if ch.bytes), reverse=True)
        rest = sum(sizes)
        level = 0
        for k, size in enumerate(sizes):       # the top k+1 channels come down to `level`
            rest -= size
            level = (target - rest) // (k + 1)
            if k + 1 == len(sizes) or level >= sizes[k + 1]:
                break
        dropped = 0
        touched = 0
        for ch in self.channels.values():
            if ch.bytes > level:
                touched += 1
                while ch.history and ch.bytes > level:
                    ch.drop_oldest()
                    dropped += 1
        if self._m is not None:
            self._m[5].inc(dropped)
        self.log.info("history over history_memory ({limit} bytes): dropped the {events} oldest events of "
                      "{channels} channels", limit=self.history_memory, events=dropped, channels=touched)
        return dropped

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
            ch.clear()
            ch.shared_at = None
            self._gap(ch, ev.epoch, ev.offset - 1, now)
        ch.offset = ev.offset
        ch.last_used = now
        self._deliver_and_keep(ev, ch, now)
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
            self._keep_resting(ch, [e for e in events if e.offset <= offset], now)
            return ch
        base_epoch, base = ch.shared_at or (ch.epoch, ch.offset)
        branched = ch.shared_at is not None
        missed = [e for e in events if base < e.offset <= offset]
        covered = base_epoch == epoch and base <= offset and (
            base == offset or (missed and missed[0].offset == base + 1 and missed[-1].offset == offset))
        ch.shared_at = None
        ch.clear()
        if covered:
            ch.epoch, ch.offset = epoch, base
            self._keep_resting(ch, [e for e in events if e.offset <= base], now)
            if branched:
                self._gap(ch, epoch, base, now)
        else:
            missed = [e for e in events if e.offset <= offset]
            self._gap(ch, epoch, missed[0].offset - 1 if missed else offset, now)
        for e in missed:
            ch.offset = e.offset
            self._deliver_and_keep(e, ch, now)
        ch.trim(now)
        ch.last_used = now
        return ch

    def _keep_resting(self, ch: Channel, events: list[Event], now: float) -> None:
        """Put ``events`` (not delivered here) in the channel's history, at rest."""
        if ch.max_size:
            for e in events:
                e.rest()
                ch.keep(e)
        ch.trim(now)
        self._bound_memory()

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

    # -- presence ---------------------------------------------------------------------------

    def presence(self, name: str) -> dict:
        """Who is subscribed to ``name`` on this node."""
        check_channel(name)
        local = self.local_presence(name)
        return {"channel": name, "count": sum(local.values()), "principals": sorted(p for p in local if p)}

    def local_presence(self, name: str) -> dict[str | None, int]:
        """``{principal name or None: subscriptions}`` of ``name`` on this node."""
        out: dict[str | None, int] = {}
        ch = self.channels.get(name)
        for s in (ch.subscribers if ch is not None else ()):
            p = getattr(s, "principal", None)
            key = _principal_name(p) if p else None
            out[key] = out.get(key, 0) + 1
        return out

    def cluster_presence(self, name: str) -> defer.Deferred:
        """Who is subscribed to ``name`` on any node (this node's answer
        when there is no cluster-wide store)."""
        check_channel(name)
        if self.presence_store is not None:
            return self.presence_store.query(name)
        return defer.succeed(self.presence(name))

    def announces(self, name: str) -> bool:
        """Do ``name``'s subscribers hear of joins and leaves?"""
        a = self._announces.get(name)
        if a is None:
            a = next((on for pattern, on in self.presence_events if fnmatch.fnmatchcase(name, pattern)), False)
            if len(self._announces) > 100_000:
                self._announces.clear()
            self._announces[name] = a
        return a

    def _presence_changed(self, name: str, subscriber, action: str) -> None:
        if self.presence_store is not None:
            self.presence_store.changed(name)
        if self.presence_events and self.announces(name):
            p = getattr(subscriber, "principal", None)
            self.announce(name, action, _principal_name(p) if p else None, 1)

    def announce(self, name: str, action: str, principal: str | None, count: int) -> None:
        """Tell ``name``'s subscribers on every node that ``count``
        subscriptions of ``principal`` joined or left."""
        backend = self.backend
        if backend is not None and backend.available(name):
            backend.announce(name, action, principal, count).addErrback(
                lambda f: self.notify(presence_notice(name, action, principal, count)))
        else:
            self.notify(presence_notice(name, action, principal, count))

    def notify(self, notice: Notice) -> int:
        """Hand ``notice`` to the channel's own subscribers (not to pattern
        subscribers) that take notices; returns how many."""
        ch = self.channels.get(notice.channel)
        n = 0
        for sub in list(ch.subscribers) if ch is not None else ():
            if getattr(sub, "notices", True):
                try:
                    sub.deliver(notice)
                    n += 1
                except Exception:
                    self.log.failure("subscriber {sub!r} failed on {channel}", sub=sub, channel=notice.channel)
        return n



def _principal_name(p) -> str:
    return str(getattr(p, "name", p))


def check_positions(since, epoch) -> tuple[dict | None, dict]:
    """A pattern's resume positions: ``since`` ``{channel: offset}`` (None:
    not resuming) and ``epoch`` ``{channel: epoch}`` (optional)."""
    if since is None:
        return None, {}
    if not isinstance(since, dict) or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 and check_channel(c)
            for c, o in since.items()):
        raise errors.InvalidParams("since must be an object {channel: offset} for a pattern")
    epoch = {} if epoch is None else epoch
    if not isinstance(epoch, dict) or not all(isinstance(c, str) and isinstance(e, str) for c, e in epoch.items()):
        raise errors.InvalidParams("epoch must be an object {channel: epoch} for a pattern")
    return since, epoch


def format_positions(positions: dict[str, tuple[str, int]]) -> str:
    """``{"chat.lobby": ("E", 7), …}`` → ``"E:7:chat.lobby …"``: positions as
    one line of text (SSE event ids, STOMP headers); channel names hold no
    whitespace."""
    return " ".join(f"{e}:{o}:{c}" for c, (e, o) in positions.items())


def parse_positions(text: str | None, strict: bool = False) -> dict[str, tuple[str, int]]:
    """The inverse of :func:`format_positions`.  Malformed parts are ignored
    (that channel then starts afresh), or refused when ``strict``."""
    out = {}
    for part in (text or "").split():
        epoch, _, rest = part.partition(":")
        offset, _, channel = rest.partition(":")
        if epoch and offset.isdigit() and channel:
            out[channel] = (epoch, int(offset))
        elif strict:
            raise errors.InvalidParams(f"{part!r} is not a position (epoch:offset:channel)")
    return out


class Session:
    """The pub/sub side of one connection (see msgd.interfaces.connection):
    remembers its subscriptions so that they end with the connection, bounds
    how many it holds, and serves the connection-bound ``rpc.*`` methods,
    each checked by ``authorize(request, action, channel)``.

    A JSON-RPC connection is its one ``subscriber``.  A connection with a
    subscriber per subscription (STOMP: one per SUBSCRIBE id) passes each
    to ``subscribe`` and ``unsubscribe``; they count against the same bound
    and end with ``close`` too.  Slots that are no broker subscription (a
    STOMP ``/temp-queue/`` reply destination) are held with ``reserve`` and
    given back with ``release``: the one bound covers them too."""

    __slots__ = ("broker", "subscriber", "names", "max_subscriptions", "authorize", "others", "reserved")

    def __init__(self, broker: Broker, subscriber, max_subscriptions: int = 1000,
                 authorize: Callable | None = None):
        self.broker = broker
        self.subscriber = subscriber
        self.names: set[str] = set()
        self.max_subscriptions = max_subscriptions
        self.authorize = authorize     # authorize(request, action, channel) raises Unauthorized
        self.others: set[tuple[str, Any]] | None = None     # (name, subscriber) of other subscribers
        self.reserved = 0      # slots held that are not broker subscriptions (reserve())

    def rpc_subscribe(self, request, params):
        name = check_channel(param(params, "channel", 0, str), pattern_ok=True)
        pattern = is_pattern(name)      # resumes with objects by channel (checked by the broker)
        since = param(params, "since", 1, None if pattern else int, required=False)
        epoch = param(params, "epoch", 2, None if pattern else str, required=False)
        self.check(request, "subscribe", name)
        return self.subscribe(name, since, epoch)

    def check(self, request, action: str, channel: str) -> None:
        """Whether ``request``'s principal may ``action`` (subscribe,
        publish) ``channel``: every protocol asks here."""
        if self.authorize is not None:
            self.authorize(request, action, channel)

    def count(self) -> int:
        """The subscriptions and reserved slots held (bounded by ``max_subscriptions``)."""
        return len(self.names) + (len(self.others) if self.others else 0) + self.reserved

    def reserve(self) -> None:
        """Hold one slot that is not a broker subscription, within
        ``max_subscriptions`` (raises ``TooLarge`` when there is no room)."""
        self._room()
        self.reserved += 1

    def release(self) -> None:
        """Give back a slot of :meth:`reserve`."""
        if self.reserved:
            self.reserved -= 1

    def subscribe(self, name: str, since=None, epoch=None, subscriber=None) -> defer.Deferred:
        """Subscribe ``subscriber`` (default: the connection's own) to
        ``name``; fires as :meth:`Broker.subscribe` does."""
        held: Any
        kept: set
        if subscriber is None or subscriber is self.subscriber:
            subscriber, held, kept = self.subscriber, name, self.names
        else:
            held = (name, subscriber)
            if self.others is None:
                self.others = set()
            kept = self.others
        new = held not in kept
        if new:
            self._room()
            kept.add(held)
        try:
            return self.broker.subscribe(name, subscriber, since, epoch)
        except Exception:
            if new:             # refused (bad positions, no patterns here): it holds no slot
                kept.discard(held)
            raise

    def _room(self) -> None:
        if self.count() >= self.max_subscriptions:
            raise errors.TooLarge(f"at most {self.max_subscriptions} subscriptions per connection")

    def unsubscribe(self, name: str, subscriber=None) -> bool:
        """End one subscription; whether the broker had it."""
        if subscriber is None or subscriber is self.subscriber:
            self.names.discard(name)
            return self.broker.unsubscribe(name, self.subscriber)
        if self.others is not None:
            self.others.discard((name, subscriber))
        return self.broker.unsubscribe(name, subscriber)

    def rpc_unsubscribe(self, request, params):
        name = check_channel(param(params, "channel", 0, str), pattern_ok=True)
        return {"channel": name, "unsubscribed": self.unsubscribe(name)}

    def rpc_publish(self, request, params):
        channel = check_channel(param(params, "channel", 0, str))
        offset = self.publish_now(request, channel, param(params, "data", 1, required=False))
        if isinstance(offset, defer.Deferred):
            return offset.addCallback(lambda offset: {"channel": channel, "offset": offset})
        return {"channel": channel, "offset": offset}

    def publish_now(self, request, channel: str, data) -> int | defer.Deferred:
        """Publish, once the channel check allows ``request``'s principal to;
        the offset as :meth:`Broker.publish_now` gives it."""
        self.check(request, "publish", channel)
        return self.broker.publish_now(channel, data)

    def publish(self, request, channel: str, data) -> defer.Deferred:
        """:meth:`publish_now`, the offset always in a Deferred."""
        offset = self.publish_now(request, channel, data)
        return offset if isinstance(offset, defer.Deferred) else defer.succeed(offset)

    def rpc_presence(self, request, params):
        channel = check_channel(param(params, "channel", 0, str))
        self.check(request, "subscribe", channel)   # who is on a channel is as private as its events
        return self.broker.cluster_presence(channel)

    def close(self) -> None:
        """The connection is gone: every subscription it held ends."""
        if self.names:
            self.broker.unsubscribe_all(self.subscriber, self.names)
            self.names.clear()
        others, self.others = self.others, None
        for name, subscriber in others or ():
            self.broker.unsubscribe(name, subscriber)
        self.reserved = 0
