"""The example app modules, tested as app authors would test theirs."""

import os

from twisted.trial import unittest

from msgd.core import errors
from msgd.testing import AppHarness

from tests.helpers import ROOT


class OrdersTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"), principal="alice")
        self.mod = self.apps.apps.modules["orders"].module
        self.mod._orders.clear()

    def test_place_get_cancel(self):
        order = self.apps.result("orders.place", "book", 2)
        self.assertEqual((order["item"], order["qty"], order["status"], order["by"]), ("book", 2, "open", "alice"))
        self.assertEqual(self.apps.result("orders.get", order["id"]), order)
        self.assertEqual(self.apps.result("orders.cancel", order["id"])["status"], "cancelled")
        e = self.assertRaises(errors.ApplicationError, self.apps.result, "orders.cancel", order["id"])
        self.assertEqual(e.code, -32012)

    def test_bad_input(self):
        e = self.assertRaises(errors.ApplicationError, self.apps.result, "orders.place", "book", 0)
        self.assertEqual((e.code, e.data), (-32010, {"qty": 0}))
        self.assertRaises(errors.InvalidParams, self.apps.result, "orders.place", " ")
        self.assertRaises(errors.InvalidParams, self.apps.result, "orders.place", "book", "2")
        self.assertRaises(errors.ApplicationError, self.apps.result, "orders.get", 999)

    def test_summary_and_list(self):
        self.apps.result("orders.place", "book", 2)
        self.apps.result("orders.place", "pen", 1)
        self.apps.result("orders.place", "book", 3)
        self.assertEqual(self.apps.result("orders.summary"), {"items": {"book": 5, "pen": 1}, "orders": 3})
        self.assertEqual(len(self.apps.result("orders.list_open")), 3)

    def test_state_survives_reload(self):
        first = self.apps.result("orders.place", "book", 1)
        new = self.mod.__dict__.copy()
        # a reload executes the file again and hands over the previous module
        import types
        fresh = types.ModuleType("fresh")
        with open(os.path.join(ROOT, "apps", "orders.py")) as f:
            exec(compile(f.read(), "orders.py", "exec"), fresh.__dict__)
        fresh.__reload__(self.mod)
        self.assertIs(fresh._orders, new["_orders"])
        self.assertEqual(fresh._orders[first["id"]]["item"], "book")


class UtilTests(unittest.TestCase):
    def test_wait_honours_clock(self):
        apps = AppHarness(os.path.join(ROOT, "apps"), timeout=5)
        d = apps.call("util.wait", 2)
        self.assertNoResult(d)
        apps.clock.advance(2)
        self.assertEqual(self.successResultOf(d), 2)
        d = apps.call("util.wait", 10)
        apps.clock.advance(5)
        self.failureResultOf(d, errors.Timeout)
