"""The adapter contract on a task.Clock (an AppHarness's services, no
node): deadline, pool, retry, breaker, metrics — no sockets."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from twisted.internet import defer, error as neterror
from twisted.internet.task import Clock
from twisted.trial import unittest

from msgd.adapters import base
from msgd.config import option
from msgd.core import errors
from msgd.core.request import Request, current
from msgd.testing import AppHarness


class Conn:
    def __init__(self, n):
        self.n = n
        self.closed = False


class Stub(base.Adapter):
    """Connections come from ``self.connects`` (a list of Deferreds or
    exceptions) or are made at once."""

    @dataclass(frozen=True, kw_only=True)
    class Options(base.AdapterOptions):
        extra: str = option("x")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.made = []
        self.connects = []

    def connect(self):
        if self.connects:
            nxt = self.connects.pop(0)
            if isinstance(nxt, Exception):
                return defer.fail(nxt)
            return nxt
        c = Conn(len(self.made))
        self.made.append(c)
        return defer.succeed(c)

    def disconnect(self, conn):
        conn.closed = True


def make(testcase, **opts) -> tuple[Stub, Clock]:
    """An adapter on the services of an AppHarness (a task.Clock, its own
    metrics): no node."""
    apps = os.path.abspath(testcase.mktemp())
    os.makedirs(apps)
    services = AppHarness(apps)
    options = replace(Stub.Options(), **opts)
    a = Stub("svc", options, services)
    a.startService()
    testcase.addCleanup(lambda: a.stopService() if a.running else None)
    return a, services.clock


def in_request(clock, timeout, fn):
    req = Request.with_timeout("test", clock, timeout)
    token = current.set(req)
    try:
        return fn()
    finally:
        current.reset(token)


class DeadlineTests(unittest.TestCase):
    def test_inherits_request_deadline_and_cancels(self):
        a, clock = make(self, timeout=100)
        cancelled = []
        work = defer.Deferred(cancelled.append)
        d = in_request(clock, 3, lambda: a.call("op", lambda conn: work))
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        f = self.failureResultOf(d, base.AdapterTimeout)
        self.assertIsInstance(f.value, errors.Timeout)
        self.assertEqual(f.value.adapter, "svc")
        self.assertTrue(f.value.retryable)
        self.assertEqual(cancelled, [work])   # the work was cancelled, not left running

    def test_outside_request_uses_adapter_timeout(self):
        a, clock = make(self, timeout=7)
        d = a.call("op", lambda conn: defer.Deferred())
        clock.advance(6.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, base.AdapterTimeout)

    def test_expired_request_fails_at_once(self):
        a, clock = make(self)
        calls = []
        d = in_request(clock, 0, lambda: a.call("op", calls.append))
        self.failureResultOf(d, base.AdapterTimeout)
        self.assertEqual(calls, [])

    def test_result(self):
        a, clock = make(self)
        d = a.call("op", lambda conn: ("ok", conn.n))
        self.assertEqual(self.successResultOf(d), ("ok", 0))


class PoolTests(unittest.TestCase):
    def test_bounded_and_queued(self):
        a, clock = make(self, pool_size=2)
        works = [defer.Deferred() for _ in range(3)]
        ds = [a.call("op", lambda conn, w=w: w) for w in works]
        self.assertEqual((a.pool.in_use, len(a.pool.waiters)), (2, 1))
        self.assertEqual(len(a.made), 2)
        works[0].callback("a")
        self.assertEqual(self.successResultOf(ds[0]), "a")
        self.assertEqual((a.pool.in_use, len(a.pool.waiters)), (2, 0))   # the third got the freed connection
        works[2].callback("c")
        works[1].callback("b")
        self.assertEqual([self.successResultOf(d) for d in ds[1:]], ["b", "c"])
        self.assertEqual(len(a.made), 2)
        self.assertEqual(a.pool.in_use, 0)

    def test_queue_bound_fails_fast(self):
        a, clock = make(self, pool_size=1, pool_queue=1)
        a.call("op", lambda conn: defer.Deferred())
        a.call("op", lambda conn: defer.Deferred()).addErrback(lambda f: None)   # fails when stopped
        f = self.failureResultOf(a.call("op", lambda conn: 1), base.AdapterOverloaded)
        self.assertIsInstance(f.value, errors.Overloaded)

    def test_waiter_bounded_by_its_deadline(self):
        a, clock = make(self, pool_size=1, timeout=100)
        a.call("op", lambda conn: defer.Deferred())
        d = in_request(clock, 2, lambda: a.call("op", lambda conn: 1))
        self.assertEqual(len(a.pool.waiters), 1)
        clock.advance(2)
        self.failureResultOf(d, base.AdapterTimeout)
        self.assertEqual(len(a.pool.waiters), 0)
        self.assertEqual(a.breaker.failures, 0)   # waiting in the queue is not the system's fault

    def test_idle_and_old_connections_closed(self):
        a, clock = make(self, pool_idle=10, pool_max_age=100)
        self.successResultOf(a.call("op", lambda conn: None))
        first = a.made[0]
        clock.advance(11)
        self.assertTrue(first.closed)
        self.successResultOf(a.call("op", lambda conn: None))
        second = a.made[1]
        for _ in range(14):
            clock.advance(8)
            self.successResultOf(a.call("op", lambda conn: None))
        self.assertTrue(second.closed)       # replaced once past max age
        self.assertGreater(len(a.made), 2)

    def test_busy_thread_keeps_its_slot(self):
        a, clock = make(self, pool_size=1)
        inner = defer.Deferred()   # stands for a thread that cannot be interrupted
        d = in_request(clock, 1, lambda: a.call("op", lambda lease: a.hold(lease, inner), lease_fn=True))
        clock.advance(1)
        self.failureResultOf(d, base.AdapterTimeout)
        self.assertEqual(a.pool.in_use, 1)          # still taken by the running thread
        waiting = a.call("op", lambda conn: "next")
        self.assertNoResult(waiting)
        inner.callback("late")                      # the thread ends; its result is dropped
        self.assertEqual(self.successResultOf(waiting), "next")

    def test_stop_fails_waiters_and_closes(self):
        a, clock = make(self, pool_size=1)
        self.successResultOf(a.call("op", lambda conn: None))
        a.call("op", lambda conn: defer.Deferred())
        w = a.call("op", lambda conn: 1)
        a.stopService()
        f = self.failureResultOf(w, base.AdapterUnavailable)
        self.assertIn("stopped", f.value.reason)


class RetryTests(unittest.TestCase):
    def test_connect_failure_retried_with_backoff(self):
        a, clock = make(self, retries=2, retry_backoff=0.5)
        a.connects = [neterror.ConnectionRefusedError()]
        d = a.call("write", lambda conn: "done")      # not safe, but nothing was sent
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(a.services.metrics.value("msgd_adapter_retries_total", {"adapter": "svc"}), 1)

    def test_unsafe_not_retried_after_sending(self):
        a, clock = make(self, retries=2)
        calls = []

        def fn(conn):
            calls.append(conn)
            raise neterror.ConnectionLost()
        f = self.failureResultOf(a.call("write", fn), base.AdapterUnavailable)
        self.assertEqual(len(calls), 1)
        self.assertTrue(f.value.retryable)
        self.assertTrue(calls[0].closed)   # a connection that failed is not reused

    def test_safe_retried_then_gives_up(self):
        a, clock = make(self, retries=2, retry_backoff=1)
        calls = []

        def fn(conn):
            calls.append(conn)
            raise neterror.ConnectionLost()
        d = a.call("read", fn, safe=True)
        clock.advance(1)
        clock.advance(2)
        self.failureResultOf(d, base.AdapterUnavailable)
        self.assertEqual(len(calls), 3)

    def test_retry_never_past_deadline(self):
        a, clock = make(self, retries=5, retry_backoff=1, timeout=100)
        calls = []

        def fn(conn):
            calls.append(conn)
            raise neterror.ConnectionLost()
        d = in_request(clock, 2.5, lambda: a.call("read", fn, safe=True))
        clock.advance(1)   # second try at 1; a third at 3 would pass the deadline
        self.failureResultOf(d, base.AdapterUnavailable)
        self.assertEqual(len(calls), 2)

    def test_fast_path_failure_retried(self):
        # with a free connection the call skips the queue; its failure still retries
        a, clock = make(self, retries=1, retry_backoff=1)
        self.successResultOf(a.call("op", lambda conn: None))
        calls = []

        def fn(conn):
            calls.append(conn)
            if len(calls) == 1:
                raise neterror.ConnectionLost()
            return "ok"
        d = a.call("read", fn, safe=True)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertTrue(calls[0].closed)
        self.assertIsNot(calls[1], calls[0])

    def test_fast_path_timeout(self):
        a, clock = make(self, timeout=100, breaker_failures=1)
        self.successResultOf(a.call("op", lambda conn: None))
        d = in_request(clock, 1, lambda: a.call("op", lambda conn: defer.Deferred()))
        clock.advance(1)
        self.failureResultOf(d, base.AdapterTimeout)
        self.assertTrue(a.made[0].closed)
        self.assertEqual((a.pool.in_use, a.breaker.state), (0, "open"))

    def test_rejection_not_retried_nor_counted(self):
        a, clock = make(self, breaker_failures=1)

        def fn(conn):
            raise ValueError("bad query")
        f = self.failureResultOf(a.call("read", fn, safe=True), base.AdapterRejected)
        self.assertFalse(f.value.retryable)
        self.assertIsInstance(f.value, errors.ApplicationError)
        self.assertEqual(a.breaker.state, "closed")
        self.assertFalse(a.made[0].closed)


class BreakerTests(unittest.TestCase):
    def down(self, a, n):
        for _ in range(n):
            a.connects.append(neterror.ConnectionRefusedError())
            self.failureResultOf(a.call("op", lambda conn: 1), base.AdapterUnavailable)

    def test_opens_fails_fast_probes_and_closes(self):
        a, clock = make(self, retries=0, breaker_failures=3, breaker_reset=10)
        self.down(a, 3)
        self.assertEqual(a.breaker.state, "open")
        self.assertEqual(a.describe()["breaker"], "open")
        calls = []
        f = self.failureResultOf(a.call("op", calls.append), base.CircuitOpen)
        self.assertIsInstance(f.value, errors.Unavailable)
        self.assertEqual(calls, [])
        clock.advance(10)
        probe = defer.Deferred()
        d1 = a.call("op", lambda conn: probe)
        self.failureResultOf(a.call("op", lambda conn: 2), base.CircuitOpen)   # one probe at a time
        probe.callback(1)
        self.assertEqual(self.successResultOf(d1), 1)
        self.assertEqual(a.breaker.state, "closed")
        self.assertEqual(self.successResultOf(a.call("op", lambda conn: 3)), 3)

    def test_failed_probe_reopens(self):
        a, clock = make(self, retries=0, breaker_failures=1, breaker_reset=5)
        self.down(a, 1)
        clock.advance(5)
        self.down(a, 1)
        self.assertEqual(a.breaker.state, "open")
        self.failureResultOf(a.call("op", lambda conn: 1), base.CircuitOpen)

    def test_timeouts_open_the_breaker(self):
        a, clock = make(self, retries=0, breaker_failures=2, timeout=1)
        for _ in range(2):
            d = a.call("op", lambda conn: defer.Deferred())
            clock.advance(1)
            self.failureResultOf(d, base.AdapterTimeout)
        self.failureResultOf(a.call("op", lambda conn: 1), base.CircuitOpen)

    def test_caller_cancel_at_deadline_counts_as_timeout(self):
        # the dispatcher's own timeout may fire first and cancel the call
        a, clock = make(self, retries=0, breaker_failures=1, timeout=100)
        d = in_request(clock, 1, lambda: a.call("op", lambda conn: defer.Deferred()))
        clock.advance(1)   # our own timeout fires here too; cancel is what the dispatcher would do
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(a.breaker.state, "open")


class MetricsTests(unittest.TestCase):
    def test_counts_and_describe(self):
        a, clock = make(self)
        self.successResultOf(a.call("get", lambda conn: 1))
        self.failureResultOf(a.call("get", lambda conn: 1 / 0), base.AdapterRejected)
        m = a.services.metrics
        self.assertEqual(m.value("msgd_adapter_calls_total", {"adapter": "svc", "op": "get", "outcome": "ok"}), 1)
        self.assertEqual(m.value("msgd_adapter_errors_total", {"adapter": "svc", "error": "application_error"}), 1)
        self.assertEqual(m.value("msgd_adapter_call_seconds_count", {"adapter": "svc", "op": "get"}), 2)
        a.call("get", lambda conn: defer.Deferred())
        self.assertEqual(m.value("msgd_adapter_pool_in_use", {"adapter": "svc"}), 1)
        self.assertEqual(m.value("msgd_adapter_breaker_open", {"adapter": "svc"}), 0)
        text = m.render().decode()
        self.assertIn('msgd_adapter_pool_in_use{adapter="svc"} 1.0', text)
        self.assertIn('msgd_adapter_breaker_open{adapter="svc"} 0.0', text)
        desc = a.describe()
        self.assertEqual(desc["pool"]["in_use"], 1)
        self.assertEqual(desc["breaker"], "closed")

    def test_error_names_adapter(self):
        a, clock = make(self)
        f = self.failureResultOf(a.call("get", lambda conn: 1 / 0), base.AdapterRejected)
        self.assertEqual(f.value.to_dict()["data"], {"adapter": "svc", "retryable": False})
        self.assertIn("adapter svc", f.value.message)


class TransactionTests(unittest.TestCase):
    """api.transaction(): parallel, all or a failure naming the participant,
    bounded by the deadline."""

    def tx(self, clock, timeout=10):
        from msgd import api
        return in_request(clock, timeout, api.transaction)

    def test_all_results_in_parallel(self):
        clock = Clock()
        a, b = defer.Deferred(), defer.Deferred()
        started = []
        t = self.tx(clock).add("a", lambda: started.append("a") or a).add("b", lambda: started.append("b") or b)
        t.add("c", lambda x: x * 2, 21)
        d = t.execute()
        self.assertEqual(started, ["a", "b"])     # both running before either answered
        b.callback("B")
        self.assertNoResult(d)
        a.callback("A")
        self.assertEqual(self.successResultOf(d), {"a": "A", "b": "B", "c": 42})

    def test_failure_names_participant_and_cancels_others(self):
        clock = Clock()
        cancelled = []
        slow = defer.Deferred(cancelled.append)
        failing = defer.Deferred()
        d = self.tx(clock).add("slow", lambda: slow).add("cache", lambda: failing).execute()
        failing.errback(base.AdapterUnavailable("cache", "down", retryable=True))
        f = self.failureResultOf(d, api_failed())
        self.assertEqual(f.value.participant, "cache")
        self.assertEqual((f.value.code, f.value.name), (errors.Unavailable.code, "unavailable"))
        self.assertEqual(f.value.data, {"participant": "cache", "adapter": "cache", "retryable": True})
        self.assertTrue(f.value.retryable)
        self.assertEqual(cancelled, [slow])

    def test_bounded_by_deadline(self):
        clock = Clock()
        d = self.tx(clock, timeout=3).add("done", lambda: 1).add("stuck", defer.Deferred).execute()
        clock.advance(3)
        f = self.failureResultOf(d, api_failed())
        self.assertEqual((f.value.participant, f.value.name), ("stuck", "timeout"))

    def test_bug_in_participant_is_internal_error(self):
        d = self.tx(Clock()).add("bad", lambda: 1 / 0).execute()
        f = self.failureResultOf(d, api_failed())
        self.assertEqual(f.value.code, errors.InternalError.code)
        self.assertNotIn("division", f.value.message)     # no internals to the client; logged instead
        self.flushLoggedErrors(ZeroDivisionError)

    def test_with_real_adapter_calls(self):
        a, clock = make(self)
        from msgd import api

        def body():
            t = api.transaction()
            t.add("x", a.call, "get", lambda conn: "X").add("y", a.call, "get", lambda conn: defer.Deferred())
            return t.execute()
        d = in_request(clock, 2, body)
        clock.advance(2)    # y hangs: the adapter's deadline (the request's) ends it
        f = self.failureResultOf(d, api_failed())
        self.assertEqual(f.value.participant, "y")
        self.assertEqual(f.value.name, "timeout")


def api_failed():
    from msgd.core.transaction import TransactionFailed
    return TransactionFailed
