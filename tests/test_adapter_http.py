"""The HTTP adapter against an in-process twisted.web server: JSON helpers,
default headers, quoting, status mapping, retry of safe methods only, body
bound, TLS verification, and the faults."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest
from twisted.web import resource, server

from msgd.adapters import base

from tests import servers
from tests.helpers import breaker_opens, eventually, hung_listener, make_node
from tests.test_adapter_smtp import self_signed


class Service(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hits = {}
        self.seen_headers = {}

    def render(self, request):
        path = request.path.decode()
        self.hits[path] = self.hits.get(path, 0) + 1
        self.seen_headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        request.setHeader(b"content-type", b"application/json")
        name = "/" + path.rsplit("/", 1)[-1]
        if name == "/fail":
            request.setResponseCode(500)
            return b'{"error": "boom"}'
        if name == "/missing":
            request.setResponseCode(404)
            return b'{"error": "no"}'
        if name == "/big":
            return b"x" * 5000
        if name == "/slow":
            return server.NOT_DONE_YET
        body = request.content.read()
        return json.dumps({"method": request.method.decode(), "path": request.uri.decode(),
                           "body": json.loads(body) if body else None}).encode()


def ini(url, **extra):
    keys = dict(base_url=url, timeout="2s", retries="2", retry_backoff="10ms", breaker_failures="3",
                breaker_reset="200ms", headers="X-Api-Key: k1; X-Other: two")
    keys.update(extra)
    return "[adapter:svc]\ntype = http\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


class HTTPTests(unittest.TestCase):
    def setUp(self):
        self.service = Service()
        self.site = server.Site(self.service)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/api"
        self.node = make_node(self, ini(self.url))
        self.svc = self.node.adapter("svc")

    @defer.inlineCallbacks
    def test_json_helpers_headers_quoting(self):
        got = yield self.svc.get_json("/items/{}", "a/b c", params={"q": "1"})
        self.assertEqual(got["path"], "/api/items/a%2Fb%20c?q=1")
        self.assertEqual((self.service.seen_headers["x-api-key"], self.service.seen_headers["x-other"]),
                         ("k1", "two"))
        self.assertEqual(self.service.seen_headers["user-agent"], "msgd")
        got = yield self.svc.post_json("/items", {"n": 1})
        self.assertEqual((got["method"], got["body"]), ("POST", {"n": 1}))
        r = yield self.svc.request("GET", "/missing")
        self.assertEqual((r.code, r.json()), (404, {"error": "no"}))
        self.assertEqual(r.headers["content-type"], "application/json")

    @defer.inlineCallbacks
    def test_status_mapping_and_retry(self):
        self.svc = make_node(self, ini(self.url, breaker_failures="10")).adapter("svc")
        e = yield self.assertFailure(self.svc.get_json("/missing"), base.AdapterRejected)
        self.assertIn("404", e.reason)
        self.assertEqual(self.service.hits["/api/missing"], 1)
        e = yield self.assertFailure(self.svc.get_json("/fail"), base.AdapterUnavailable)
        self.assertTrue(e.retryable)
        self.assertEqual(self.service.hits["/api/fail"], 3)     # GET is safe: tried 1 + 2 retries
        self.service.hits.clear()
        yield self.assertFailure(self.svc.post_json("/fail", {}), base.AdapterUnavailable)
        self.assertEqual(self.service.hits["/api/fail"], 1)     # POST is not repeated
        self.assertEqual(self.svc.breaker.failures, 4)          # 5xx count for the breaker

    @defer.inlineCallbacks
    def test_max_body(self):
        node = make_node(self, ini(self.url, max_body="1k"))
        yield self.assertFailure(node.adapter("svc").request("GET", "/big"), base.AdapterRejected)

    @defer.inlineCallbacks
    def test_slow_answer_ends_at_deadline(self):
        node = make_node(self, ini(self.url, timeout="300ms", retries="0"))
        e = yield self.assertFailure(node.adapter("svc").get_json("/slow"), base.AdapterTimeout)
        self.assertIn("within", e.reason)

    @defer.inlineCallbacks
    def test_stopped_and_restarted(self):
        yield self.svc.get_json("/ok")
        number = self.port.getHost().port
        yield self.port.stopListening()
        yield self.svc.http_pool.closeCachedConnections()
        seen = set()
        for _ in range(6):
            try:
                yield self.svc.get_json("/ok")
            except base.AdapterUnavailable as e:
                seen.add(type(e))
        self.assertIn(base.CircuitOpen, seen)
        self.port = reactor.listenTCP(number, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        yield eventually(lambda: self.svc.get_json("/ok").addCallbacks(lambda r: True, lambda f: False))
        self.assertEqual(self.svc.describe()["breaker"], "closed")


class HTTPSTests(unittest.TestCase):
    def setUp(self):
        key, cert = self_signed("localhost")
        self.ca = os.path.abspath(self.mktemp())
        with open(self.ca, "wb") as f:
            f.write(cert)
        tls = ssl.PrivateCertificate.loadPEM(key + cert).options()
        port = reactor.listenSSL(0, server.Site(Service()), tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"https://localhost:{port.getHost().port}/"

    @defer.inlineCallbacks
    def test_verification(self):
        ok = make_node(self, ini(self.url, ca_file=self.ca)).adapter("svc")
        self.assertEqual((yield ok.get_json("/x"))["path"], "/x")
        strict = make_node(self, ini(self.url, retries="0")).adapter("svc")   # system roots: refused
        yield self.assertFailure(strict.get_json("/x"), base.AdapterError)
        lax = make_node(self, ini(self.url, tls_verify="no")).adapter("svc")
        self.assertEqual((yield lax.get_json("/x"))["path"], "/x")


class HTTPFaultTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_down_at_start(self):
        node = make_node(self, ini(f"http://127.0.0.1:{servers.free_port()}/", retries="0"))
        self.assertTrue(node.running)
        e = yield self.assertFailure(node.adapter("svc").get_json("/x"), base.AdapterUnavailable)
        self.assertFalse(e.sent)

    @defer.inlineCallbacks
    def test_hung_server(self):
        port = hung_listener(self)
        node = make_node(self, ini(f"http://127.0.0.1:{port}/", timeout="300ms", retries="0", pool_size="2",
                                   pool_queue="2", breaker_failures="2", breaker_reset="10s"))
        svc = node.adapter("svc")
        results = yield defer.DeferredList([svc.get_json("/x") for _ in range(6)], consumeErrors=True)
        kinds = {type(f.value).__name__ for ok, f in results}
        self.assertTrue(kinds <= {"AdapterTimeout", "AdapterOverloaded"}, kinds)
        self.assertEqual((svc.pool.in_use, len(svc.pool.waiters)), (0, 0))
        yield breaker_opens(self, lambda: svc.get_json("/x"))
