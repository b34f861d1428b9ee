"""Every example of the JSON-RPC 2.0 specification gives the specification's
answer (section 7), plus the edges around them."""

import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from msgd.core.apps import AppRegistry
from msgd.core.dispatch import Dispatcher
from msgd.core.jsonrpc import JSONRPC, dumps
from msgd.core.request import Request

from tests.helpers import write

SPEC_APP = '''
def subtract(minuend=None, subtrahend=None, *args):
    return minuend - subtrahend

def sum(*n):
    return __builtins__["sum"](n) if isinstance(__builtins__, dict) else __import__("builtins").sum(n)

def update(*a):
    pass

def notify_hello(*a):
    pass

def get_data():
    return ["hello", 5]

def big():
    return 2 ** 80

def weird():
    return object()
'''


class SpecTests(unittest.TestCase):
    def setUp(self):
        d = os.path.abspath(self.mktemp())
        write(os.path.join(d, "spec.py"), SPEC_APP)
        self.clock = Clock()
        apps = AppRegistry(d, self.clock, interval=0)
        apps.scan()
        self.rpc = JSONRPC(Dispatcher(apps, self.clock, defer.maybeDeferred), max_batch=10)

    def send(self, text):
        """The spec writes methods unqualified; our targets are spec.NAME."""
        for m in ("subtract", "sum", "update", "notify_hello", "get_data", "foobar", "foo.get"):
            text = text.replace(f'"method": "{m}"', f'"method": "spec.{m}"')
        d = self.rpc.handle(text.encode(), lambda: Request.with_timeout("t", self.clock, 10))
        out = self.successResultOf(d)
        return None if out is None else json.loads(out)

    def test_positional(self):
        self.assertEqual(self.send('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}'),
                         {"jsonrpc": "2.0", "result": 19, "id": 1})
        self.assertEqual(self.send('{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}'),
                         {"jsonrpc": "2.0", "result": -19, "id": 2})

    def test_named(self):
        self.assertEqual(self.send('{"jsonrpc": "2.0", "method": "subtract", '
                                   '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}'),
                         {"jsonrpc": "2.0", "result": 19, "id": 3})
        self.assertEqual(self.send('{"jsonrpc": "2.0", "method": "subtract", '
                                   '"params": {"minuend": 42, "subtrahend": 23}, "id": 4}'),
                         {"jsonrpc": "2.0", "result": 19, "id": 4})

    def test_notification(self):
        self.assertIsNone(self.send('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}'))
        self.assertIsNone(self.send('{"jsonrpc": "2.0", "method": "foobar"}'))

    def test_nonexistent_method(self):
        out = self.send('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
        self.assertEqual(out["error"]["code"], -32601)
        self.assertEqual(out["id"], "1")

    def test_invalid_json(self):
        out = self.send('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
        self.assertEqual(out["error"]["code"], -32700)
        self.assertIsNone(out["id"])

    def test_invalid_request_object(self):
        out = self.send('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
        self.assertEqual(out["error"]["code"], -32600)
        self.assertIsNone(out["id"])

    def test_batch_invalid_json(self):
        out = self.send('[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                        '{"jsonrpc": "2.0", "method"]')
        self.assertEqual(out["error"]["code"], -32700)
        self.assertIsNone(out["id"])

    def test_empty_array(self):
        out = self.send("[]")
        self.assertIsInstance(out, dict)
        self.assertEqual(out["error"]["code"], -32600)
        self.assertIsNone(out["id"])

    def test_invalid_batch_not_empty(self):
        out = self.send("[1]")
        self.assertEqual(len(out), 1)
        self.assertEqual(out[0]["error"]["code"], -32600)

    def test_invalid_batch(self):
        out = self.send("[1,2,3]")
        self.assertEqual([o["error"]["code"] for o in out], [-32600] * 3)
        self.assertEqual([o["id"] for o in out], [None] * 3)

    def test_mixed_batch(self):
        out = self.send('''[
            {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
            {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
            {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
            {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
        ]''')
        self.assertEqual(out[0], {"jsonrpc": "2.0", "result": 7, "id": "1"})
        self.assertEqual(out[1], {"jsonrpc": "2.0", "result": 19, "id": "2"})
        self.assertEqual(out[2]["error"]["code"], -32600)
        self.assertIsNone(out[2]["id"])
        self.assertEqual(out[3]["error"]["code"], -32601)
        self.assertEqual(out[3]["id"], "5")
        self.assertEqual(out[4], {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"})
        self.assertEqual(len(out), 5)

    def test_all_notifications_batch(self):
        self.assertIsNone(self.send('[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
                                    '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]'))

    def test_shapes(self):
        for bad in ['{"method": "spec.sum", "id": 1}', '{"jsonrpc": "1.0", "method": "spec.sum", "id": 1}',
                    '{"jsonrpc": "2.0", "method": "spec.sum", "params": 3, "id": 1}',
                    '{"jsonrpc": "2.0", "method": "spec.sum", "id": {}}',
                    '{"jsonrpc": "2.0", "method": "spec.sum", "id": true}', '"hello"', "null", "5"]:
            out = self.send(bad)
            self.assertEqual(out["error"]["code"], -32600, bad)

    def test_invalid_params(self):
        out = self.send('{"jsonrpc": "2.0", "method": "subtract", "params": {"nope": 1}, "id": 7}')
        self.assertEqual(out["error"]["code"], -32602)

    def test_batch_limit(self):
        out = self.send(json.dumps([{"jsonrpc": "2.0", "method": "spec.get_data", "id": i} for i in range(11)]))
        self.assertEqual(out["error"]["code"], -32004)

    def test_big_int_and_unserializable(self):
        self.assertEqual(self.send('{"jsonrpc": "2.0", "method": "spec.big", "id": 1}')["result"], 2 ** 80)
        out = self.send('{"jsonrpc": "2.0", "method": "spec.weird", "id": 1}')
        self.assertEqual(out["error"]["code"], -32603)
        self.flushLoggedErrors()

    def test_unknown_builtin(self):
        out = self.send('{"jsonrpc": "2.0", "method": "rpc.subscribe", "params": {"channel": "x"}, "id": 1}')
        self.assertEqual(out["error"]["code"], -32601)

    def test_not_utf8(self):
        d = self.rpc.handle(b'\xff\xfe{"a"', lambda: Request.with_timeout("t", self.clock, 10))
        self.assertEqual(json.loads(self.successResultOf(d))["error"]["code"], -32700)

    def test_dumps(self):
        import decimal
        self.assertEqual(json.loads(dumps({"d": decimal.Decimal("1.5"), "s": {1}, 1: b"ab"})),
                         {"d": "1.5", "s": [1], "1": "YWI="})
