"""Durable asynchronous messages between nodes.

Sender side, :class:`Outbox`: ``api.peer("b").send("orders.place", ...)``
writes the message to ``STATE_DIR/outbox.sqlite`` (WAL; committed before the
Deferred fires, so a SIGKILL right after loses nothing) and then delivers it
to the peer's ``send`` over PB, at least once:

- a failed delivery (peer down, timeout, handler error) is retried with
  exponential back-off (``base_delay`` doubling up to ``max_delay``), and
  right away when the peer's connection comes up;
- a message past its ``expires`` time is dropped and counted
  (``msgd_outbox_dropped_total{reason="expired"}``);
- a message the peer refuses for good (no such target, bad params,
  unauthorized) is dropped, logged and counted (``reason="rejected"``);
- with ``[peer:NAME] ordered = yes`` one message at a time goes to that peer,
  in the order they were sent (a failing head holds the rest back);
  otherwise up to ``window`` are in flight at once, in any order.

Depth and age of the oldest message are the gauges ``msgd_outbox_depth``
and ``msgd_outbox_oldest_seconds`` per peer.

Receiver side, :class:`Received`: the idempotency store.  A message id is
remembered (in ``STATE_DIR/received.sqlite``) once its handler succeeded, and
for ``retention`` seconds a copy with the same id is answered "duplicate"
without running the handler; a copy that arrives while the first is still
being handled waits for it.  A handler, once started, is never cancelled by
its caller (the sender's connection dropping): it runs to its end and its id
is recorded when it succeeds.  Together: each message is handled once, unless
the receiver dies between its handler's success and the write of the id (then
it is handled again: at-least-once).

The caller of ``send`` may choose the message id: sending again under an id
still in the outbox is a no-op, and one delivered already is a duplicate at
the receiver, so a caller that died before ``send`` answered sends again.

All sqlite work runs in the node's thread pool through ``run_blocking``, on
one connection guarded by a lock.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import sqlite3
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgd.core import errors

PERMANENT = (errors.NotFound, errors.InvalidParams, errors.InvalidRequest, errors.Unauthorized, errors.TooLarge)
MAX_ID = 200        # characters of a message id (the receiver refuses longer ones)


def bad_message_id(message_id) -> str | None:
    """What is wrong with ``message_id``, or None when it will do."""
    if not isinstance(message_id, str) or not message_id or len(message_id) > MAX_ID:
        return f"message_id must be a non-empty string of at most {MAX_ID} characters"
    return None


class _DB:
    """One sqlite connection used from pool threads, one at a time
    (``path`` may be ``":memory:"``: a store that lasts as long as the object)."""

    def __init__(self, path: str, schema: str):
        self.path = path
        self.schema = schema
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None

    def run(self, fn, *args):
        with self.lock:
            if self.conn is None:
                if os.path.dirname(self.path):
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")     # survives a process crash
                conn.executescript(self.schema)
                self.conn = conn
            return fn(self.conn, *args)

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    peer TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL
);
"""


@dataclass(eq=False)
class Message:
    id: str
    peer: str
    target: str
    args: list
    kwargs: dict
    created: float
    expires: float | None
    attempts: int = 0
    next_try: float = 0.0
    error: str = field(default="")


class Outbox:
    """``peers`` maps names to objects with ``deliver(message) -> Deferred``,
    ``ordered`` and ``default_ttl``; the clock's ``seconds()`` is Unix time
    in production (the reactor)."""

    log = Logger()

    def __init__(self, path: str, clock, run_blocking, peers: dict, metrics=None,
                 base_delay: float = 1.0, max_delay: float = 300.0, window: int = 64):
        self.db = _DB(path, OUTBOX_SCHEMA)
        self.clock = clock
        self.run_blocking = run_blocking
        self.peers = peers
        self.base_delay, self.max_delay, self.window = base_delay, max_delay, window
        self.queues: dict[str, OrderedDict[str, Message]] = {}
        self.in_flight: dict[str, set[str]] = {}
        # per peer, heaps of (time, tie, id): when each message not in flight is due, and
        # when each one with a ttl expires.  A pass looks only at what is due, so a long
        # queue to a peer that is down costs O(log n) per send or failure, not a scan.
        # Entries go stale (a message forgotten, sent, or rescheduled) and are skipped.
        self._due: dict[str, list] = {}
        self._expiry: dict[str, list] = {}
        self._tie = itertools.count()
        self._timers: dict[str, IDelayedCall] = {}
        self._pumping: set[str] = set()
        self._again: set[str] = set()
        self.running = False
        self._m = None
        if metrics is not None:
            self._m = (metrics.counter("msgd_outbox_delivered_total", "Async messages a peer accepted", ["peer"]),
                       metrics.counter("msgd_outbox_dropped_total", "Async messages given up", ["peer", "reason"]),
                       metrics.counter("msgd_outbox_retries_total", "Failed deliveries to be retried", ["peer"]),
                       metrics.gauge("msgd_outbox_depth", "Async messages waiting for a peer", ["peer"]),
                       metrics.gauge("msgd_outbox_oldest_seconds", "Age of the oldest waiting message", ["peer"]))

    # -- lifecycle -------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Load what a previous run left and start delivering it."""
        self.running = True
        rows = yield self.run_blocking(self.db.run, lambda c: c.execute(
            "SELECT id, peer, target, body, created, expires FROM messages ORDER BY seq").fetchall())
        for mid, peer, target, body, created, expires in rows:
            args, kwargs = json.loads(body)
            self._add(Message(mid, peer, target, args, kwargs, created, expires))
        if rows:
            self.log.info("outbox: {n} message(s) left from before, delivering", n=len(rows))
        for peer in list(self.queues):
            self._pump(peer)

    def stop(self):
        self.running = False
        for t in self._timers.values():
            if t.active():
                t.cancel()
        self._timers.clear()
        return self.run_blocking(self.db.close)

    def _queue(self, peer: str) -> OrderedDict:
        q = self.queues.get(peer)
        if q is None:
            q = self.queues[peer] = OrderedDict()
            self.in_flight[peer] = set()
            self._due[peer], self._expiry[peer] = [], []
            if self._m is not None:
                self._m[3].labels(peer).set_function(lambda: len(q))
                self._m[4].labels(peer).set_function(
                    lambda: self.clock.seconds() - next(iter(q.values())).created if q else 0.0)
        return q

    # -- sending -----------------------------------------------------------------

    def send(self, peer: str, target: str, args=(), kwargs=None, ttl: float | None = None,
             message_id: str | None = None) -> defer.Deferred:
        """Write the message durably; fires with its id once it is on disk.

        ``message_id`` (default: a fresh one) lets the caller own the id: a
        second send with an id still in the outbox is the same message (not
        written again, whatever its arguments), and one sent again after
        delivery is dropped as a duplicate by the receiver."""
        if peer not in self.peers:
            return defer.fail(errors.NotFound(f"no peer named {peer!r}"))
        if message_id is not None and (problem := bad_message_id(message_id)):
            return defer.fail(errors.InvalidParams(problem))
        kwargs = dict(kwargs or {})
        try:
            body = json.dumps([list(args), kwargs])
        except (TypeError, ValueError) as e:
            return defer.fail(errors.InvalidParams(f"message arguments are not JSON serializable: {e}"))
        now = self.clock.seconds()
        if ttl is None:
            ttl = self.peers[peer].default_ttl
        msg = Message(message_id or uuid.uuid4().hex, peer, target, list(args), kwargs, now,
                      None if ttl is None else now + ttl)

        def insert(conn):
            return conn.execute(
                "INSERT OR IGNORE INTO messages (id, peer, target, body, created, expires) VALUES (?,?,?,?,?,?)",
                (msg.id, peer, target, body, msg.created, msg.expires)).rowcount == 1

        def written(new):
            if new:
                self._add(msg)
                self._pump(peer)
            return msg.id
        return self.run_blocking(self.db.run, insert).addCallback(written)

    def _add(self, msg: Message) -> None:
        self._queue(msg.peer)[msg.id] = msg
        tie = next(self._tie)
        heapq.heappush(self._due[msg.peer], (msg.next_try, tie, msg.id))
        if msg.expires is not None:
            heapq.heappush(self._expiry[msg.peer], (msg.expires, tie, msg.id))

    def _retry_at(self, msg: Message, when: float) -> None:
        msg.next_try = when
        heapq.heappush(self._due[msg.peer], (when, next(self._tie), msg.id))

    def _compact(self, peer: str) -> None:
        """Rebuild the heaps from the queue: stale entries otherwise wait for
        their time (a ttl of a day), and an ordered peer's are never popped."""
        q, flying = self.queues[peer], self.in_flight[peer]
        self._due[peer] = [(m.next_try, next(self._tie), m.id) for m in q.values() if m.id not in flying]
        self._expiry[peer] = [(m.expires, next(self._tie), m.id) for m in q.values() if m.expires is not None]
        heapq.heapify(self._due[peer])
        heapq.heapify(self._expiry[peer])

    def kick(self, peer: str) -> None:
        """The peer is reachable again: retry its messages now."""
        q = self.queues.get(peer)
        if not q:
            return
        flying = self.in_flight[peer]
        for msg in q.values():
            msg.next_try = 0.0
        self._due[peer] = [(0.0, next(self._tie), mid) for mid in q if mid not in flying]   # in order: a heap
        self._pump(peer)

    # -- delivering -------------------------------------------------------------------

    def _pump(self, peer: str) -> None:
        """Start what may be started now.  Not re-entered: a delivery that
        fails synchronously (peer down) asks for another pass instead of
        recursing."""
        if not self.running:
            return
        if peer in self._pumping:
            self._again.add(peer)
            return
        self._pumping.add(peer)
        try:
            self._again.add(peer)
            while peer in self._again:
                self._again.discard(peer)
                self._pass(peer)
        finally:
            self._pumping.discard(peer)

    def _pass(self, peer: str) -> None:
        q, flying = self._queue(peer), self.in_flight[peer]
        target = self.peers.get(peer)
        if target is None:
            return            # a peer no longer configured: its messages wait in the file
        now = self.clock.seconds()
        expiry, due = self._expiry[peer], self._due[peer]
        while expiry and expiry[0][0] <= now:
            mid = heapq.heappop(expiry)[2]
            msg = q.get(mid)
            if msg is not None and mid not in flying:   # one in flight is dropped if it fails (_failed)
                self._drop(msg, "expired")
        if target.ordered:
            # one at a time, in the order sent: only the head of the queue matters
            while q and not flying:
                msg = next(iter(q.values()))
                if msg.expires is not None and now >= msg.expires:
                    self._drop(msg, "expired")
                    continue
                if msg.next_try <= now:
                    flying.add(msg.id)
                    self._deliver(target, msg)
                break
            wake = next(iter(q.values())).next_try if q and not flying else None
        else:
            while due and due[0][0] <= now and len(flying) < self.window:
                when, _, mid = heapq.heappop(due)
                msg = q.get(mid)
                if msg is None or mid in flying or msg.next_try != when:
                    continue                            # stale: forgotten, sent, or rescheduled
                flying.add(mid)
                self._deliver(target, msg)
            wake = due[0][0] if due and len(flying) < self.window else None
        if expiry:
            wake = expiry[0][0] if wake is None else min(wake, expiry[0][0])
        self._schedule(peer, wake)

    def _schedule(self, peer: str, when: float | None) -> None:
        t = self._timers.pop(peer, None)
        if t is not None and t.active():
            t.cancel()
        if when is not None:
            self._timers[peer] = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._pump, peer)

    def _deliver(self, target, msg: Message) -> None:
        msg.attempts += 1
        d = defer.maybeDeferred(target.deliver, msg)
        d.addCallbacks(self._accepted, self._failed, callbackArgs=(msg,), errbackArgs=(msg,))
        d.addErrback(lambda f: self.log.failure("outbox bookkeeping failed", f))

    def _accepted(self, _, msg: Message):
        self.in_flight[msg.peer].discard(msg.id)
        if self._m is not None:
            self._m[0].labels(msg.peer).inc()
        return self._forget(msg)

    def _failed(self, failure: Failure, msg: Message):
        self.in_flight[msg.peer].discard(msg.id)
        e = failure.value if failure.check(errors.MsgdError) else errors.Unavailable(failure.getErrorMessage())
        msg.error = f"{e.name}: {e.message}"
        if isinstance(e, PERMANENT):
            self.log.error("outbox: peer {peer} refused message {id} to {target} for good ({error}); dropped",
                           peer=msg.peer, id=msg.id, target=msg.target, error=msg.error)
            return self._drop(msg, "rejected")
        now = self.clock.seconds()
        if msg.expires is not None and now >= msg.expires:
            return self._drop(msg, "expired")
        delay = min(self.max_delay, self.base_delay * 2 ** (msg.attempts - 1))
        self._retry_at(msg, now + delay)
        if self._m is not None:
            self._m[2].labels(msg.peer).inc()
        self.log.debug("outbox: delivery of {id} to {peer} failed ({error}); retry in {delay}s",
                       id=msg.id, peer=msg.peer, error=msg.error, delay=delay)
        self._pump(msg.peer)

    def _drop(self, msg: Message, reason: str):
        if reason == "expired":
            self.log.warn("outbox: message {id} to {peer} ({target}) expired after {attempts} attempt(s): {error}",
                          id=msg.id, peer=msg.peer, target=msg.target, attempts=msg.attempts, error=msg.error)
        if self._m is not None:
            self._m[1].labels(msg.peer, reason).inc()
        return self._forget(msg)

    def _forget(self, msg: Message):
        q = self.queues[msg.peer]
        q.pop(msg.id, None)
        if len(self._due[msg.peer]) + len(self._expiry[msg.peer]) > 4 * len(q) + 128:
            self._compact(msg.peer)
        d = self.run_blocking(self.db.run, lambda c: c.execute("DELETE FROM messages WHERE id = ?", (msg.id,)))
        d.addCallback(lambda _: self._pump(msg.peer))
        return d

    def describe(self) -> dict:
        return {peer: {"depth": len(q), "in_flight": len(self.in_flight[peer])} for peer, q in self.queues.items()}


RECEIVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS received_at ON received (at);
"""


class Received:
    """The receiver's idempotency store (see the module docstring)."""

    def __init__(self, path: str, clock, run_blocking, retention: float = 7 * 86400, purge_every: int = 1000):
        self.db = _DB(path, RECEIVED_SCHEMA)
        self.clock = clock
        self.run_blocking = run_blocking
        self.retention = retention
        self.purge_every = purge_every
        self._count = 0
        self.handling: dict[str, list[defer.Deferred]] = {}

    def handle(self, message_id: str, handler) -> defer.Deferred:
        """Run ``handler()`` unless ``message_id`` was handled already; fires
        with ``True`` for a duplicate, ``False`` once handled.

        Each caller gets its own Deferred: cancelling it (the sender's
        connection dropped) does not touch the handler, which runs to its end
        (or its deadline) and has its id recorded when it succeeds; a copy that
        arrives meanwhile waits for that run and is answered as a duplicate."""
        waiting = self.handling.get(message_id)
        if waiting is not None:
            d: defer.Deferred[bool] = defer.Deferred()
            waiting.append(d)
            return d
        mine: defer.Deferred[bool] = defer.Deferred()
        self.handling[message_id] = []

        def run(seen):
            if seen:
                return True
            return defer.maybeDeferred(handler).addCallback(lambda _: self._remember(message_id))

        def done(result):
            waiting = self.handling.pop(message_id)
            for d, r in [(mine, result)] + [(w, True) for w in waiting]:
                d.errback(result) if isinstance(result, Failure) else d.callback(r)
            return None
        self.run_blocking(self.db.run, self._seen, message_id, self.clock.seconds() - self.retention) \
            .addCallback(run).addBoth(done)
        return mine

    @staticmethod
    def _seen(conn, message_id, since):
        return conn.execute("SELECT 1 FROM received WHERE id = ? AND at >= ?", (message_id, since)).fetchone() is not None

    def _remember(self, message_id: str) -> defer.Deferred:
        now = self.clock.seconds()
        self._count += 1
        purge = self._count % self.purge_every == 1

        def write(conn):
            conn.execute("INSERT OR REPLACE INTO received (id, at) VALUES (?, ?)", (message_id, now))
            if purge:
                conn.execute("DELETE FROM received WHERE at < ?", (now - self.retention,))
        return self.run_blocking(self.db.run, write).addCallback(lambda _: False)

    def close(self):
        if self.db.conn is None:      # never used: nothing to close (and no thread needed)
            return defer.succeed(None)
        return self.run_blocking(self.db.close)
