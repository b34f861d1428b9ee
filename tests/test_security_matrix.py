"""The security matrix: for every interface, anonymous, a wrong password, an
expired or forged token and a principal without the right are refused; the
right principal gets through.  Channel rules for subscribe and publish over
WebSocket.  Real clients over real sockets (websocket-client and
xmlrpc.client in threads)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import xmlrpc.client

import websocket
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.security.credentials import set_password
from msgd.security.tokens import Tokens
from tests.helpers import eventually, http, http_port, make_node
from tests.wsclient import WS

SECRET = "0123456789abcdef0123456789abcdef"

INI = """
[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
auth = password
auth_file = passwd
anonymous = no
token_secret = %s
login_attempts = 0
{extra}

[access:ops]
principals = @ops
call = orders.*
subscribe = orders.*
publish = orders.*

[access:everyone]
principals = @authenticated
call = orders.status
subscribe = news.*
""" % SECRET

APPS = {"orders.py": '''
from msgd import api

def place(item: str) -> str:
    return "placed " + item

def status() -> str:
    return "fine"

def whoami() -> dict:
    p = api.request().principal
    return {"name": p.name, "roles": sorted(p.roles), "via": p.via}
'''}

USERS = {"alice": ("alice-pw", ["ops"]), "bob": ("bob-pw", [])}


def basic(user, password) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def setup_node(testcase, extra: str = ""):
    ini = INI.replace("{extra}", extra)
    if "login_attempts" in extra:
        ini = ini.replace("login_attempts = 0\n", "")
    node = make_node(testcase, ini, APPS, start=False)
    path = os.path.join(os.path.dirname(node.config.path), "passwd")
    for user, (pw, roles) in USERS.items():
        set_password(path, user, pw, roles, rounds=4)
    node.privilegedStartService()
    node.startService()
    testcase.addCleanup(lambda: node.stopService() if node.running else None)
    return node


# -- one client per protocol; each answers "ok", "unauthorized" or another outcome ----

@defer.inlineCallbacks
def jsonrpc_call(port, auth, target="orders.place"):
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = auth
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": target, "params": ["book"] if target == "orders.place" else []})
    code, hdrs, data = yield http("POST", f"http://127.0.0.1:{port}/rpc", body.encode(), headers)
    answer = json.loads(data)
    if code == 401:
        assert answer["error"]["code"] == -32001, answer
        assert hdrs.getRawHeaders(b"www-authenticate"), "401 without WWW-Authenticate"
        return "unauthorized"
    if "error" in answer:
        return {-32001: "unauthorized", -32005: "overloaded"}.get(answer["error"]["code"], answer["error"])
    return "ok"


def xmlrpc_call(port, auth, target="orders.place"):
    def go():
        headers = [("Authorization", auth)] if auth else []
        proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2", headers=headers)
        try:
            getattr(proxy, target)(*(["book"] if target == "orders.place" else []))
            return "ok"
        except xmlrpc.client.ProtocolError as e:
            return "unauthorized" if e.errcode == 401 else e.errcode
        except xmlrpc.client.Fault as f:
            return "unauthorized" if f.faultCode == -32001 else f.faultCode
    return deferToThread(go)


@defer.inlineCallbacks
def soap_call(port, auth, target="orders.place"):
    module, op = target.split(".")
    args = "<item>book</item>" if op == "place" else ""
    env = (f'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="urn:msgd:{module}">'
           f'<e:Body><t:{op}>{args}</t:{op}></e:Body></e:Envelope>').encode()
    headers = {"content-type": "text/xml; charset=utf-8", "soapaction": '""'}
    if auth:
        headers["authorization"] = auth
    code, _, data = yield http("POST", f"http://127.0.0.1:{port}/soap/{module}", env, headers)
    if code == 401:
        assert b"Fault" in data, data
        return "unauthorized"
    if b"Fault" in data:
        m = re.search(rb"<m:code>(-?\d+)</m:code>", data)
        return "unauthorized" if m and m.group(1) == b"-32001" else data
    return "ok"


@defer.inlineCallbacks
def ws_call(port, auth, target="orders.place"):
    kw = {}
    if auth and auth.startswith("token="):
        kw["path"] = "/ws?" + auth
    elif auth:
        kw["header"] = [f"Authorization: {auth}"]
    try:
        c = yield WS.connect(port, **kw)
    except websocket.WebSocketBadStatusException as e:
        return "unauthorized" if e.status_code == 401 else e.status_code
    try:
        r = yield c.call(target, ["book"] if target == "orders.place" else [])
    finally:
        yield c.close()
    if "error" in r:
        return "unauthorized" if r["error"]["code"] == -32001 else r["error"]
    return "ok"


PROTOCOLS = {"jsonrpc": jsonrpc_call, "xmlrpc": xmlrpc_call, "soap": soap_call, "websocket": ws_call}


class MatrixTests(unittest.TestCase):
    def setUp(self):
        self.node = setup_node(self)
        self.port = http_port(self.node)
        guard = self.node.interfaces["web"].guard
        self.good_token = guard.issue_token("alice", ["ops"])["token"]
        self.expired_token = guard.issue_token("alice", ["ops"], ttl=-1)["token"]
        self.forged_token = Tokens(b"another-secret-of-32-bytes......", reactor, 60).issue("alice", ["ops"])[0]

    @defer.inlineCallbacks
    def check(self, protocol, cases):
        call = PROTOCOLS[protocol]
        for label, auth, target, want in cases:
            got = yield call(self.port, auth, target)
            self.assertEqual(got, want, f"{protocol}: {label}")

    def cases(self):
        return [
            ("anonymous", None, "orders.place", "unauthorized"),
            ("wrong password", basic("alice", "nope"), "orders.place", "unauthorized"),
            ("unknown user", basic("mallory", "alice-pw"), "orders.place", "unauthorized"),
            ("password over bcrypt's 72 bytes", basic("alice", "alice-pw" * 10), "orders.place", "unauthorized"),
            ("unknown user, password over 72 bytes", basic("mallory", "x" * 100), "orders.place", "unauthorized"),
            ("expired token", "Bearer " + self.expired_token, "orders.place", "unauthorized"),
            ("forged token", "Bearer " + self.forged_token, "orders.place", "unauthorized"),
            ("principal without the right", basic("bob", "bob-pw"), "orders.place", "unauthorized"),
            ("no right, target missing: same answer", basic("bob", "bob-pw"), "orders.nope", "unauthorized"),
            ("no right, module missing: same answer", basic("bob", "bob-pw"), "nomodule.x", "unauthorized"),
            ("right principal", basic("alice", "alice-pw"), "orders.place", "ok"),
            ("right principal by token", "Bearer " + self.good_token, "orders.place", "ok"),
            ("a rule for every principal", basic("bob", "bob-pw"), "orders.status", "ok"),
        ]

    def test_jsonrpc(self):
        return self.check("jsonrpc", self.cases())

    def test_xmlrpc(self):
        return self.check("xmlrpc", self.cases())

    def test_soap(self):
        return self.check("soap", [c for c in self.cases() if c[2] != "nomodule.x"])

    def test_websocket(self):
        cases = self.cases() + [
            ("token in the query", "token=" + self.good_token, "orders.place", "ok"),
            ("expired token in the query", "token=" + self.expired_token, "orders.place", "unauthorized"),
            ("forged token in the query", "token=" + self.forged_token, "orders.place", "unauthorized"),
        ]
        return self.check("websocket", cases)

    @defer.inlineCallbacks
    def test_denials_counted(self):
        yield jsonrpc_call(self.port, None)
        yield jsonrpc_call(self.port, basic("bob", "bob-pw"))
        text = self.node.metrics.render().decode()
        self.assertIn('msgd_auth_denied_total{interface="web",reason="anonymous"} 1.0', text)
        self.assertIn('msgd_auth_denied_total{interface="web",reason="rule"} 1.0', text)

    @defer.inlineCallbacks
    def test_app_sees_principal(self):
        code, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc",
                                   b'{"jsonrpc":"2.0","id":1,"method":"orders.whoami"}',
                                   {"authorization": basic("alice", "alice-pw")})
        self.assertEqual(json.loads(data)["result"], {"name": "alice", "roles": ["ops"], "via": "password"})

    @defer.inlineCallbacks
    def test_rpc_token_then_websocket(self):
        """Log in once with a password, then use the token (subprotocol form)."""
        code, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc",
                                   b'{"jsonrpc":"2.0","id":1,"method":"rpc.token"}',
                                   {"authorization": basic("alice", "alice-pw")})
        token = json.loads(data)["result"]["token"]
        c = yield WS.connect(self.port, subprotocols=("jsonrpc", "bearer." + token))
        self.addCleanup(c.close)
        self.assertEqual(c.ws.subprotocol, "jsonrpc")
        r = yield c.call("orders.whoami")
        self.assertEqual(r["result"]["via"], "token")
        # a token cannot be traded for a fresh one
        code, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc",
                                   b'{"jsonrpc":"2.0","id":1,"method":"rpc.token"}',
                                   {"authorization": "Bearer " + token})
        self.assertEqual(json.loads(data)["error"]["code"], -32001)

    @defer.inlineCallbacks
    def test_cookie_token(self):
        c = yield WS.connect(self.port, cookie=f"other=1; msgd_token={self.good_token}")
        self.addCleanup(c.close)
        r = yield c.call("orders.whoami")
        self.assertEqual(r["result"]["name"], "alice")

    @defer.inlineCallbacks
    def test_xmlrpc_listing_shows_only_allowed(self):
        def listing(auth):
            proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.port}/RPC2", headers=[("Authorization", auth)])
            return proxy.system.listMethods()
        bob = yield deferToThread(listing, basic("bob", "bob-pw"))
        alice = yield deferToThread(listing, basic("alice", "alice-pw"))
        self.assertIn("orders.status", bob)
        self.assertNotIn("orders.place", bob)
        self.assertIn("orders.place", alice)

    @defer.inlineCallbacks
    def test_targets_page_needs_login(self):
        code, _, _ = yield http("GET", f"http://127.0.0.1:{self.port}/targets")
        self.assertEqual(code, 401)


class ChannelRuleTests(unittest.TestCase):
    def setUp(self):
        self.node = setup_node(self)
        self.port = http_port(self.node)

    @defer.inlineCallbacks
    def client(self, user):
        c = yield WS.connect(self.port, header=[f"Authorization: {basic(user, USERS[user][0])}"])
        self.addCleanup(c.close)
        return c

    @defer.inlineCallbacks
    def test_subscribe_and_publish(self):
        alice = yield self.client("alice")
        bob = yield self.client("bob")
        code = lambda r: r["error"]["code"] if "error" in r else "ok"   # noqa: E731
        self.assertEqual(code((yield alice.call("rpc.subscribe", {"channel": "orders.new"}))), "ok")
        self.assertEqual(code((yield bob.call("rpc.subscribe", {"channel": "orders.new"}))), -32001)
        self.assertEqual(code((yield bob.call("rpc.subscribe", {"channel": "news.today"}))), "ok")
        self.assertEqual(code((yield bob.call("rpc.subscribe", {"channel": "news.*"}))), "ok")
        self.assertEqual(code((yield bob.call("rpc.subscribe", {"channel": "*"}))), -32001)
        self.assertEqual(code((yield bob.call("rpc.subscribe", {"channel": "new?.x"}))), -32001)
        self.assertEqual(code((yield bob.call("rpc.publish", {"channel": "news.today", "data": 1}))), -32001)
        self.assertEqual(code((yield alice.call("rpc.publish", {"channel": "orders.new", "data": 2}))), "ok")
        event = yield alice.next_event()
        self.assertEqual(event["params"]["data"], 2)
        self.assertEqual(code((yield bob.call("rpc.presence", {"channel": "orders.new"}))), -32001)
        self.assertEqual(code((yield alice.call("rpc.presence", {"channel": "orders.new"}))), "ok")

    @defer.inlineCallbacks
    def test_http_publish_checked(self):
        body = b'{"jsonrpc":"2.0","id":1,"method":"rpc.publish","params":{"channel":"orders.new","data":1}}'
        _, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc", body,
                                {"authorization": basic("bob", "bob-pw")})
        self.assertEqual(json.loads(data)["error"]["code"], -32001)
        _, _, data = yield http("POST", f"http://127.0.0.1:{self.port}/rpc", body,
                                {"authorization": basic("alice", "alice-pw")})
        self.assertEqual(json.loads(data)["result"]["channel"], "orders.new")


class LimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_login_throttling(self):
        node = setup_node(self, "login_attempts = 2\nlogin_window = 1h")
        port = http_port(node)
        self.assertEqual((yield jsonrpc_call(port, basic("alice", "x"))), "unauthorized")
        self.assertEqual((yield jsonrpc_call(port, basic("alice", "y"))), "unauthorized")
        code, hdrs, data = yield http("POST", f"http://127.0.0.1:{port}/rpc", b"{}",
                                      {"authorization": basic("alice", "alice-pw")})
        self.assertEqual(code, 429)
        self.assertEqual(json.loads(data)["error"]["code"], -32005)
        self.assertTrue(hdrs.getRawHeaders(b"retry-after"))
        # over WebSocket too, in the handshake
        self.assertEqual((yield ws_call(port, basic("alice", "alice-pw"))), 429)
        self.assertIn('msgd_limited_total{interface="web",limit="login_throttle"}', node.metrics.render().decode())

    @defer.inlineCallbacks
    def test_rate_per_principal(self):
        node = setup_node(self, "rate = 1\nrate_burst = 2")
        port = http_port(node)
        batch = [{"jsonrpc": "2.0", "id": i, "method": "orders.status"} for i in range(3)]
        _, _, data = yield http("POST", f"http://127.0.0.1:{port}/rpc", json.dumps(batch).encode(),
                                {"authorization": basic("bob", "bob-pw")})
        codes = sorted(a["error"]["code"] if "error" in a else 0 for a in json.loads(data))
        self.assertEqual(codes, [-32005, 0, 0])

    @defer.inlineCallbacks
    def test_connections_per_address(self):
        node = setup_node(self, "max_connections_per_address = 1")
        port = http_port(node)
        held = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        self.addCleanup(held.transport.loseConnection)
        code, _, data = yield http("GET", f"http://127.0.0.1:{port}/health")
        self.assertEqual(code, 429)
        self.assertEqual(json.loads(data)["error"]["code"], -32005)
        held.transport.loseConnection()
        # once it closed, the address may connect again (bounded wait, no sleep-based timing)
        yield eventually(lambda: node.interfaces["web"].guard.connections.total == 0, step=0.01)
        code, _, _ = yield http("GET", f"http://127.0.0.1:{port}/health")
        self.assertEqual(code, 200)


# -- STOMP (its own listener) and PB -------------------------------------------------

STOMP_INI = """
[interface:stomp]
type = stomp
endpoint = tcp:0:interface=127.0.0.1
auth = password
auth_file = passwd
anonymous = no
token_secret = %s
login_attempts = 0

[interface:pb]
type = pb
endpoint = tcp:0:interface=127.0.0.1
users = alice:alice-pw bob:bob-pw
""" % SECRET


def stomp_frames(port, login, passcode, frames):
    """CONNECT, then each frame (with a receipt); the commands answered
    (CONNECTED, RECEIPT, ERROR with its msgd-code), stopping at an ERROR.
    Blocking: run in a thread."""
    def frame(command, headers, body=""):
        return (command + "\n" + "".join(f"{k}:{v}\n" for k, v in headers.items()) + "\n" + body + "\x00").encode()

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        headers = {"accept-version": "1.2", "host": "/", "heart-beat": "0,0"}
        if login is not None:
            headers.update(login=login, passcode=passcode)
        s.sendall(frame("CONNECT", headers))
        buf = b""
        pending = list(frames)
        while True:
            while b"\x00" not in buf:
                data = s.recv(65536)
                if not data:
                    return out
                buf += data
            raw, _, buf = buf.partition(b"\x00")
            raw = raw.lstrip(b"\r\n")
            head = raw.split(b"\n\n")[0].decode().split("\n")
            command = head[0]
            if command == "ERROR":
                code = next((h.split(":", 1)[1] for h in head if h.startswith("msgd-code:")), "")
                out.append(f"ERROR{code}")
                return out
            out.append(command)
            if not pending:
                return out
            cmd, hdrs, body = pending.pop(0)
            s.sendall(frame(cmd, dict(hdrs, receipt=str(len(out))), body))


def stomp_call(port, login, passcode, target="orders.place"):
    frames = [("SEND", {"destination": f"/app/{target}", "content-type": "application/json"},
               '["book"]' if target == "orders.place" else "[]")]

    def go():
        got = stomp_frames(port, login, passcode, frames)
        if got == ["CONNECTED", "RECEIPT"]:
            return "ok"
        if got in (["ERROR"], ["ERROR-32001"], ["CONNECTED", "ERROR-32001"]):
            return "unauthorized"
        return got
    return deferToThread(go)


class StompAndPBMatrixTests(unittest.TestCase):
    def setUp(self):
        ini = STOMP_INI + INI.split("{extra}")[1].replace("principals = @ops", "principals = @ops alice")
        node = make_node(self, ini, APPS, start=False)
        path = os.path.join(os.path.dirname(node.config.path), "passwd")
        for user, (pw, roles) in USERS.items():
            set_password(path, user, pw, roles, rounds=4)
        node.privilegedStartService()
        node.startService()
        self.addCleanup(lambda: node.stopService() if node.running else None)
        self.node = node
        self.stomp_port = node.interfaces["stomp"].port.getHost().port
        self.pb_port = node.interfaces["pb"].port.getHost().port
        guard = node.interfaces["stomp"].guard
        self.good = guard.issue_token("alice", ["ops"])["token"]
        self.expired = guard.issue_token("alice", ["ops"], ttl=-1)["token"]
        self.forged = Tokens(b"another-secret-of-32-bytes......", reactor, 60).issue("alice", ["ops"])[0]

    @defer.inlineCallbacks
    def test_stomp(self):
        cases = [
            ("anonymous", None, None, "orders.place", "unauthorized"),
            ("wrong password", "alice", "nope", "orders.place", "unauthorized"),
            ("expired token", "", self.expired, "orders.place", "unauthorized"),
            ("forged token", "", self.forged, "orders.place", "unauthorized"),
            ("principal without the right", "bob", "bob-pw", "orders.place", "unauthorized"),
            ("no right, target missing: same answer", "bob", "bob-pw", "orders.nope", "unauthorized"),
            ("right principal", "alice", "alice-pw", "orders.place", "ok"),
            ("right principal by token", "", self.good, "orders.place", "ok"),
        ]
        for label, login, passcode, target, want in cases:
            got = yield stomp_call(self.stomp_port, login, passcode, target)
            self.assertEqual(got, want, f"stomp: {label}")

    @defer.inlineCallbacks
    def test_stomp_channel_rules(self):
        sub = ("SUBSCRIBE", {"destination": "/topic/orders.new", "id": "1"}, "")
        pub = ("SEND", {"destination": "/topic/orders.new"}, "x")
        news = ("SUBSCRIBE", {"destination": "/topic/news.today", "id": "2"}, "")
        pub_news = ("SEND", {"destination": "/topic/news.today"}, "x")
        reply = ("SEND", {"destination": "/app/orders.status", "reply-to": "/topic/orders.new"}, "[]")
        run = lambda who, frames: deferToThread(stomp_frames, self.stomp_port, who, USERS[who][0], frames)  # noqa
        self.assertEqual((yield run("alice", [pub, sub])), ["CONNECTED", "RECEIPT", "RECEIPT"])
        self.assertEqual((yield run("bob", [news])), ["CONNECTED", "RECEIPT"])
        self.assertEqual((yield run("bob", [sub])), ["CONNECTED", "ERROR-32001"])
        self.assertEqual((yield run("bob", [pub])), ["CONNECTED", "ERROR-32001"])
        self.assertEqual((yield run("bob", [pub_news])), ["CONNECTED", "ERROR-32001"])
        self.assertEqual((yield run("bob", [reply])), ["CONNECTED", "ERROR-32001"])

    @defer.inlineCallbacks
    def pb_login(self, credentials):
        from twisted.spread import pb
        factory = pb.PBClientFactory()
        self.addCleanup(factory.disconnect)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.pb_port).connect(factory)
        p = yield factory.login(credentials)
        return p

    @defer.inlineCallbacks
    def pb_outcome(self, credentials, method, *args):
        from twisted.cred.credentials import Anonymous
        from msgd.interfaces.pb import rebuild
        from msgd.core import errors
        try:
            p = yield self.pb_login(credentials or Anonymous())
            yield p.callRemote(method, *args)
            return "ok"
        except Exception as e:
            from twisted.python.failure import Failure
            err = rebuild(Failure(e))
            return "unauthorized" if isinstance(err, errors.Unauthorized) else repr(err)

    @defer.inlineCallbacks
    def test_pb(self):
        from twisted.cred.credentials import UsernamePassword as UP
        cases = [
            ("anonymous", None, ("call", "orders.place", ["book"]), "unauthorized"),
            ("wrong password", UP(b"alice", b"nope"), ("call", "orders.place", ["book"]), "unauthorized"),
            ("principal without the right", UP(b"bob", b"bob-pw"), ("call", "orders.place", ["book"]),
             "unauthorized"),
            ("no right, target missing", UP(b"bob", b"bob-pw"), ("call", "orders.nope", []), "unauthorized"),
            ("right principal", UP(b"alice", b"alice-pw"), ("call", "orders.place", ["book"]), "ok"),
            ("publish without the right", UP(b"bob", b"bob-pw"), ("publish", "orders.new", 1), "unauthorized"),
            ("publish with the right", UP(b"alice", b"alice-pw"), ("publish", "orders.new", 1), "ok"),
        ]
        for label, creds, call, want in cases:
            got = yield self.pb_outcome(creds, *call)
            self.assertEqual(got, want, f"pb: {label}")


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_rules_change_on_reconfigure(self):
        from msgd.config import parse_text
        node = setup_node(self)
        port = http_port(node)
        self.assertEqual((yield jsonrpc_call(port, basic("bob", "bob-pw"))), "unauthorized")
        text = "[node]\nname = test\n" + INI.replace("{extra}", "") + \
            "\n[access:bob]\nprincipals = bob\ncall = orders.place\n"
        yield node.reconfigure(parse_text(text, node.config.path))
        self.assertEqual((yield jsonrpc_call(http_port(node), basic("bob", "bob-pw"))), "ok")
