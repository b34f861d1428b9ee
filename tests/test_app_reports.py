"""apps/reports.py, as an app author would test it, and run by a schedule."""

import os

from twisted.trial import unittest

from msgd.testing import AppHarness

from tests.helpers import ROOT


class ReportsTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"), principal="alice")
        self.orders = self.apps.apps.modules["orders"].module
        self.orders._orders.clear()
        self.apps.apps.modules["reports"].module._last.clear()

    def test_publishes_changes_only(self):
        self.apps.result("orders.place", "book", 2)
        report = self.apps.result("reports.orders_summary")
        self.assertEqual((report["items"], report["orders"]), ({"book": 2}, 1))
        self.assertEqual(self.apps.result("reports.orders_summary"), {})      # nothing new
        self.apps.result("orders.place", "pen", 1)
        self.assertEqual(self.apps.result("reports.orders_summary")["items"], {"book": 2, "pen": 1})
        self.assertEqual([c for c, _ in self.apps.published], ["reports.orders", "reports.orders"])
        self.assertEqual(self.apps.result("reports.orders_summary", always=True)["orders"], 2)
