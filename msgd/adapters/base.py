"""The one contract every adapter follows.

An adapter is a child service of the node, declared as ``[adapter:NAME]
type=…`` and reached from app code as ``api.adapter("NAME")``.  Each of its
operations goes through :meth:`Adapter.call`, which gives every external
system the same rules, so that a slow or broken one never takes the node
down with it:

deadline
    A call inherits the current request's deadline (outside a request:
    ``timeout``).  At the deadline the work is cancelled and the call fails
    with :class:`AdapterTimeout`.
pool
    At most ``pool_size`` operations (and connections) at once.  Callers
    beyond that wait in a queue of at most ``pool_queue``, each no longer than
    its deadline; past the bound they fail at once with
    :class:`AdapterOverloaded`.  Idle connections are closed after
    ``pool_idle``, every connection after ``pool_max_age``.
retry
    Only what is safe: a failure before anything reached the system (could
    not connect), or any failure of an operation the adapter declares
    idempotent (a read).  At most ``retries`` times, with back-off doubling
    from ``retry_backoff``, and never past the deadline.
circuit breaker
    After ``breaker_failures`` consecutive failures of the system (not
    rejections of a bad request) calls fail at once with
    :class:`CircuitOpen`; after ``breaker_reset`` one call is let through as
    a probe, and its success closes the breaker.
metrics and logs
    ``msgd_adapter_*`` per adapter (calls, errors, retries, latency, pool
    in use and waiting, breaker state); failures are logged with the adapter
    name and the request id.

Errors reach app code as one family, :class:`AdapterError`: every one names
the adapter, says whether retrying later may help (``retryable``) and why
(``reason``), and is also one of the node's taxonomy (Unavailable, Timeout,
Overloaded, ApplicationError), so interfaces render it without knowing
adapters.

Blocking client libraries (ldap3, sqlite, psycopg2) run in the adapter's own
thread pool, sized to its pool.  A thread cannot be interrupted: when its
caller's deadline passes the caller gets its timeout at once, but the pool
slot stays taken until the thread really ends, so a hung server can never
make threads pile up.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from msgd.config import duration, integer, option, optional_duration
from msgd.core import errors
from msgd.core.request import current
from msgd.services import Services


# -- the error family ------------------------------------------------------------

class AdapterError(errors.MsgdError):
    """Base of every adapter failure.

    ``adapter``: the adapter's name; ``retryable``: whether the same call may
    succeed later; ``reason``: what went wrong; ``sent``: False when nothing
    reached the system (so retrying cannot do anything twice).
    """

    def __init__(self, adapter: str, reason: str, retryable: bool = False, sent: bool = True):
        self.adapter, self.reason, self.retryable, self.sent = adapter, reason, retryable, sent
        super().__init__(f"adapter {adapter}: {reason}", data={"adapter": adapter, "retryable": retryable})


class AdapterUnavailable(AdapterError, errors.Unavailable):
    """The system could not be reached, or failed while serving the call."""


class CircuitOpen(AdapterUnavailable):
    """The breaker is open: the system failed repeatedly; not tried."""


class AdapterTimeout(AdapterError, errors.Timeout):
    """The deadline passed before the system answered; the work was cancelled."""


class AdapterOverloaded(AdapterError, errors.Overloaded):
    """Too many callers already wait for this adapter's pool."""


class AdapterRejected(AdapterError, errors.ApplicationError):
    """The system answered, with an error about this call (bad query,
    constraint, no such entry, refused recipient): retrying will not help."""


def _network_error(e: BaseException) -> tuple[bool, bool] | None:
    """(is a network failure, nothing was sent) for the errors every socket
    client shares, else None."""
    if isinstance(e, (neterror.ConnectError, ConnectionRefusedError)):
        return True, False
    if isinstance(e, (neterror.ConnectionLost, neterror.ConnectionDone, ConnectionError,
                      neterror.TimeoutError, OSError)):
        return True, True
    try:
        from twisted.enterprise.adbapi import ConnectionLost as DBConnectionLost
    except ImportError:   # pragma: no cover
        return None
    return (True, True) if isinstance(e, DBConnectionLost) else None


# -- options shared by every type ---------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AdapterOptions:
    """Keys every ``[adapter:NAME]`` has; each type's ``Options`` extends it."""
    timeout: float = option(10.0, parse=duration,
                            doc="deadline of a call made outside any request (inside one, the request's deadline)")
    pool_size: int = option(10, parse=integer(1, 1000),
                            doc="at most this many operations and connections at once (also the thread count)")
    pool_queue: int = option(100, parse=integer(0),
                             doc="at most this many callers wait for the pool; more fail at once (overloaded)")
    pool_idle: float = option(60.0, parse=duration, doc="close a connection idle this long")
    pool_max_age: float | None = option(3600.0, parse=optional_duration,
                                        doc="close a connection this old when it is next idle (off: never)")
    retries: int = option(2, parse=integer(0, 10),
                          doc="retries of a call that is safe to repeat (reads, or nothing was sent)")
    retry_backoff: float = option(0.1, parse=duration, doc="first retry delay; doubles each retry")
    breaker_failures: int = option(5, parse=integer(1),
                                   doc="consecutive failures of the system that open the circuit breaker")
    breaker_reset: float = option(5.0, parse=duration,
                                  doc="how long the breaker stays open before one probe call is let through")


# -- circuit breaker ------------------------------------------------------------------

class Breaker:
    """closed → (``threshold`` consecutive failures) → open → (``reset``
    seconds) → half-open: one probe; its success closes, its failure reopens."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, clock, threshold: int, reset: float, on_change: Callable[[str], None] = lambda s: None):
        self.clock, self.threshold, self.reset = clock, threshold, reset
        self.on_change = on_change
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """True when a call may go ahead (when half-open: the one probe)."""
        if self.state == self.OPEN and self.clock.seconds() - self.opened_at >= self.reset:
            self._set(self.HALF_OPEN)
        if self.state == self.CLOSED:
            return True
        if self.state == self.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        return max(0.0, self.opened_at + self.reset - self.clock.seconds())

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != self.CLOSED:
            self._set(self.CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == self.HALF_OPEN or (self.state == self.CLOSED and self.failures >= self.threshold):
            self.opened_at = self.clock.seconds()
            self._set(self.OPEN)

    def abandoned(self) -> None:
        """A probe ended without an answer either way (its caller went away)."""
        self._probing = False

    def _set(self, state: str) -> None:
        self.state = state
        self.on_change(state)


# -- pool -------------------------------------------------------------------------------

class Lease:
    """One pool slot (with its connection, if the adapter has connections)."""
    __slots__ = ("conn", "created", "busy")

    def __init__(self, conn, created: float):
        self.conn, self.created = conn, created
        self.busy: Deferred | None = None   # work that still runs in a thread


class Pool:
    """Bounded slots with optional connections.

    ``create() -> Deferred[conn]`` and ``destroy(conn)`` manage connections;
    without them the pool only bounds concurrency.  A connection attempt is
    not abandoned when the caller that asked for it goes away: the next
    caller gets the connection.  A failed attempt fails the oldest waiter,
    so callers see an outage at once instead of at their deadline.
    """

    def __init__(self, clock, size: int, queue: int, create: Callable[[], Deferred] | None = None,
                 destroy: Callable[[Any], None] | None = None, idle: float | None = None,
                 max_age: float | None = None, overloaded: Callable[[], Exception] = lambda: RuntimeError("pool full")):
        self.clock, self.size, self.queue = clock, size, queue
        self.create, self.destroy = create, destroy
        self.idle_timeout, self.max_age = idle, max_age
        self.overloaded = overloaded
        self.in_use = 0
        self.creating = 0
        self.idle: collections.deque[tuple[Lease, float]] = collections.deque()   # (lease, idle since)
        self.waiters: collections.deque[Deferred] = collections.deque()
        self.closed = False
        self.closed_reason: Exception = errors.Unavailable("adapter stopped")

    @property
    def total(self) -> int:
        return self.in_use + self.creating + len(self.idle)

    def acquire(self) -> Deferred:
        """A Deferred Lease; cancelling it leaves the queue."""
        if self.closed:
            return defer.fail(self.closed_reason)
        if len(self.waiters) >= self.queue + (self.size - self.in_use):
            return defer.fail(self.overloaded())   # the queue proper is full
        d: Deferred[Lease] = Deferred(lambda d: self.waiters.remove(d) if d in self.waiters else None)
        self.waiters.append(d)
        self._fill()
        return d

    def take_idle(self) -> Lease | None:
        """A free connection at once when nobody waits, else None."""
        if self.idle and not self.waiters and not self.closed:
            lease, _ = self.idle.pop()
            if not self._too_old(lease):
                self.in_use += 1
                return lease
            self._destroy(lease)
        return None

    def release(self, lease: Lease, broken: bool = False) -> None:
        """Give the slot back; ``broken`` closes its connection.  If work of
        the lease still runs in a thread, the slot comes back when it ends."""
        if lease.busy is not None and not lease.busy.called:
            lease.busy.addBoth(lambda _: self.release(lease, broken))
            return
        self.in_use -= 1
        if broken or self.closed or self._too_old(lease):
            self._destroy(lease)
        else:
            self.idle.append((lease, self.clock.seconds()))
        self._fill()

    def reap(self) -> None:
        """Close connections idle too long or too old."""
        now = self.clock.seconds()
        keep: collections.deque[tuple[Lease, float]] = collections.deque()
        for lease, since in self.idle:
            if (self.idle_timeout is not None and now - since >= self.idle_timeout) or self._too_old(lease):
                self._destroy(lease)
            else:
                keep.append((lease, since))
        self.idle = keep

    def close(self, reason: Exception) -> None:
        self.closed = True
        self.closed_reason = reason
        while self.waiters:
            self.waiters.popleft().errback(reason)
        while self.idle:
            self._destroy(self.idle.popleft()[0])

    def _too_old(self, lease: Lease) -> bool:
        return self.max_age is not None and self.clock.seconds() - lease.created >= self.max_age

    def _destroy(self, lease: Lease) -> None:
        if self.destroy is not None and lease.conn is not None:
            self.destroy(lease.conn)

    def _fill(self) -> None:
        while self.waiters and self.idle:
            lease, _ = self.idle.pop()   # most recently used: warm, and lets the rest go idle
            if self._too_old(lease):
                self._destroy(lease)
                continue
            self.in_use += 1
            self.waiters.popleft().callback(lease)
        while len(self.waiters) > self.creating and self.total < self.size:
            self._start_create()

    def _start_create(self) -> None:
        if self.create is None:
            self.idle.append((Lease(None, self.clock.seconds()), self.clock.seconds()))
            self._fill()
            return
        self.creating += 1
        started = self.clock.seconds()

        def made(conn):
            self.creating -= 1
            self.idle.append((Lease(conn, started), self.clock.seconds()))
            if self.closed:
                self.close(self.closed_reason)
            self._fill()

        def failed(f):
            self.creating -= 1
            if self.waiters:
                self.waiters.popleft().errback(f)
            self._fill()

        defer.maybeDeferred(self.create).addCallbacks(made, failed)


# -- the adapter ----------------------------------------------------------------------

@dataclass
class _Attempt:
    op: str
    deadline: float
    request_id: str | None
    stage: str = "queued"        # queued (waiting for the pool or a connection) | calling
    probe: bool = False
    delay: float = 0.0


def detached(inner: Deferred) -> Deferred:
    """A Deferred with ``inner``'s result that can be cancelled without
    touching ``inner`` (for work that cannot be interrupted, like a thread)."""
    outer: Deferred[Any] = Deferred()

    def forward(result):
        if not outer.called:
            outer.callback(result) if not isinstance(result, Failure) else outer.errback(result)
        return None   # a late failure after cancellation is nobody's to report
    inner.addBoth(forward)
    return outer


class Adapter(Service):
    """Base of every ``[adapter:NAME]`` type.

    Built as ``cls(name, options, services)``: ``services``
    (:class:`msgd.services.Services`) gives the clock (``self.reactor``), the
    metrics and ``settings``.  Subclasses declare ``Options`` (extending
    :class:`AdapterOptions`) and may override :meth:`connect`/:meth:`disconnect` (pooled connections),
    :meth:`classify` (their library's exceptions → the error family) and set
    ``threaded = True`` to get ``self.threads`` and :meth:`in_thread`.
    """

    log = Logger()
    Options = AdapterOptions
    threaded = False
    name: str  # type: ignore[assignment]   # the section's NAME, always set (twisted's Service says None)

    def __init__(self, name: str, options, services: Services):
        self.name = name
        self.options = options
        self.services: Services = services
        self.reactor = services.reactor
        o = options
        self.breaker = Breaker(self.reactor, o.breaker_failures, o.breaker_reset, self._breaker_changed)
        self.pool = Pool(self.reactor, o.pool_size, o.pool_queue,
                         create=self._connect_bounded if type(self).connect is not Adapter.connect else None,
                         destroy=self.disconnect, idle=o.pool_idle, max_age=o.pool_max_age,
                         overloaded=lambda: AdapterOverloaded(self.name, f"more than {o.pool_queue} callers waiting",
                                                              retryable=True, sent=False))
        self.threads = ThreadPool(minthreads=0, maxthreads=o.pool_size, name=f"msgd-adapter-{name}") \
            if self.threaded else None
        self._reaper = LoopingCall(self.pool.reap)
        self._reaper.clock = self.reactor
        self.last_error: str | None = None
        self._series: dict = {}
        m = services.metrics
        self._calls = m.counter("msgd_adapter_calls_total", "Adapter calls by operation and outcome",
                                ["adapter", "op", "outcome"])
        self._errors = m.counter("msgd_adapter_errors_total", "Adapter call failures by error",
                                 ["adapter", "error"])
        self._retries = m.counter("msgd_adapter_retries_total", "Adapter call retries", ["adapter"])
        self._latency = m.histogram("msgd_adapter_call_seconds", "Adapter call latency", ["adapter", "op"])
        self._in_use = m.gauge("msgd_adapter_pool_in_use", "Pool slots in use", ["adapter"])
        self._waiting = m.gauge("msgd_adapter_pool_waiting", "Callers waiting for the pool", ["adapter"])
        self._state = m.gauge("msgd_adapter_breaker_open", "1 while the circuit breaker is open, "
                              "0.5 half-open, 0 closed", ["adapter"])
        self._in_use.labels(name).set_function(lambda: self.pool.in_use)
        self._waiting.labels(name).set_function(lambda: len(self.pool.waiters))
        self._state.labels(name).set_function(
            lambda: {Breaker.CLOSED: 0, Breaker.OPEN: 1, Breaker.HALF_OPEN: 0.5}[self.breaker.state])

    # -- service --------------------------------------------------------------

    def startService(self):
        super().startService()
        self.pool.closed = False
        if self.threads is not None:
            self.threads.start()
        interval = min(x for x in (self.options.pool_idle, self.options.pool_max_age, 60.0) if x)
        self._reaper.start(max(interval / 2, 0.5), now=False)

    def stopService(self):
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        self.pool.close(AdapterUnavailable(self.name, "adapter stopped", sent=False))
        if self.threads is not None and self.threads.started:
            # joins the threads: a blocking call still running is bounded by
            # the library timeouts each threaded adapter sets from ``timeout``
            self.threads.stop()

    def describe(self) -> dict:
        p = self.pool
        return {"type": getattr(self, "type_name", type(self).__name__), "running": bool(self.running),
                "breaker": self.breaker.state, "failures": self.breaker.failures,
                "pool": {"size": p.size, "in_use": p.in_use, "idle": len(p.idle), "waiting": len(p.waiters)},
                "last_error": self.last_error}

    # -- what subclasses provide ----------------------------------------------

    def connect(self) -> Deferred:
        """A new connection (a Deferred); override for pooled connections."""
        raise NotImplementedError

    def disconnect(self, conn) -> None:
        """Close a pooled connection."""

    def classify(self, e: BaseException) -> AdapterError:
        """Map one of the client library's exceptions into the family."""
        net = _network_error(e)
        if net is not None:
            return AdapterUnavailable(self.name, _text(e), retryable=True, sent=net[1])
        return AdapterRejected(self.name, _text(e))

    # -- helpers for subclasses ------------------------------------------------

    def in_thread(self, lease_or_none, fn: Callable, *args, **kwargs) -> Deferred:
        """Run blocking ``fn`` in this adapter's threads.  Cancelling the
        result does not stop the thread; the lease (if any) stays busy until
        the thread ends."""
        assert self.threads is not None, f"{type(self).__name__} is not threaded"
        inner = deferToThreadPool(self.reactor, self.threads, fn, *args, **kwargs)
        if lease_or_none is not None:
            lease_or_none.busy = inner
        return detached(inner)

    def hold(self, lease: Lease, inner: Deferred) -> Deferred:
        """Like :meth:`in_thread` for work started elsewhere (adbapi)."""
        lease.busy = inner
        return detached(inner)

    def _connect_bounded(self) -> Deferred:
        """A connection attempt, bounded by ``timeout`` whoever waits for
        it; its failure counts for the breaker even when nobody waits."""
        def failed(f):
            if f.check(defer.TimeoutError):
                err = AdapterUnavailable(self.name, f"connecting took more than {self.options.timeout:g}s",
                                         retryable=True, sent=False)
            else:
                err = f.value if isinstance(f.value, AdapterError) else self.classify(f.value)
            err.sent = False
            self.breaker.failure()
            self.last_error = f"cannot connect: {err.reason}"
            return Failure(err)
        d = defer.maybeDeferred(self.connect)
        d.addTimeout(self.options.timeout, self.reactor)
        return d.addErrback(failed)

    # -- the call ----------------------------------------------------------------

    def call(self, op: str, fn: Callable[[Any], Any], safe: bool = False, lease_fn: bool = False) -> Deferred:
        """Run ``fn(conn)`` (``fn(lease)`` with ``lease_fn``) under the
        rules above; ``op`` names the operation in metrics and logs, ``safe``
        says it may be repeated (idempotent).  A Deferred of its result."""
        req = current.get()
        now = self.reactor.seconds()
        if req is not None and req.deadline is not None:
            deadline = req.deadline
        else:
            deadline = now + self.options.timeout
        att = _Attempt(op, deadline, req.id if req is not None else None)
        if deadline <= now:
            return defer.fail(AdapterTimeout(self.name, f"{op}: deadline already passed", retryable=True,
                                             sent=False)).addBoth(self._finish, att, now)
        lease = self.pool.take_idle() if self.breaker.state == Breaker.CLOSED else None
        if lease is not None:
            # the common case, without the coroutine: a free connection and a
            # closed breaker; a failure continues in _attempts
            att.stage = "calling"
            d = defer.maybeDeferred(fn, lease if lease_fn else lease.conn)
            d.addCallbacks(self._succeeded, self._first_failed, callbackArgs=(lease,),
                           errbackArgs=(att, lease, fn, safe, lease_fn))
        else:
            d = Deferred.fromCoroutine(self._attempts(att, fn, safe, lease_fn))

        def on_timeout(result, timeout):
            return Failure(AdapterTimeout(self.name, f"{op} did not finish within {timeout:.3g}s",
                                          retryable=True, sent=att.stage != "calling"))
        d.addTimeout(deadline - now, self.reactor, onTimeoutCancel=on_timeout)
        d.addBoth(self._finish, att, now)
        return d

    def _succeeded(self, result, lease: Lease):
        self.pool.release(lease)
        self.breaker.success()
        return result

    def _first_failed(self, f: Failure, att: _Attempt, lease: Lease, fn, safe: bool, lease_fn: bool):
        err = self._call_failed(att, lease, f.value)
        if not self._may_retry(att, err, safe, 0):
            return Failure(err)
        return Deferred.fromCoroutine(self._attempts(att, fn, safe, lease_fn, attempt=1))

    def _call_failed(self, att: _Attempt, lease: Lease, e: BaseException) -> AdapterError:
        """Give the lease back after ``fn`` failed; the error to report
        (raises it at once when there is nothing more to decide)."""
        if isinstance(e, CancelledError):
            self.pool.release(lease, broken=True)   # its state is unknown
            raise e
        err = e if isinstance(e, AdapterError) else self.classify(e)
        if isinstance(err, AdapterRejected):
            self.pool.release(lease)
            self.breaker.success()     # the system works; the call was bad
            raise err from (None if err is e else e)
        self.pool.release(lease, broken=True)
        self.breaker.failure()
        self.last_error = err.reason
        return err

    def _may_retry(self, att: _Attempt, err: AdapterError, safe: bool, attempt: int) -> bool:
        """Retry only what is worth it and cannot do anything twice, within
        the deadline; ``att.delay`` is then the back-off to wait."""
        att.delay = self.options.retry_backoff * (2 ** attempt)
        return (err.retryable and (safe or not err.sent) and attempt < self.options.retries
                and self.breaker.state != Breaker.OPEN and self.reactor.seconds() + att.delay < att.deadline)

    async def _attempts(self, att: _Attempt, fn, safe: bool, lease_fn: bool, attempt: int = 0):
        if attempt:
            self._retries.labels(self.name).inc()
            await deferLater(self.reactor, att.delay)
        while True:
            att.stage, att.probe = "queued", False
            if not self.breaker.allow():
                raise CircuitOpen(self.name, f"circuit open after {self.breaker.failures} failure(s) "
                                  f"(last: {self.last_error}); next probe in {self.breaker.retry_in():.3g}s",
                                  retryable=True, sent=False)
            att.probe = self.breaker.state == Breaker.HALF_OPEN
            try:
                lease = await self.pool.acquire()
            except Exception as e:
                if isinstance(e, (CancelledError, AdapterOverloaded)) or self.pool.closed:
                    if att.probe:
                        self.breaker.abandoned()
                    raise
                err = e if isinstance(e, AdapterError) else self.classify(e)   # counted in _connect_bounded
                err.sent = False
            else:
                att.stage = "calling"
                try:
                    result = await defer.maybeDeferred(fn, lease if lease_fn else lease.conn)
                except Exception as e:
                    err = self._call_failed(att, lease, e)
                else:
                    return self._succeeded(result, lease)
            if not self._may_retry(att, err, safe, attempt):
                raise err
            attempt += 1
            self._retries.labels(self.name).inc()
            await deferLater(self.reactor, att.delay)

    def _finish(self, result, att: _Attempt, started: float):
        now = self.reactor.seconds()
        if isinstance(result, Failure):
            if result.check(CancelledError) and now >= att.deadline:
                # the caller gave up at the deadline (the dispatcher's own
                # timeout fired first): for the breaker that is a timeout
                result = Failure(AdapterTimeout(self.name, f"{att.op} did not finish within its deadline",
                                                retryable=True, sent=att.stage != "calling"))
                timed_out = True
            else:
                timed_out = result.check(AdapterTimeout) is not None
            if timed_out and att.stage == "calling":
                self.breaker.failure()
                self.last_error = f"{att.op} timed out"
            elif att.probe and result.check(CancelledError):
                self.breaker.abandoned()
            if result.check(AdapterError):
                err = result.value
                outcome = err.name if not isinstance(err, CircuitOpen) else "circuit_open"
                if not isinstance(err, (AdapterRejected, CircuitOpen)):
                    self.log.warn("adapter {adapter}: {op} failed: {reason} (request {request_id})",
                                  adapter=self.name, op=att.op, reason=err.reason, request_id=att.request_id)
            elif result.check(CancelledError):
                outcome = "cancelled"
            else:
                outcome = "internal_error"
                self.log.failure("adapter {adapter}: {op} failed (request {request_id})", result,
                                 adapter=self.name, op=att.op, request_id=att.request_id)
            if outcome != "cancelled":
                self._errors.labels(self.name, outcome).inc()
        else:
            outcome = "ok"
        series = self._series.get((att.op, outcome))
        if series is None:   # labels() is slow enough to matter on every call
            series = self._series[att.op, outcome] = (self._calls.labels(self.name, att.op, outcome),
                                                      self._latency.labels(self.name, att.op))
        series[0].inc()
        series[1].observe(now - started)
        return result

    def _breaker_changed(self, state: str) -> None:
        log = self.log.warn if state == Breaker.OPEN else self.log.info
        log("adapter {adapter}: circuit breaker {state}", adapter=self.name, state=state)


def _text(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
