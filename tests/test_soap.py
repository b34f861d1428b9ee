"""SOAP under /soap/, called with zeep (a real SOAP client, in a thread) and
with raw envelopes for the fault forms."""

import datetime
import json
import os
from decimal import Decimal

import zeep
import zeep.exceptions
from lxml import etree
from twisted.internet import defer, threads
from twisted.trial import unittest

from msgd.core import errors
from msgd.interfaces.soap import SOAP11, SOAP12
from msgd.xml.soap import Service

from tests.helpers import ROOT, disconnect_cancels, http, http_port, make_node, write

INI = """
[node]
name = soap-test
request_timeout = 5s
reload_interval = 0

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 64KiB
"""

with open(os.path.join(ROOT, "apps", "catalog.py")) as _f:
    CATALOG = _f.read()
with open(os.path.join(ROOT, "apps", "orders.py")) as _f:
    ORDERS = _f.read()

T_V1 = '''
def f(a: int) -> int:
    """Double a."""
    return a * 2

def boom():
    raise ZeroDivisionError("secret")

def total(values: list[int]) -> int:
    return sum(values)

def count(items: list) -> int:
    return len(items)

calls = []

async def hold():
    from msgd import api
    calls.append("started")
    try:
        await api.sleep(30)
    except BaseException:
        calls.append("cancelled")
        raise
'''

T_V2 = '''
def f(a: int, label: str) -> str:
    return f"{label}={a}"

def boom():
    raise ZeroDivisionError("secret")
'''

FAULT_NS = "{urn:msgd}"


def envelope(version, body, header=""):
    return (f'<e:Envelope xmlns:e="{version}" xmlns:t="urn:msgd:t">{header}<e:Body>{body}</e:Body>'
            f'</e:Envelope>').encode()


class SOAPCase(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, {"catalog.py": CATALOG, "orders.py": ORDERS, "t.py": T_V1})
        self.port = http_port(self.node)
        self.base = f"http://127.0.0.1:{self.port}/soap/"

    def zeep(self, module, port_name, fn):
        """Run ``fn(service)`` with a zeep client bound to ``port_name`` of
        ``module``'s WSDL, in a thread; the Fault or the result."""
        def run():
            client = zeep.Client(self.base + module + "?wsdl")
            try:
                return fn(client.bind(module, port_name), client)
            except zeep.exceptions.Fault as f:
                return f
        return threads.deferToThread(run)

    def post(self, version, body, module="t"):
        ctype = "text/xml" if version == SOAP11 else "application/soap+xml"
        return http("POST", self.base + module, body, {"content-type": ctype})


class ZeepTests(SOAPCase):
    """Every operation of apps/catalog.py through both bindings."""

    def every_operation(self, binding):
        def run(svc, client):
            out = {}
            added = svc.add(product={"sku": "B-1", "name": "Book", "price": Decimal("12.50"),
                                     "tags": ["paper", "new"], "stock": 3})
            out["added"] = added
            svc.add(product={"sku": "P-1", "name": "Pen", "price": Decimal("1.20"),
                             "description": "a blue book pen"})
            out["get"] = svc.get(sku="B-1")
            out["search"] = [p.sku for p in svc.search(text="book")]
            out["search_tags"] = [p.sku for p in svc.search(tags=["paper"])]
            out["search_price"] = [p.sku for p in svc.search(max_price=Decimal("2"))]
            out["set_price"] = svc.set_price(sku="P-1", price=Decimal("1.25")).price
            out["set_picture"] = svc.set_picture(sku="B-1", data=b"\x89PNG\x00\xff")
            out["picture"] = svc.picture(sku="B-1")
            out["no_picture"] = svc.picture(sku="P-1")
            out["report"] = [(r.sku, r.stock, r.value) for r in svc.stock_report(min_stock=1)]
            try:
                svc.get(sku="nope")
            except zeep.exceptions.Fault as f:
                out["fault"] = (f.message, f.detail.find(f"{FAULT_NS}error/{FAULT_NS}code").text,
                                f.detail.find(f"{FAULT_NS}error/{FAULT_NS}name").text)
            try:
                svc.add(product={"sku": "X", "name": "X", "price": Decimal("-1")})
            except zeep.exceptions.Fault as f:
                out["bad"] = f.detail.find(f"{FAULT_NS}error/{FAULT_NS}code").text
            out["remove"] = (svc.remove(sku="P-1"), svc.remove(sku="P-1"))
            return out
        return self.zeep("catalog", "catalog" + binding, run)

    @defer.inlineCallbacks
    def check(self, binding):
        out = yield self.every_operation(binding)
        added = out["added"]
        self.assertEqual((added.sku, added.name, added.price, added.tags, added.stock, added.description),
                         ("B-1", "Book", Decimal("12.50"), ["paper", "new"], 3, None))
        self.assertIsInstance(added.updated, datetime.datetime)
        self.assertEqual(out["get"].tags, ["paper", "new"])
        self.assertEqual(out["search"], ["P-1", "B-1"])
        self.assertEqual(out["search_tags"], ["B-1"])
        self.assertEqual(out["search_price"], ["P-1"])
        self.assertEqual(out["set_price"], Decimal("1.25"))
        self.assertEqual(out["set_picture"], 6)
        self.assertEqual(out["picture"], b"\x89PNG\x00\xff")
        self.assertIsNone(out["no_picture"])
        self.assertEqual(out["report"], [("B-1", 3, Decimal("37.50"))])
        self.assertEqual(out["fault"], ("no product 'nope'", "-32020", "application_error"))
        self.assertEqual(out["bad"], "-32021")
        self.assertEqual(out["remove"], (True, False))

    def test_soap11(self):
        return self.check("Soap11")

    def test_soap12(self):
        return self.check("Soap12")

    @defer.inlineCallbacks
    def test_wsdl_follows_reload(self):
        code, headers, wsdl = yield http("GET", self.base + "t?wsdl")
        self.assertEqual(code, 200)
        self.assertNotIn(b'name="label"', wsdl)
        self.assertIn(f'location="{self.base}t"'.encode(), wsdl)
        self.assertEqual((yield self.zeep("t", "tSoap11", lambda s, c: s.f(a=4))), 8)
        write(os.path.join(self.node.config.node.apps, "t.py"), T_V2)
        self.node.apps.scan()
        code, headers, wsdl = yield http("GET", self.base + "t?wsdl")
        self.assertIn(b'name="label"', wsdl)
        self.assertEqual((yield self.zeep("t", "tSoap12", lambda s, c: s.f(a=4, label="x"))), "x=4")

    @defer.inlineCallbacks
    def test_untyped_values_travel_as_json(self):
        out = yield self.zeep("orders", "ordersSoap12", lambda s, c: s.place(item="book", qty=2))
        self.assertEqual(json.loads(out), {"id": 1, "item": "book", "qty": 2, "status": "open", "by": None})

    @defer.inlineCallbacks
    def test_empty_list_argument(self):
        """zeep sends no element for [] (the list is minOccurs=0): that is an
        empty list, not a missing argument."""
        self.assertEqual((yield self.zeep("t", "tSoap11", lambda s, c: s.total(values=[]))), 0)
        self.assertEqual((yield self.zeep("t", "tSoap12", lambda s, c: s.total(values=[2, 3]))), 5)
        self.assertEqual((yield self.zeep("t", "tSoap12", lambda s, c: s.count(items=[]))), 0)

    @defer.inlineCallbacks
    def test_internal_error_hides_details(self):
        f = yield self.zeep("t", "tSoap11", lambda s, c: s.boom())
        self.assertIsInstance(f, zeep.exceptions.Fault)
        self.assertNotIn("secret", f.message)
        self.assertEqual(f.code, "soap:Server")
        self.flushLoggedErrors(ZeroDivisionError)


class RawTests(SOAPCase):
    """Fault forms and the resource's edges, with hand-written envelopes."""

    def fault_of(self, body):
        root = etree.fromstring(body)
        return root, root.find(f".//{FAULT_NS}error/{FAULT_NS}code").text

    @defer.inlineCallbacks
    def test_fault_forms(self):
        cases = [
            (SOAP11, envelope(SOAP11, "<t:nope/>"), 500, "soap:Client", "-32601"),
            (SOAP12, envelope(SOAP12, "<t:nope/>"), 400, "soap:Sender", "-32601"),
            (SOAP11, envelope(SOAP11, "<t:f><t:a>x</t:a></t:f>"), 500, "soap:Client", "-32602"),
            (SOAP12, envelope(SOAP12, "<t:f/>"), 400, "soap:Sender", "-32602"),
            (SOAP11, envelope(SOAP11, "<t:f><t:a>1</t:a><t:zz>1</t:zz></t:f>"), 500, "soap:Client", "-32602"),
            (SOAP12, b"<not-soap/>", 400, "soap:Sender", "-32600"),
            (SOAP11, b"<broken", 500, "soap:Client", "-32700"),
            (SOAP12, envelope(SOAP12, "<t:f><t:a>1</t:a></t:f>",
                              '<e:Header><h:x xmlns:h="urn:x" e:mustUnderstand="true"/></e:Header>'),
             500, "soap:MustUnderstand", "-32600"),
        ]
        for version, body, status, faultcode, code in cases:
            got, headers, data = yield self.post(version, body)
            self.assertEqual(got, status, data)
            root, detail_code = self.fault_of(data)
            self.assertEqual(etree.QName(root).namespace, version)
            if version == SOAP11:
                self.assertEqual(root.findtext(f".//{{{SOAP11}}}Fault/faultcode"), faultcode)
                self.assertIn(b"text/xml", headers.getRawHeaders(b"content-type")[0])
            else:
                self.assertEqual(root.findtext(f".//{{{SOAP12}}}Code/{{{SOAP12}}}Value"), faultcode)
                self.assertIn(b"application/soap+xml", headers.getRawHeaders(b"content-type")[0])
            self.assertEqual(detail_code, code, data)

    @defer.inlineCallbacks
    def test_untyped_item_that_is_not_json(self):
        code, _, data = yield self.post(SOAP11, envelope(SOAP11, '<t:count><t:items>[1]</t:items>'
                                                                 '<t:items>abc</t:items></t:count>'))
        root, detail_code = self.fault_of(data)
        self.assertEqual((code, detail_code), (500, "-32602"))
        self.assertIn("items[1]: not a valid JSON text", root.findtext(f".//{{{SOAP11}}}Fault/faultstring"))

    @defer.inlineCallbacks
    def test_call_without_zeep(self):
        code, _, data = yield self.post(SOAP12, envelope(SOAP12, "<t:f><t:a>21</t:a></t:f>"))
        self.assertEqual(code, 200)
        self.assertEqual(etree.fromstring(data).findtext(".//{urn:msgd:t}result"), "42")

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_call(self):
        yield disconnect_cancels(self, self.node, self.port, b"/soap/t", envelope(SOAP11, "<t:hold/>"),
                                 self.node.apps.modules["t"].module.calls)

    @defer.inlineCallbacks
    def test_index_unknown_module_and_plain_get(self):
        code, _, data = yield http("GET", self.base)
        self.assertEqual(code, 200)
        self.assertIn(b"catalog?wsdl", data)
        code, _, data = yield http("GET", self.base + "%3Cscript%3Ealert(1)%3C%2Fscript%3E?wsdl")
        self.assertEqual(code, 404)
        self.assertNotIn(b"<script>", data)
        code, _, _ = yield http("GET", self.base + "t/more?wsdl")
        self.assertEqual(code, 404)
        code, _, _ = yield http("GET", self.base + "t")
        self.assertEqual(code, 400)
        code, _, data = yield self.post(SOAP11, envelope(SOAP11, "<t:f/>"), module="nope")
        self.assertEqual((code, self.fault_of(data)[1]), (500, "-32601"))


class AddressTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_configured_address(self):
        node = make_node(self, INI + "soap_address = https://api.example.org/soap/\n", {"t.py": T_V1})
        _, _, wsdl = yield http("GET", f"http://127.0.0.1:{http_port(node)}/soap/t?wsdl")
        self.assertIn(b'location="https://api.example.org/soap/t"', wsdl)

    @defer.inlineCallbacks
    def test_bad_host_header_falls_back(self):
        node = make_node(self, INI, {"t.py": T_V1})
        port = http_port(node)
        _, _, wsdl = yield http("GET", f"http://127.0.0.1:{port}/soap/t?wsdl", headers={"host": 'x"><y'})
        self.assertIn(f'location="http://127.0.0.1:{port}/soap/t"'.encode(), wsdl)
        _, _, wsdl = yield http("GET", f"http://127.0.0.1:{port}/soap/t?wsdl", headers={"host": "api.example.org:8443"})
        self.assertIn(b'location="http://api.example.org:8443/soap/t"', wsdl)


class ServiceTests(unittest.TestCase):
    """The WSDL generator and codec without a server."""

    def service(self, source):
        import types
        mod = types.ModuleType("svc_test")
        import sys
        sys.modules["svc_test"] = mod
        self.addCleanup(sys.modules.pop, "svc_test", None)
        exec(source, mod.__dict__)

        class App:
            version = 1
            module = mod
            exports = {k: v for k, v in vars(mod).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == "svc_test" and not isinstance(v, type)}
        return Service("svc", App)

    def test_schema_shapes(self):
        svc = self.service('''
from __future__ import annotations
from dataclasses import dataclass
from typing import Optional

@dataclass
class Node:
    name: str
    children: list[Node]
    parent: Optional[Node] = None

def grid(rows: list[list[int]], note=None) -> Optional[Node]:
    return None
''')
        doc = etree.fromstring(svc.wsdl("http://h/soap/svc"))
        xs = "{http://www.w3.org/2001/XMLSchema}"
        grid = doc.find(f".//{xs}element[@name='grid']")
        rows = grid.find(f".//{xs}element[@name='rows']")
        self.assertEqual(rows.get("maxOccurs"), "unbounded")
        self.assertEqual(rows.find(f".//{xs}element").get("name"), "item")
        self.assertEqual(grid.find(f".//{xs}element[@name='note']").get("type"), "xsd:string")
        node = doc.find(f".//{xs}complexType[@name='Node']")
        self.assertEqual(node.find(f".//{xs}element[@name='children']").get("type"), "tns:Node")
        self.assertEqual(node.find(f".//{xs}element[@name='parent']").get("nillable"), "true")
        self.assertIs(svc.wsdl("http://h/soap/svc"), svc.wsdl("http://h/soap/svc"))

    def test_unsendable_result(self):
        svc = self.service("def f() -> int:\n    return 'x'\n")
        body = etree.Element("Body")
        e = self.assertRaises(errors.InternalError, svc.encode_result, body, "f", "x")
        self.assertIn("expected int", e.message)
        e = self.assertRaises(errors.InternalError, svc.encode_result, body, "f", 2 ** 64)
        self.assertIn("xsd:long", e.message)
