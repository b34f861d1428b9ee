"""XML-RPC at /RPC2, called with Python's own xmlrpc.client over a real
socket (in a thread, so the node keeps running on the reactor)."""

import datetime
import xmlrpc.client
from decimal import Decimal

from twisted.internet import defer, threads
from twisted.trial import unittest

from msgd.core import errors
from msgd.core import typehints
from msgd.xml import xmlrpc as xr
from msgd.xml import safe as xmlsafe

from tests.helpers import disconnect_cancels, http, http_port, make_node

INI = """
[node]
name = xmlrpc-test
request_timeout = 5s

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 64KiB
max_batch = 5
xml_max_depth = 20
{extra}
"""

APPS = {
    "m.py": '''
from __future__ import annotations
import datetime
from dataclasses import dataclass
from decimal import Decimal
from msgd import api

calls = []

@dataclass
class Point:
    x: int
    y: int
    label: str | None = None

def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b

def echo(value):
    return value

def move(p: Point, dx: int) -> Point:
    """Move a point right."""
    return Point(p.x + dx, p.y, p.label)

def total(prices: list[Decimal]) -> Decimal:
    return sum(prices, Decimal(0))

def keys(options: dict, more: dict[str, int] | None = None) -> list:
    return sorted(options)

def when(t: datetime.datetime) -> datetime.datetime:
    return t + datetime.timedelta(days=1)

def nothing() -> None:
    return None

def big() -> int:
    return 2 ** 40

def aset():
    return {1, 2}

def bell():
    return "bell\\x07"

def fail():
    raise api.AppError("out of stock", code=-32042)

def crash():
    raise ZeroDivisionError("oops")

async def hold():
    calls.append("started")
    try:
        await api.sleep(30)
    except BaseException:
        calls.append("cancelled")
        raise
''',
}


def proxy(port, **kw):
    return xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2", use_builtin_types=True, **kw)


class ClientCase(unittest.TestCase):
    """A node with the ``m`` app; ``extra`` lines go into its http section."""

    extra = ""

    def setUp(self):
        self.node = make_node(self, INI.format(extra=self.extra), APPS)
        self.port = http_port(self.node)

    def call(self, fn):
        """Run ``fn(proxy)`` in a thread; the fault or the result."""
        def run():
            with proxy(self.port) as p:
                try:
                    return fn(p)
                except xmlrpc.client.Fault as f:
                    return f
        return threads.deferToThread(run)


class XMLRPCClientTests(ClientCase):
    """Through xmlrpc.client: calls, faults, introspection, multicall."""

    @defer.inlineCallbacks
    def assertFault(self, fn, code, text=None):
        f = yield self.call(fn)
        self.assertIsInstance(f, xmlrpc.client.Fault)
        self.assertEqual(f.faultCode, code, f.faultString)
        if text is not None:
            self.assertIn(text, f.faultString)
        return f

    @defer.inlineCallbacks
    def test_calls_and_types(self):
        self.assertEqual((yield self.call(lambda p: p.m.add(2, 3))), 5)
        self.assertEqual((yield self.call(lambda p: p.m.add(2))), 3)
        value = {"s": "a<&>", "f": 1.5, "b": True, "l": [1, "x"], "bin": b"\x00\xff",
                 "d": datetime.datetime(2026, 11, 22, 10, 0, 0)}
        self.assertEqual((yield self.call(lambda p: p.m.echo(value))), value)
        moved = yield self.call(lambda p: p.m.move({"x": 1, "y": 2}, 3))
        self.assertEqual(moved, {"x": 4, "y": 2})        # label None: left out (nil is off)
        self.assertEqual((yield self.call(lambda p: p.m.total(["1.10", 2, "0.05"]))), "3.15")
        self.assertEqual((yield self.call(lambda p: p.m.when(datetime.datetime(2026, 1, 31, 8, 30)))),
                         datetime.datetime(2026, 2, 1, 8, 30))

    @defer.inlineCallbacks
    def test_faults_carry_taxonomy_codes(self):
        yield self.assertFault(lambda p: p.m.fail(), -32042, "out of stock")
        yield self.assertFault(lambda p: p.nope.nope(), errors.NotFound.code)
        yield self.assertFault(lambda p: p.m.add("x", 1), errors.InvalidParams.code, "a must be int")
        yield self.assertFault(lambda p: p.m.add(), errors.InvalidParams.code)
        yield self.assertFault(lambda p: p.m.move({"x": 1}, 1), errors.InvalidParams.code, "lacks y")
        yield self.assertFault(lambda p: p.m.total(["a lot"]), errors.InvalidParams.code)
        f = yield self.assertFault(lambda p: p.m.crash(), errors.InternalError.code)
        self.assertNotIn("oops", f.faultString)
        self.flushLoggedErrors(ZeroDivisionError)

    @defer.inlineCallbacks
    def test_unsendable_results_are_faults(self):
        yield self.assertFault(lambda p: p.m.nothing(), -32603, "nil is off")
        f = yield self.assertFault(lambda p: p.m.big(), -32603, "does not fit in 32 bits (xmlrpc_i8 is off)")
        self.assertIn(f"integer {2 ** 40}", f.faultString)
        yield self.assertFault(lambda p: p.m.aset(), -32603, "set value")
        yield self.assertFault(lambda p: p.m.bell(), -32603, "XML 1.0")
        yield self.assertFault(lambda p: p.m.echo("bell\x07"), errors.ParseError.code)   # sent by the client
        self.assertEqual((yield self.call(lambda p: p.m.add(1, 1))), 2)

    @defer.inlineCallbacks
    def test_introspection(self):
        names = yield self.call(lambda p: p.system.listMethods())
        self.assertIn("m.add", names)
        self.assertIn("system.multicall", names)
        self.assertEqual((yield self.call(lambda p: p.system.methodHelp("m.add"))), "Add two integers.")
        self.assertEqual((yield self.call(lambda p: p.system.methodSignature("m.add"))),
                         [["int", "int"], ["int", "int", "int"]])
        self.assertEqual((yield self.call(lambda p: p.system.methodSignature("m.move"))),
                         [["struct", "struct", "int"]])
        self.assertEqual((yield self.call(lambda p: p.system.methodSignature("m.total"))),
                         [["string", "array"]])
        self.assertEqual((yield self.call(lambda p: p.system.methodSignature("m.keys"))),
                         [["array", "struct"], ["array", "struct", "struct"]])
        self.assertEqual((yield self.call(lambda p: p.m.keys({"b": 1, "a": 2}))), ["a", "b"])
        yield self.assertFault(lambda p: p.system.methodHelp("m.nope"), errors.NotFound.code)
        yield self.assertFault(lambda p: p.system.nope(), errors.NotFound.code)

    @defer.inlineCallbacks
    def test_multicall(self):
        def run(p):
            mc = xmlrpc.client.MultiCall(p)
            mc.m.add(1, 2)
            mc.m.fail()
            mc.m.nothing()
            mc.m.add(5)
            results = mc()
            out = []
            for i in range(4):
                try:
                    out.append(results[i])
                except xmlrpc.client.Fault as f:
                    out.append(f.faultCode)
            return out
        self.assertEqual((yield self.call(run)), [3, -32042, -32603, 6])
        yield self.assertFault(lambda p: p.system.multicall([{"methodName": "m.add", "params": [1]}] * 6),
                               errors.TooLarge.code)
        nested = yield self.call(lambda p: p.system.multicall(
            [{"methodName": "system.multicall", "params": [[]]}, {"nope": 1}]))
        self.assertEqual([f["faultCode"] for f in nested], [errors.InvalidRequest.code] * 2)

    @defer.inlineCallbacks
    def test_get_is_405(self):
        code, _, _ = yield http("GET", f"http://127.0.0.1:{self.port}/RPC2")
        self.assertEqual(code, 405)

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_call(self):
        yield disconnect_cancels(self, self.node, self.port, b"/RPC2", xmlrpc.client.dumps((), "m.hold").encode(),
                                 self.node.apps.modules["m"].module.calls)


class ExtensionsTests(ClientCase):
    """``xmlrpc_allow_none`` and ``xmlrpc_i8`` on."""

    extra = "xmlrpc_allow_none = yes\nxmlrpc_i8 = yes"

    @defer.inlineCallbacks
    def test_nil_and_i8(self):
        self.assertIsNone((yield self.call(lambda p: p.m.nothing())))
        self.assertEqual((yield self.call(lambda p: p.m.big())), 2 ** 40)
        moved = yield self.call(lambda p: p.m.move({"x": 1, "y": 2}, 3))
        self.assertEqual(moved, {"x": 4, "y": 2, "label": None})


class CodecTests(unittest.TestCase):
    """The codec without a server."""

    def load(self, text):
        return xr.load_call(xmlsafe.parse(text.encode()))

    def test_load_extensions_and_defaults(self):
        method, params = self.load(
            "<methodCall><methodName>a.b</methodName><params>"
            "<param><value>plain</value></param>"
            "<param><value><i8>9000000000</i8></value></param>"
            "<param><value><ex:nil xmlns:ex='http://ws.apache.org/xmlrpc/namespaces/extensions'/></value></param>"
            "<param><value><ex:i8 xmlns:ex='http://ws.apache.org/xmlrpc/namespaces/extensions'>-5</ex:i8></value></param>"
            "<param><value><!-- a comment --><struct><member><name>k</name><value><array><data>"
            "<value><base64>AAE=</base64></value></data></array></value></member></struct></value></param>"
            "</params></methodCall>")
        self.assertEqual((method, params), ("a.b", ["plain", 9000000000, None, -5, {"k": [b"\x00\x01"]}]))

    def test_bad_requests(self):
        for text in ["<foo/>", "<methodCall/>",
                     "<methodCall><methodName>a.b</methodName><params><param/></params></methodCall>",
                     "<methodCall><methodName>a.b</methodName><params><param><value><int>x</int></value>"
                     "</param></params></methodCall>",
                     "<methodCall><methodName>a.b</methodName><params><param><value><float>1</float>"
                     "</value></param></params></methodCall>",
                     "<methodCall><methodName>a.b</methodName><params><param><value><base64>!!</base64>"
                     "</value></param></params></methodCall>"]:
            self.assertRaises(errors.InvalidRequest, self.load, text)

    def test_encoder_round_trip(self):
        enc = xr.Encoder(allow_none=True, i8=True)
        value = [1, 2 ** 40, None, "x", {"a": [True, 1.25]}, Decimal("1.50")]
        out = xmlrpc.client.loads(enc.response(value).decode(), use_builtin_types=True)[0][0]
        self.assertEqual(out, [1, 2 ** 40, None, "x", {"a": [True, 1.25]}, "1.50"])
        self.assertRaises(xr.Unsendable, xr.Encoder().value, 2 ** 64)
        self.assertRaises(xr.Unsendable, xr.Encoder(i8=True).value, 2 ** 64)
        self.assertRaises(xr.Unsendable, xr.Encoder().value, float("nan"))
        self.assertRaises(xr.Unsendable, xr.Encoder().value, {1: 2})

    def test_fault_is_readable_by_xmlrpc_client(self):
        e = self.assertRaises(xmlrpc.client.Fault, xmlrpc.client.loads,
                              xr.fault(errors.Timeout("too slow")).decode())
        self.assertEqual((e.faultCode, e.faultString), (-32002, "too slow"))

    def test_signatures(self):
        def f(a: int, b: list[str], c: bytes | None = None) -> dict:
            pass
        self.assertEqual(xr.signatures(typehints.signature(f)),
                         [["struct", "int", "array"], ["struct", "int", "array", "base64"]])   # dict: struct
