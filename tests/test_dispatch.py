import os
import threading

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from msgd.core import errors
from msgd.core.apps import AppRegistry
from msgd.core.dispatch import Dispatcher
from msgd.core.metrics import Metrics
from msgd.core.request import Request

from tests.helpers import write

APP = '''
import threading
from twisted.internet import defer
from msgd import api

cancelled = []

def add(a: int, b: int = 0) -> int:
    return a + b

def named(*, x: str, y: float | None = None):
    return [x, y]

def anything(x, *rest, **kw):
    return [x, list(rest), kw]

def deferred(v):
    return defer.succeed(v * 2)

async def coro(v):
    r = await defer.succeed(v)
    return [r, api.request().id]

def never():
    return defer.Deferred(lambda d: cancelled.append("never"))

async def slow_async():
    await api.sleep(100)
    return "late"

def fails():
    raise api.AppError("out of stock", code=-32010, data={"sku": 1})

def crashes():
    return 1 / 0

def who():
    return api.request().interface

@api.blocking
def in_thread():
    req = api.request()
    return [threading.current_thread().name, req.interface, req.id]

def nested():
    return api.call("m.add", 2, 3)

def sequences(xs: list[int], pair: tuple[int, ...] = (), maybe: list | None = None):
    return [type(v).__name__ for v in (xs, pair, maybe)]

import dataclasses, decimal

@dataclasses.dataclass
class Item:
    sku: str
    price: decimal.Decimal
    tags: list[str] = dataclasses.field(default_factory=list)

def total(items: list[Item], discount: decimal.Decimal = decimal.Decimal(0)) -> str:
    return str(sum(i.price for i in items) - discount)
'''


class DispatchTests(unittest.TestCase):
    def setUp(self):
        d = os.path.abspath(self.mktemp())
        write(os.path.join(d, "m.py"), APP)
        self.clock = Clock()
        self.apps = AppRegistry(d, self.clock, interval=0)
        self.apps.scan()
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.apps, self.clock, self.inline, metrics=self.metrics)
        self.mod = self.apps.modules["m"].module

    def inline(self, fn, *a, **kw):
        return defer.maybeDeferred(fn, *a, **kw)

    def request(self, timeout=10.0):
        return Request.with_timeout("test", self.clock, timeout, services=self)

    def call(self, target, *args, **kwargs):
        return self.dispatcher.call(self.request(), target, args, kwargs)

    def result(self, target, *args, **kwargs):
        return self.successResultOf(self.call(target, *args, **kwargs))

    def error(self, target, *args, **kwargs):
        return self.failureResultOf(self.call(target, *args, **kwargs), errors.MsgdError).value

    def test_plain_deferred_coroutine(self):
        self.assertEqual(self.result("m.add", 1, 2), 3)
        self.assertEqual(self.result("m.add", a=1), 1)
        self.assertEqual(self.result("m.deferred", 4), 8)
        value, rid = self.result("m.coro", 5)
        self.assertEqual(value, 5)
        self.assertTrue(rid)

    def test_current_request(self):
        self.assertEqual(self.result("m.who"), "test")

    def test_nested_call_shares_request_context(self):
        self.assertEqual(self.result("m.nested"), 5)

    def test_not_found(self):
        e = self.error("m.nope")
        self.assertIsInstance(e, errors.NotFound)
        self.assertEqual(e.code, -32601)
        self.assertIsInstance(self.error("nomodule.f"), errors.NotFound)

    def test_invalid_params(self):
        for args, kwargs in [((1, 2, 3), {}), ((), {}), ((), {"zz": 1}), (("x",), {}), ((1.5,), {}),
                             ((True,), {})]:
            e = self.error("m.add", *args, **kwargs)
            self.assertIsInstance(e, errors.InvalidParams, (args, kwargs))
            self.assertEqual(e.code, -32602)
        self.assertIsInstance(self.error("m.named", x=1), errors.InvalidParams)
        self.assertEqual(self.result("m.named", x="a", y=2), ["a", 2])
        self.assertEqual(self.result("m.named", x="a", y=None), ["a", None])
        self.assertEqual(self.result("m.anything", 1, 2, k=3), [1, [2], {"k": 3}])

    def test_structures_built_from_hints(self):
        """JSON objects become the dataclasses the hints name, strings and
        numbers Decimals, positional or by name."""
        items = [{"sku": "a", "price": "1.10"}, {"sku": "b", "price": 2, "tags": ["x"]}]
        self.assertEqual(self.result("m.total", items), "3.10")
        self.assertEqual(self.result("m.total", items=items, discount="0.10"), "3.00")
        e = self.error("m.total", [{"sku": "a", "price": "1", "colour": "red"}])
        self.assertIsInstance(e, errors.InvalidParams)
        self.assertIn("colour", e.message)
        self.assertIsInstance(self.error("m.total", [{"sku": "a", "price": "cheap"}]), errors.InvalidParams)
        self.assertIsInstance(self.error("m.total", [{"price": "1"}]), errors.InvalidParams)

    def test_list_and_tuple_stand_for_each_other(self):
        """PB carries tuples, JSON only lists: a parameter hinted ``list``
        takes a tuple (as a list), one hinted ``tuple`` a list (as a tuple)."""
        self.assertEqual(self.result("m.sequences", (1, 2)), ["list", "tuple", "NoneType"])
        self.assertEqual(self.result("m.sequences", [1], [2], (3,)), ["list", "tuple", "list"])
        self.assertEqual(self.result("m.sequences", xs=(1,), pair=[2]), ["list", "tuple", "NoneType"])
        for bad in ("12", {1, 2}, {"a": 1}):
            self.assertIsInstance(self.error("m.sequences", bad), errors.InvalidParams)

    def test_params_shape(self):
        d = self.dispatcher.call(self.request(), "m.add", "notalist", {})
        self.assertIsInstance(self.failureResultOf(d).value, errors.InvalidParams)

    def test_app_error(self):
        e = self.error("m.fails")
        self.assertIsInstance(e, errors.ApplicationError)
        self.assertEqual(e.to_dict(), {"code": -32010, "message": "out of stock", "data": {"sku": 1}})

    def test_internal_error_hides_traceback(self):
        e = self.error("m.crashes")
        self.assertIsInstance(e, errors.InternalError)
        self.assertNotIn("ZeroDivision", e.message)
        self.assertIn("request", e.message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_deadline_cancels_work(self):
        req = self.request(timeout=5)
        d = self.dispatcher.call(req, "m.never", (), {})
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        e = self.failureResultOf(d, errors.Timeout).value
        self.assertEqual(e.code, -32002)
        self.assertEqual(self.mod.cancelled, ["never"])
        self.assertTrue(req.cancelled)
        self.assertEqual(self.dispatcher.in_flight, 0)

    def test_deadline_cancels_async_sleep(self):
        d = self.dispatcher.call(self.request(timeout=1), "m.slow_async", (), {})
        self.clock.advance(1)
        self.failureResultOf(d, errors.Timeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])   # the sleep was cancelled too

    def test_expired_before_start(self):
        req = self.request(timeout=1)
        self.clock.advance(2)
        d = self.dispatcher.call(req, "m.add", (1,), {})
        self.failureResultOf(d, errors.Timeout)

    def test_caller_cancel(self):
        d = self.call("m.never")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.dispatcher.in_flight, 0)

    def test_drained(self):
        d = self.call("m.never")
        drained = self.dispatcher.drained()
        self.assertNoResult(drained)
        self.clock.advance(11)
        self.successResultOf(drained)
        self.failureResultOf(d, errors.Timeout)

    def test_authorize_hook(self):
        def authorize(request, target):
            if target.endswith("add"):
                raise errors.Unauthorized()
        self.dispatcher.authorize = authorize
        self.assertIsInstance(self.error("m.add", 1), errors.Unauthorized)
        self.assertEqual(self.result("m.deferred", 1), 2)

    def test_metrics(self):
        self.result("m.add", 1)
        self.error("m.fails")
        self.error("m.zz")
        v = self.metrics.value
        self.assertEqual(v("msgd_requests_total", {"interface": "test", "target": "m.add", "outcome": "ok"}), 1)
        self.assertEqual(v("msgd_requests_total", {"interface": "test", "target": "m.fails",
                                                   "outcome": "application_error"}), 1)
        self.assertEqual(v("msgd_requests_total", {"interface": "test", "target": "unknown",
                                                   "outcome": "not_found"}), 1)
        self.assertEqual(v("msgd_request_duration_seconds_count", {"interface": "test", "target": "m.add"}), 1)


class BlockingTests(unittest.TestCase):
    """Blocking functions run in a real thread pool, with the request."""

    def setUp(self):
        d = os.path.abspath(self.mktemp())
        write(os.path.join(d, "m.py"), APP)
        self.apps = AppRegistry(d, reactor, interval=0)
        self.apps.scan()
        self.pool = ThreadPool(0, 2, name="test-pool")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dispatcher = Dispatcher(self.apps, reactor,
                                     lambda f, *a, **kw: deferToThreadPool(reactor, self.pool, f, *a, **kw))

    @defer.inlineCallbacks
    def test_blocking_runs_in_pool_with_request(self):
        req = Request.with_timeout("thready", reactor, 10)
        name, interface, rid = yield self.dispatcher.call(req, "m.in_thread", (), {})
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertIn("test-pool", name)
        self.assertEqual((interface, rid), ("thready", req.id))
