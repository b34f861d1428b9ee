"""The one HTTP responder (msgd.interfaces.responder) and the mounts that
answer through it — ``/rpc``, ``/RPC2``, ``/soap/`` — built on an
:class:`~msgd.testing.AppHarness` (the services interface without a node)
and driven by in-memory requests: ``DummyRequest`` for the responder alone,
twisted.web's own Request over a ``StringTransport`` for the wire.  No
socket, no node, a ``task.Clock``."""

from __future__ import annotations

import json
import os
import xmlrpc.client

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from msgd.core import errors
from msgd.interfaces import base, http
from msgd.interfaces.responder import Answer, respond
from msgd.interfaces.soap import SOAPResource
from msgd.interfaces.xmlrpc import XMLRPCResource
from msgd.services import Services
from msgd.testing import AppHarness
from tests.helpers import write

APP = '''
from twisted.internet import defer
from msgd import api

log = []

def add(a: int, b: int) -> int:
    return a + b

async def double_later(x: int) -> int:
    await api.sleep(1)
    return x * 2

def held() -> int:
    """Waits until cancelled."""
    log.append("started")
    return defer.Deferred(lambda d: log.append("cancelled"))
'''


def ok(result) -> Answer:
    return Answer(200, b"text/plain", repr(result).encode())


def fault(e: errors.MsgdError) -> Answer:
    return Answer(418, b"text/plain", f"{e.name}: {e.message}".encode())


class RespondTests(unittest.TestCase):
    """respond() on a DummyRequest."""

    def setUp(self):
        self.events = []
        self.log = Logger(observer=self.events.append)
        self.request = DummyRequest([b""])

    def respond(self, outcome, **kw):
        return respond(self.request, outcome, ok, fault, log=self.log, event="call {what} failed",
                       request_id="r1", what="m.f", **kw)

    def written(self):
        r = self.request
        return r.responseCode or 200, r.responseHeaders.getRawHeaders(b"content-type"), b"".join(r.written)

    def test_result_at_once(self):
        self.assertEqual(self.respond(5), server.NOT_DONE_YET)
        self.assertEqual(self.written(), (200, [b"text/plain"], b"5"))
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"content-length"), [b"1"])
        self.assertEqual(self.request.finished, 1)

    def test_error_found_before_the_call(self):
        try:
            raise errors.InvalidParams("bad")
        except errors.MsgdError:
            self.respond(Failure())
        self.assertEqual(self.written(), (418, [b"text/plain"], b"invalid_params: bad"))
        self.assertEqual(self.events, [])

    def test_deferred_result(self):
        d = defer.Deferred()
        self.respond(d)
        self.assertEqual(self.request.written, [])
        self.assertEqual(self.request.finished, 0)
        d.callback([1])
        self.assertEqual(self.written(), (200, [b"text/plain"], b"[1]"))
        self.assertEqual(self.request.finished, 1)

    def test_deferred_taxonomy_error_is_not_logged(self):
        d = defer.Deferred()
        self.respond(d)
        d.errback(errors.Timeout("too late"))
        self.assertEqual(self.written(), (418, [b"text/plain"], b"timeout: too late"))
        self.assertEqual(self.events, [])

    def test_unexpected_error_is_logged_and_answered_as_internal(self):
        d = defer.Deferred()
        self.respond(d)
        d.errback(RuntimeError("secret detail"))
        self.assertEqual(self.written(), (418, [b"text/plain"], b"internal_error: internal error (request r1)"))
        [event] = self.events
        self.assertTrue(event["log_failure"].check(RuntimeError))
        self.assertEqual((event["log_format"], event["what"], event["request_id"]), ("call {what} failed", "m.f", "r1"))

    def test_client_gone_cancels_and_nothing_is_written(self):
        cancelled = []
        d = defer.Deferred(lambda d: cancelled.append(True))
        self.respond(d)
        self.request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.request.written, [])
        self.assertEqual(self.events, [])        # the CancelledError is not a server error

    def test_no_body(self):
        respond(self.request, None, lambda r: Answer(204, None, None), fault, log=self.log, event="")
        self.assertEqual(self.request.responseCode, 204)
        self.assertIsNone(self.request.responseHeaders.getRawHeaders(b"content-length"))
        self.assertEqual((self.request.written, self.request.finished), ([], 1))


class MountTests(unittest.TestCase):
    """/rpc, /RPC2 and /soap/ on an AppHarness, over in-memory HTTP."""

    def setUp(self):
        apps = os.path.abspath(self.mktemp())
        write(os.path.join(apps, "m.py"), APP)
        self.harness = AppHarness(apps, interface="web")
        self.mount = base.Interface("web", http.Options(endpoint="tcp:0", request_timeout=30.0), self.harness)
        self.app = self.harness.apps.modules["m"].module

    def connect(self, segment: bytes, res):
        root = resource.Resource()
        root.putChild(segment, res)                   # as the HTTP interface mounts it
        site = server.Site(root, reactor=self.harness.clock)
        site.log = lambda request: None
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def post(self, res, path: bytes, body: bytes, ctype: bytes = b"text/xml"):
        channel, transport = self.connect(path.split(b"/")[1], res)
        channel.dataReceived(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (path, ctype, len(body), body))
        return channel, transport

    @staticmethod
    def parse(raw: bytes):
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, body

    def test_services_interface(self):
        self.assertIsInstance(self.harness, Services)

    def test_xmlrpc_result_at_once(self):
        _, t = self.post(XMLRPCResource(self.mount), b"/RPC2", xmlrpc.client.dumps((2, 3), "m.add").encode())
        status, headers, body = self.parse(t.value())
        self.assertEqual((status, headers[b"content-type"]), (200, b"text/xml; charset=utf-8"))
        self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertEqual(xmlrpc.client.loads(body)[0], (5,))

    def test_xmlrpc_deferred_result_and_fault(self):
        _, t = self.post(XMLRPCResource(self.mount), b"/RPC2", xmlrpc.client.dumps((4,), "m.double_later").encode())
        self.assertEqual(t.value(), b"")
        self.harness.clock.advance(1)
        self.assertEqual(xmlrpc.client.loads(self.parse(t.value())[2])[0], (8,))
        _, t = self.post(XMLRPCResource(self.mount), b"/RPC2", xmlrpc.client.dumps((), "m.nope").encode())
        with self.assertRaises(xmlrpc.client.Fault) as cm:
            xmlrpc.client.loads(self.parse(t.value())[2])
        self.assertEqual(cm.exception.faultCode, errors.NotFound.code)

    def test_xmlrpc_disconnect_cancels(self):
        channel, t = self.post(XMLRPCResource(self.mount), b"/RPC2", xmlrpc.client.dumps((), "m.held").encode())
        self.assertEqual(self.app.log, ["started"])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.log, ["started", "cancelled"])
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.harness.dispatcher.in_flight, 0)

    def soap(self, version: str, body: str) -> str:
        ns = {"1.1": "http://schemas.xmlsoap.org/soap/envelope/", "1.2": "http://www.w3.org/2003/05/soap-envelope"}
        return (f'<e:Envelope xmlns:e="{ns[version]}" xmlns:m="urn:msgd:m"><e:Body>{body}</e:Body>'
                f'</e:Envelope>')

    def test_soap_result_and_faults(self):
        call = self.soap("1.1", "<m:add><m:a>2</m:a><m:b>3</m:b></m:add>").encode()
        status, headers, body = self.parse(self.post(SOAPResource(self.mount), b"/soap/m", call)[1].value())
        self.assertEqual((status, headers[b"content-type"]), (200, b"text/xml; charset=utf-8"))
        self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertIn(b">5<", body)
        missing = self.soap("1.2", "<m:add/>").encode()
        status, headers, body = self.parse(self.post(SOAPResource(self.mount), b"/soap/nope", missing,
                                                     b"application/soap+xml")[1].value())
        self.assertEqual((status, headers[b"content-type"]), (400, b"application/soap+xml; charset=utf-8"))
        self.assertIn(b"<m:name>not_found</m:name>", body)

    def test_soap_disconnect_cancels(self):
        channel, t = self.post(SOAPResource(self.mount), b"/soap/m", self.soap("1.1", "<m:held/>").encode())
        self.assertEqual(self.app.log, ["started"])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.app.log, t.value()), (["started", "cancelled"], b""))

    def test_jsonrpc_answer_notification_and_disconnect(self):
        rpc = http.JSONRPCResource(self.mount)
        call = {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]}
        status, headers, body = self.parse(self.post(rpc, b"/rpc", json.dumps(call).encode(),
                                                     b"application/json")[1].value())
        self.assertEqual((status, headers[b"content-type"], json.loads(body)["result"]), (200, b"application/json", 5))
        self.assertEqual(int(headers[b"content-length"]), len(body))
        note = {"jsonrpc": "2.0", "method": "m.add", "params": [2, 3]}
        status, headers, body = self.parse(self.post(rpc, b"/rpc", json.dumps(note).encode(),
                                                     b"application/json")[1].value())
        self.assertEqual((status, body), (204, b""))
        self.assertNotIn(b"content-type", headers)
        held = {"jsonrpc": "2.0", "id": 2, "method": "m.held"}
        channel, t = self.post(rpc, b"/rpc", json.dumps(held).encode(), b"application/json")
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.app.log, t.value()), (["started", "cancelled"], b""))
