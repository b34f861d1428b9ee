"""TLS with certificates from the test CA (msgd.security.tls): HTTPS and
WSS on an ``ssl:`` listener; an ``mtls:`` listener that takes a client
certificate's CN as the principal and refuses a certificate from another
CA, or none.  Clients are Python's ssl/urllib and websocket-client, in
threads."""

from __future__ import annotations

import json
import os
import ssl
import urllib.request

import websocket
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.core import errors
from msgd.security.tls import make_ca, make_cert
from tests.helpers import http_port, make_node, recv_until
from tests.servers import unavailable

APPS = {"m.py": '''
from msgd import api

def whoami():
    p = api.request().principal
    return str(p) if p else None   # a Principal, or a PB login name
'''}


def post(port, ca, cert=None, path="/rpc"):
    """A JSON-RPC call over HTTPS, checked against ``ca``."""
    def go():
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert["cert"], cert["key"])
        req = urllib.request.Request(f"https://127.0.0.1:{port}{path}",
                                     b'{"jsonrpc":"2.0","id":1,"method":"m.whoami"}',
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return json.loads(r.read())
    return deferToThread(go)


def make_certificates(testcase) -> None:
    """The test CA and another CA; certificates for the server (node-a),
    a client (node-b) and a stranger claiming node-b from the other CA."""
    d = testcase.dir = os.path.abspath(testcase.mktemp())
    os.makedirs(d)
    testcase.ca = make_ca(d)
    testcase.other_ca = make_ca(d, "other-ca", "another CA")
    testcase.server = make_cert(testcase.ca, d, "node", "node-a")
    testcase.client = make_cert(testcase.ca, d, "client", "node-b")
    testcase.stranger = make_cert(testcase.other_ca, d, "stranger", "node-b")


class TLSTests(unittest.TestCase):
    def setUp(self):
        make_certificates(self)

    def node(self, endpoint: str, extra: str = ""):
        ini = f"""
        [interface:web]
        type = http
        endpoint = {endpoint}
        {extra}
        """
        return make_node(self, ini, APPS)

    @defer.inlineCallbacks
    def test_https_and_wss(self):
        node = self.node(f"ssl:0:interface=127.0.0.1:privateKey={self.server['key']}:certKey={self.server['cert']}")
        port = http_port(node)
        answer = yield post(port, self.ca["cert"])
        self.assertEqual(answer, {"jsonrpc": "2.0", "result": None, "id": 1})

        def wss():
            ws = websocket.create_connection(f"wss://127.0.0.1:{port}/ws", timeout=10, subprotocols=["jsonrpc"],
                                             sslopt={"ca_certs": self.ca["cert"]})
            try:
                ws.send('{"jsonrpc":"2.0","id":7,"method":"m.whoami"}')
                return json.loads(ws.recv())
            finally:
                ws.close()
        self.assertEqual((yield deferToThread(wss))["id"], 7)

    @defer.inlineCallbacks
    def test_server_certificate_from_another_ca_is_refused_by_the_client(self):
        node = self.node(f"ssl:0:interface=127.0.0.1:privateKey={self.server['key']}:certKey={self.server['cert']}")
        with self.assertRaises(Exception) as cm:
            yield post(http_port(node), self.other_ca["cert"])
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(cm.exception))

    @defer.inlineCallbacks
    def test_mutual_tls_names_the_peer(self):
        node = self.node(f"mtls:0:interface=127.0.0.1:privateKey={self.server['key']}:certKey={self.server['cert']}"
                         f":caCerts={self.ca['cert']}", "cert_principal = yes\nanonymous = no")
        port = http_port(node)
        answer = yield post(port, self.ca["cert"], self.client)
        self.assertEqual(answer["result"], "node-b")

    @defer.inlineCallbacks
    def test_mutual_tls_refuses_wrong_or_missing_certificate(self):
        node = self.node(f"mtls:0:interface=127.0.0.1:privateKey={self.server['key']}:certKey={self.server['cert']}"
                         f":caCerts={self.ca['cert']}")
        port = http_port(node)
        for cert in (self.stranger, None):
            with self.assertRaises(Exception) as cm:
                yield post(port, self.ca["cert"], cert)
            self.assertFalse(isinstance(cm.exception, urllib.error.HTTPError), cm.exception)


class ShellCATests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_make_test_ca_script(self):
        """docs/examples/make-test-ca.sh (openssl) makes certificates the node serves HTTPS with."""
        import shutil
        from twisted.internet.utils import getProcessOutputAndValue
        from tests.helpers import ROOT
        if shutil.which("openssl") is None:
            unavailable("openssl is not installed")
        d = os.path.abspath(self.mktemp())
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh", [os.path.join(ROOT, "docs", "examples", "make-test-ca.sh"), d, "node-x"], env=os.environ)
        self.assertEqual(code, 0, err)
        ini = f"""
        [interface:web]
        type = http
        endpoint = ssl:0:interface=127.0.0.1:privateKey={d}/node-x.key:certKey={d}/node-x.pem
        """
        node = make_node(self, ini, APPS)
        answer = yield post(http_port(node), os.path.join(d, "ca.pem"))
        self.assertEqual(answer["id"], 1)


class StompAndPBTLSTests(unittest.TestCase):
    """STOMP+TLS and PB+TLS listeners with the test CA's certificates; an
    ``mtls:`` STOMP listener refuses a client certificate from another CA."""

    def setUp(self):
        make_certificates(self)
        keys = f"interface=127.0.0.1:privateKey={self.server['key']}:certKey={self.server['cert']}"
        ini = f"""
        [interface:stomp]
        type = stomp
        endpoint = ssl:0:{keys}

        [interface:mstomp]
        type = stomp
        endpoint = mtls:0:{keys}:caCerts={self.ca['cert']}

        [interface:pb]
        type = pb
        endpoint = ssl:0:{keys}
        users = alice:pw

        [interface:mpb]
        type = pb
        endpoint = mtls:0:{keys}:caCerts={self.ca['cert']}
        users = node-b:pw node-c:pw
        cert_principal = yes

        [interface:mstream]
        type = jsonrpc-stream
        endpoint = mtls:0:{keys}:caCerts={self.ca['cert']}
        cert_principal = yes
        anonymous = no
        """
        self.node = make_node(self, ini, APPS)

    def port(self, name):
        return self.node.interfaces[name].port.getHost().port

    def stomp_connect(self, name, cert=None):
        import socket

        def go():
            ctx = ssl.create_default_context(cafile=self.ca["cert"])
            if cert:
                ctx.load_cert_chain(cert["cert"], cert["key"])
            with socket.create_connection(("127.0.0.1", self.port(name)), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\x00")
                    return recv_until(s, b"\x00").split(b"\n")[0]
        return deferToThread(go)

    def stream_call(self, cert):
        import socket

        def go():
            ctx = ssl.create_default_context(cafile=self.ca["cert"])
            ctx.load_cert_chain(cert["cert"], cert["key"])
            with socket.create_connection(("127.0.0.1", self.port("mstream")), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"m.whoami"}\n')
                    return json.loads(recv_until(s, b"\n"))
        return deferToThread(go)

    @defer.inlineCallbacks
    def test_stream_mutual_tls_names_the_principal(self):
        out = yield self.stream_call(self.client)
        self.assertEqual(out["result"], "node-b")          # no rpc.login needed: the certificate's CN
        with self.assertRaises(Exception):
            yield self.stream_call(self.stranger)

    @defer.inlineCallbacks
    def test_stomp_over_tls(self):
        self.assertEqual((yield self.stomp_connect("stomp")), b"CONNECTED")

    @defer.inlineCallbacks
    def test_stomp_mutual_tls(self):
        self.assertEqual((yield self.stomp_connect("mstomp", self.client)), b"CONNECTED")
        for cert in (self.stranger, None):
            with self.assertRaises(Exception):
                answer = yield self.stomp_connect("mstomp", cert)
                if answer != b"CONNECTED":
                    raise ConnectionError(answer)

    @defer.inlineCallbacks
    def test_pb_over_tls(self):
        from twisted.cred.credentials import UsernamePassword
        from twisted.internet import reactor, ssl as tssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.spread import pb
        with open(self.ca["cert"], "rb") as f:
            trust = tssl.Certificate.loadPEM(f.read())
        factory = pb.PBClientFactory()
        self.addCleanup(factory.disconnect)
        options = tssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
        yield SSL4ClientEndpoint(reactor, "127.0.0.1", self.port("pb"), options).connect(factory)
        p = yield factory.login(UsernamePassword(b"alice", b"pw"))
        self.assertEqual((yield p.callRemote("call", "m.whoami")), "alice")

    @defer.inlineCallbacks
    def test_pb_login_must_be_the_certificate_name(self):
        """A peer on ``mtls:`` with ``cert_principal``: its certificate's CN
        (node-b) is the only name it may log in as."""
        from twisted.cred.credentials import UsernamePassword
        from twisted.internet import reactor, ssl as tssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.spread import pb

        from msgd.interfaces.pb import rebuild
        with open(self.ca["cert"], "rb") as f:
            trust = tssl.Certificate.loadPEM(f.read())
        with open(self.client["cert"], "rb") as f, open(self.client["key"], "rb") as k:
            mine = tssl.PrivateCertificate.loadPEM(f.read() + k.read())

        @defer.inlineCallbacks
        def login(name):
            factory = pb.PBClientFactory()
            self.addCleanup(factory.disconnect)
            options = tssl.optionsForClientTLS("127.0.0.1", trustRoot=trust, clientCertificate=mine)
            yield SSL4ClientEndpoint(reactor, "127.0.0.1", self.port("mpb"), options).connect(factory)
            p = yield factory.login(UsernamePassword(name, b"pw"))
            return p

        p = yield login(b"node-b")
        self.assertEqual((yield p.callRemote("call", "m.whoami")), "node-b")
        e = yield login(b"node-c").addCallbacks(self.fail, rebuild)    # right password, wrong certificate
        self.assertIsInstance(e, errors.Unauthorized)
