"""apps/catalog.py: tested as its author would (AppHarness), then through
XML-RPC with xmlrpc.client, where structs become Products and strings
Decimals on the way in."""

import datetime
import os
import xmlrpc.client
from decimal import Decimal

from twisted.internet import defer, threads
from twisted.trial import unittest

from msgd.core import errors
from msgd.testing import AppHarness

from tests.helpers import ROOT, http_port, make_node


class CatalogTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"))
        self.mod = self.apps.apps.modules["catalog"].module
        self.mod._products.clear()
        self.mod._pictures.clear()
        self.P = self.mod.Product

    def add(self, sku, price, **kw):
        return self.apps.result("catalog.add", self.P(sku=sku, name=kw.pop("name", sku), price=Decimal(price), **kw))

    def test_add_get_search(self):
        self.add("B-1", "12.50", name="Book", tags=["paper"], stock=2)
        self.add("P-1", "1.20", name="Pen", description="writes like a book")
        self.add("L-1", "99", name="Lamp")
        book = self.apps.result("catalog.get", "B-1")
        self.assertEqual((book.name, book.price, book.tags), ("Book", Decimal("12.50"), ["paper"]))
        self.assertEqual(book.updated, datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc))
        self.assertEqual([p.sku for p in self.apps.result("catalog.search", "book")], ["P-1", "B-1"])
        self.assertEqual([p.sku for p in self.apps.result("catalog.search", tags=["paper"])], ["B-1"])
        self.assertEqual([p.sku for p in self.apps.result("catalog.search", max_price=Decimal(20))],
                         ["P-1", "B-1"])

    def test_prices_pictures_report(self):
        self.add("B-1", "12.50", stock=3)
        self.add("P-1", "1.20")
        self.apps.clock.advance(60)
        p = self.apps.result("catalog.set_price", "B-1", Decimal("10.00"))
        self.assertEqual(p.updated.minute, 1)
        self.assertEqual(self.apps.result("catalog.set_picture", "B-1", b"\x89PNG"), 4)
        self.assertEqual(self.apps.result("catalog.picture", "B-1"), b"\x89PNG")
        self.assertIsNone(self.apps.result("catalog.picture", "P-1"))
        self.assertEqual(self.apps.result("catalog.stock_report", 1),
                         [{"sku": "B-1", "stock": 3, "value": Decimal("30.00")}])
        self.assertEqual(len(self.apps.result("catalog.stock_report")), 2)
        self.assertTrue(self.apps.result("catalog.remove", "B-1"))
        self.assertFalse(self.apps.result("catalog.remove", "B-1"))

    def test_faults(self):
        e = self.assertRaises(errors.ApplicationError, self.apps.result, "catalog.get", "nope")
        self.assertEqual((e.code, e.data), (self.mod.NO_SUCH_PRODUCT, {"sku": "nope"}))
        e = self.assertRaises(errors.ApplicationError, self.add, "X", "-1")
        self.assertEqual(e.code, self.mod.BAD_PRODUCT)
        self.add("B-1", "1")
        self.assertRaises(errors.ApplicationError, self.apps.result, "catalog.set_picture", "B-1",
                          b"x" * (self.mod.MAX_PICTURE + 1))
        self.assertRaises(errors.InvalidParams, self.apps.result, "catalog.get", 5)


INI = """
[node]
name = catalog-test

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
"""

with open(os.path.join(ROOT, "apps", "catalog.py")) as _f:
    CATALOG = _f.read()


class CatalogOverXMLRPCTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, {"catalog.py": CATALOG})
        self.url = f"http://127.0.0.1:{http_port(self.node)}/RPC2"

    @defer.inlineCallbacks
    def test_round_trip(self):
        def run():
            with xmlrpc.client.ServerProxy(self.url, use_builtin_types=True) as p:
                added = p.catalog.add({"sku": "B-1", "name": "Book", "price": "12.50", "tags": ["paper"],
                                       "stock": 2})
                found = p.catalog.search("", ["paper"], "20")
                p.catalog.set_picture("B-1", b"\x00\x01")
                report = p.catalog.stock_report()
                try:
                    p.catalog.get("nope")
                except xmlrpc.client.Fault as f:
                    fault = f.faultCode
                return added, found, p.catalog.picture("B-1"), report, fault
        added, found, picture, report, fault = yield threads.deferToThread(run)
        self.assertEqual(added["price"], "12.50")              # Decimal travels as an exact string
        self.assertIsInstance(added["updated"], datetime.datetime)
        self.assertNotIn("description", added)                 # None: left out (nil is off)
        self.assertEqual([p["sku"] for p in found], ["B-1"])
        self.assertEqual(picture, b"\x00\x01")
        self.assertEqual(report, [{"sku": "B-1", "stock": 2, "value": "25.00"}])
        self.assertEqual(fault, -32020)


class CatalogOverJSONRPCTests(unittest.TestCase):
    """JSON-RPC carries a Product as a plain object; the dispatcher builds it."""

    def test_add_from_plain_object(self):
        import json
        from msgd.core.jsonrpc import JSONRPC
        harness = AppHarness(os.path.join(ROOT, "apps"))
        rpc = JSONRPC(harness.dispatcher)
        msg = {"jsonrpc": "2.0", "id": 1, "method": "catalog.add",
               "params": [{"sku": "json-1", "name": "Lamp", "price": "12.50", "stock": 3}]}
        answer = json.loads(self.successResultOf(rpc.handle(json.dumps(msg), harness.request)))
        self.assertEqual(answer["result"]["sku"], "json-1")
        self.assertEqual(answer["result"]["price"], "12.50")
        harness.result("catalog.remove", "json-1")
