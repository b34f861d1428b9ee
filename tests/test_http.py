import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import disconnect_cancels, http, http_port, make_node, raw_exchange, rpc

INI = """
[node]
name = web-test
request_timeout = 5s

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 2KiB
max_batch = 5
"""

APPS = {
    "m.py": '''
from msgd import api
calls = []

def add(a: int, b: int) -> int:
    return a + b

async def slow(seconds: float):
    await api.sleep(seconds)
    return "done"

async def hold():
    calls.append("started")
    try:
        await api.sleep(30)
    except BaseException:
        calls.append("cancelled")
        raise
''',
}


class HTTPTests(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.port = http_port(self.node)
        self.url = f"http://127.0.0.1:{self.port}"

    @defer.inlineCallbacks
    def test_call(self):
        out = yield rpc(self.port, {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]})
        self.assertEqual(out, {"jsonrpc": "2.0", "result": 5, "id": 1})

    @defer.inlineCallbacks
    def test_batch_and_notification(self):
        out = yield rpc(self.port, [{"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [1, 1]},
                                    {"jsonrpc": "2.0", "method": "m.add", "params": [1, 1]},
                                    {"jsonrpc": "2.0", "id": 2, "method": "m.add", "params": {"a": 1, "b": "x"}}])
        self.assertEqual(out[0]["result"], 2)
        self.assertEqual(out[1]["error"]["code"], -32602)
        self.assertEqual(len(out), 2)
        none = yield rpc(self.port, {"jsonrpc": "2.0", "method": "m.add", "params": [1, 1]})
        self.assertIsNone(none)

    @defer.inlineCallbacks
    def test_errors_do_not_affect_others(self):
        slow = rpc(self.port, {"jsonrpc": "2.0", "id": 9, "method": "m.slow", "params": [0.2]})
        for bad in [b"{not json", b"", b'{"jsonrpc":"2.0","method":5,"id":1}', b"[]"]:
            out = yield rpc(self.port, bad, raw=True)
            self.assertIn(out["error"]["code"], (-32700, -32600))
        out = yield rpc(self.port, {"jsonrpc": "2.0", "id": 1, "method": "nope.nope"})
        self.assertEqual(out["error"]["code"], -32601)
        out = yield slow
        self.assertEqual(out["result"], "done")

    @defer.inlineCallbacks
    def test_batch_limit(self):
        out = yield rpc(self.port, [{"jsonrpc": "2.0", "id": i, "method": "m.add", "params": [1, 1]}
                                    for i in range(6)])
        self.assertEqual(out["error"]["code"], -32004)

    @defer.inlineCallbacks
    def test_body_too_large(self):
        code, _, body = yield http("POST", self.url + "/rpc", b"[" + b" " * 4000 + b"]")
        self.assertEqual(code, 413)
        self.assertEqual(json.loads(body)["error"]["code"], -32004)
        out = yield rpc(self.port, {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]})
        self.assertEqual(out["result"], 5)

    @defer.inlineCallbacks
    def test_form_bodies_are_not_parsed(self):
        """Arguments come from the query string only: a form-encoded POST body
        never becomes request arguments (the Site does not parse forms)."""
        form = {"content-type": "application/x-www-form-urlencoded"}
        code, _, body = yield http("POST", self.url + "/poll", b"session=nope", form)
        self.assertEqual(code, 201, body)      # no session argument seen: a new session is opened
        code, _, _ = yield http("POST", self.url + "/poll?session=nope", b"[]", form)
        self.assertEqual(code, 404)            # the query string's argument is seen

    @defer.inlineCallbacks
    def test_get_rpc_is_405(self):
        code, headers, _ = yield http("GET", self.url + "/rpc")
        self.assertEqual(code, 405)

    @defer.inlineCallbacks
    def test_health(self):
        code, headers, body = yield http("GET", self.url + "/health")
        self.assertEqual(code, 200)
        h = json.loads(body)
        self.assertEqual(h["node"], "web-test")
        self.assertEqual(h["status"], "ok")
        self.assertIn("m", h["modules"])
        self.assertEqual(h["interfaces"]["web"]["type"], "http")
        self.assertEqual(h["load_errors"], {})

    @defer.inlineCallbacks
    def test_metrics(self):
        yield rpc(self.port, {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]})
        code, headers, body = yield http("GET", self.url + "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'msgd_requests_total{interface="web",outcome="ok",target="m.add"} 1.0', body)
        self.assertIn(b"msgd_request_duration_seconds_bucket", body)
        self.assertIn(b'msgd_app_reloads_total{module="m"} 1.0', body)

    @defer.inlineCallbacks
    def test_pages(self):
        code, _, body = yield http("GET", self.url + "/targets")
        self.assertEqual(code, 200)
        self.assertIn(b"m.add", body)
        code, headers, body = yield http("GET", self.url + "/")
        self.assertEqual(code, 200)
        self.assertIn(b"/msgd.js", body)
        code, headers, body = yield http("GET", self.url + "/msgd.js")
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/javascript; charset=utf-8"])
        self.assertIn(b"function connect", body)
        code, _, _ = yield http("GET", self.url + "/nothing-here")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_client_disconnect_cancels_call(self):
        yield disconnect_cancels(self, self.node, self.port, b"/rpc", b'{"jsonrpc":"2.0","id":1,"method":"m.hold"}',
                                 self.node.apps.modules["m"].module.calls)


class RefusalTests(unittest.TestCase):
    """A refused request (413 past ``max_body``) through a real socket: the
    client reads the whole answer, whether it waits for ``100 Continue`` or
    sends its body regardless."""

    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.port = http_port(self.node)

    @defer.inlineCallbacks
    def test_expect_continue_gets_only_the_413(self):
        from twisted.internet.threads import deferToThread
        head = (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 10000000\r\n\r\n")
        answer = yield deferToThread(raw_exchange, self.port, head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"], -32004)

    @defer.inlineCallbacks
    def test_client_sending_its_body_first_reads_the_413(self):
        from twisted.internet.threads import deferToThread
        body = b"[" + b" " * (8 * 1024 * 1024) + b"]"       # far more than the sockets' buffers
        head = (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        answer = yield deferToThread(raw_exchange, self.port, head, body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"], -32004)
        out = yield rpc(self.port, {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]})
        self.assertEqual(out["result"], 5)


class LingeringTests(unittest.TestCase):
    """The lingering close after a refusal, on a StringTransport and a
    fake clock: what is sent, what is read, when the connection ends."""

    def setUp(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        class HalfCloseable(StringTransport):
            write_closed = False

            def loseWriteConnection(self):
                self.write_closed = True

        self.node = make_node(self, INI, APPS)
        self.clock = Clock()
        self.channel = self.node.interfaces["web"].site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        self.channel.callLater = self.clock.callLater
        self.transport = HalfCloseable()
        self.channel.makeConnection(self.transport)
        self.addCleanup(lambda: self.channel.connectionLost(None) if self.channel.transport else None)

    def refuse(self):
        self.channel.dataReceived(b"POST /rpc HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 5000\r\n\r\n" + b"x" * 100)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertTrue(self.transport.write_closed)        # FIN after the answer
        self.assertFalse(self.transport.disconnecting)      # but reading goes on
        self.transport.clear()

    def test_reads_and_discards_until_idle(self):
        self.refuse()
        for _ in range(4):                   # data keeps coming: the connection stays
            self.clock.advance(0.9)
            self.channel.dataReceived(b"y" * 1000)
        self.channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.transport.value(), b"")     # nothing after the refusal is parsed
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1.0)               # linger_idle without data
        self.assertTrue(self.transport.disconnected)

    def test_bounded_in_time(self):
        self.refuse()
        for _ in range(10):
            if self.transport.disconnected:
                break
            self.clock.advance(0.5)
            self.channel.dataReceived(b"y" * 1000)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.clock.seconds(), self.channel.linger_time)

    def test_bounded_in_bytes(self):
        self.refuse()
        self.channel.dataReceived(b"y" * self.channel.linger_bytes)
        self.assertFalse(self.transport.disconnected)
        self.channel.dataReceived(b"y")
        self.assertTrue(self.transport.disconnected)

    def test_connection_limit_refusal_lingers_too(self):
        self.node.interfaces["web"].guard.connections.max_total = 1     # this test's channel holds the one
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        other = self.node.interfaces["web"].site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4322))
        other.callLater = self.clock.callLater
        t = StringTransport()
        other.makeConnection(t)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 429 "))
        other.dataReceived(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n[1]")
        self.assertFalse(t.disconnecting)    # TLS-like transport (no half close): read on, nothing parsed
        self.assertEqual(t.value().count(b"HTTP/1.1 "), 1)
        self.clock.advance(other.linger_idle)
        self.assertTrue(t.disconnected)
