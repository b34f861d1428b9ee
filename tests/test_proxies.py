"""Nodes behind real reverse proxies on loopback: nginx and HAProxy started
from the configuration snippets in docs/cluster.rst and docs/security.rst
(their text, with the ports swapped), clients on other loopback addresses
(127.0.0.2, 127.0.0.3) so that each is a different client to the proxy.

Blocking client code runs in threads (deferToThread): the nodes run on the
trial reactor."""

from __future__ import annotations

import http.client
import json
import os
import socket
import textwrap

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests import servers
from tests.browser import WITH_MSGD_JS
from tests.helpers import ROOT, eventually, http_port, make_node, recv_until
from tests.process import pubsub_connected
from tests.servers import free_port

ALICE, BOB = "127.0.0.2", "127.0.0.3"       # two clients of the proxy


def doc_block(doc: str, intro: str) -> str:
    """The literal block that follows the paragraph ending with ``intro``
    in ``docs/DOC``: what the docs tell a reader to use, as written."""
    with open(os.path.join(ROOT, "docs", doc)) as f:
        text = f.read()
    at = text.index(intro) + len(intro)
    lines = text[at:].split("\n")[1:]
    block = []
    for line in lines:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def swap(text: str, pairs: dict) -> str:
    for old, new in pairs.items():
        assert old in text, f"{old!r} is not in the documented snippet"
        text = text.replace(old, new)
    return text


NGINX_INTRO = "With nginx (inside ``http { }``)::"
HAPROXY_INTRO = "With HAProxy (``haproxy.cfg``)::"
NGINX_DENY = "    location ~ ^/(admin|status|metrics)(/|$) {\n        return 404;\n    }\n"
HAPROXY_DENY = "    http-request deny deny_status 404 if { path,url_dec -m reg ^/+(admin|status|metrics)(/|$) }\n"


# kind -> (the snippet's intro in docs/cluster.rst, its listening line, its line for the
# listening address, its rule that keeps /admin, /status, /metrics off the public side)
PROXIES = {
    "nginx": (NGINX_INTRO, "listen 80;", "listen 127.0.0.1:{};", NGINX_DENY, servers.nginx),
    "haproxy": (HAPROXY_INTRO, "bind :80", "bind 127.0.0.1:{}", HAPROXY_DENY, servers.haproxy),
}


def start_proxy(kind: str, ports: list[int], deny: bool = True) -> servers.Server:
    """nginx or HAProxy from docs/cluster.rst in front of the nodes on
    ``ports`` (one or two).  ``deny=False`` drops its rule that keeps
    /admin, /status, /metrics off the public side."""
    intro, listen, listen_here, deny_rule, start = PROXIES[kind]
    port = free_port()
    a, b = (ports * 2)[:2]
    conf = swap(doc_block("cluster.rst", intro), {listen: listen_here.format(port),
                                                  "127.0.0.1:8081": f"127.0.0.1:{a}",
                                                  "127.0.0.1:8082": f"127.0.0.1:{b}"})
    if not deny:
        conf = swap(conf, {deny_rule: ""})
    return start(conf, port)


def get(port: int, path: str, source: str = ALICE, headers: dict | None = None, method: str = "GET",
        body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def ws_handshake(port: int, source: str) -> tuple[int, socket.socket]:
    """A WebSocket opening handshake on /ws from ``source``: (HTTP status,
    the socket, left open)."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Protocol: jsonrpc\r\n\r\n")
    head = recv_until(s, b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), s


INI = """
[node]
name = proxied

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
trusted_proxies = 127.0.0.1
status = yes
admin = yes
{extra}
"""


def start_node(testcase, ini: str):
    """An in-process node from ``ini`` whose password file (``passwd``)
    knows one user, carol."""
    from msgd.security.credentials import set_password
    node = make_node(testcase, ini, start=False)
    set_password(os.path.join(os.path.dirname(node.config.path), "passwd"), "carol", "right", rounds=4)
    node.privilegedStartService()
    node.startService()
    testcase.addCleanup(lambda: node.stopService() if node.running else None)
    return node


class HTTPBehindProxy:
    """The checks of one proxy (``kind``), through its documented snippet."""

    kind = ""

    def start(self, extra: str = "", deny: bool = True):
        self.node = start_node(self, INI.replace("{extra}", extra))
        self.direct = http_port(self.node)
        srv = start_proxy(self.kind, [self.direct], deny)
        self.addCleanup(srv.cleanup)
        self.proxy = srv.port
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def test_admin_is_off_the_public_side(self):
        self.start()
        for path in ("/admin/log-level", "/status", "/%61dmin/log-level", "/metrics"):
            code, _ = yield deferToThread(get, self.proxy, path)
            self.assertEqual(code, 404, path)
        code, body = yield deferToThread(get, self.proxy, "/health")
        self.assertEqual(code, 200, body)
        code, _ = yield deferToThread(get, self.direct, "/status", source="127.0.0.1")
        self.assertEqual(code, 200)           # the operator, on the node's own address

    @defer.inlineCallbacks
    def test_node_refuses_admin_through_the_proxy(self):
        """Even when the proxy forwards /admin, the node sees the real
        client (not the loopback address of the proxy) and refuses it."""
        self.start(deny=False)
        code, body = yield deferToThread(get, self.proxy, "/admin/log-level")
        self.assertEqual((code, body), (403, b'{\n "error": "not allowed from this address"\n}\n'))
        code, _ = yield deferToThread(get, self.proxy, "/admin/reload", method="POST", body=b"{}",
                                      headers={"content-type": "application/json"})
        self.assertEqual(code, 403)
        code, _ = yield deferToThread(get, self.proxy, "/status/ws")
        self.assertEqual(code, 403)
        # a forged chain: the client claims to be 127.0.0.1 behind a proxy; only the
        # trusted proxy's own entry (the rightmost) is believed
        for forged in ("127.0.0.1", "10.1.1.1, 127.0.0.1"):
            code, _ = yield deferToThread(get, self.proxy, "/admin/log-level", headers={"x-forwarded-for": forged})
            self.assertEqual(code, 403, forged)
        self.assertTrue(any(e.get("address") == ALICE and e.get("reason") == "address" for e in self.events))

    @defer.inlineCallbacks
    def test_untrusted_peer_header_is_ignored(self):
        self.start(deny=False)
        code, _ = yield deferToThread(get, self.direct, "/admin/log-level", source=BOB,
                                      headers={"x-forwarded-for": "127.0.0.1", "forwarded": "for=127.0.0.1"})
        self.assertEqual(code, 403)
        # the trusted proxy's word is believed: the operator's own address behind it is let in
        code, _ = yield deferToThread(get, self.proxy, "/status", source="127.0.0.1")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_connection_limit_per_real_client(self):
        self.start("max_connections_per_address = 2")
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(2):
            code, s = yield deferToThread(ws_handshake, self.proxy, ALICE)
            held.append(s)
            self.assertEqual(code, 101)
        code, s = yield deferToThread(ws_handshake, self.proxy, ALICE)
        held.append(s)
        self.assertEqual(code, 429)           # Alice's third
        code, s = yield deferToThread(ws_handshake, self.proxy, BOB)
        held.append(s)
        self.assertEqual(code, 101)           # Bob is another client
        code, _ = yield deferToThread(get, self.proxy, "/health", source=BOB)
        self.assertEqual(code, 200)
        web = self.node.interfaces["web"]
        self.assertEqual(web.guard.connections.by_address.get(ALICE), 2)
        self.assertTrue(any(e.get("limit") == "connections_per_address" and e.get("key") == ALICE
                            for e in self.events))
        for s in held:
            s.close()
        yield eventually(lambda: not web.connections and not web.guard.connections.total)

    @defer.inlineCallbacks
    def test_login_throttling_per_real_client(self):
        self.start("auth = password\nauth_file = passwd\nlogin_attempts = 2")
        import base64

        def login(user, source):
            auth = "Basic " + base64.b64encode(f"{user}:wrong".encode()).decode()
            return get(self.proxy, "/rpc", source=source, method="POST",
                       body=b'{"jsonrpc":"2.0","id":1,"method":"rpc.token"}',
                       headers={"authorization": auth, "content-type": "application/json"})
        for user in ("u1", "u2"):
            code, _ = yield deferToThread(login, user, ALICE)
            self.assertEqual(code, 401)
        code, _ = yield deferToThread(login, "u3", ALICE)
        self.assertEqual(code, 429)           # Alice's address is throttled ...
        code, _ = yield deferToThread(login, "u4", BOB)
        self.assertEqual(code, 401)           # ... Bob's is not
        self.assertTrue(any(e.get("address") == BOB and e.get("reason") == "credentials" for e in self.events))


class NginxTests(HTTPBehindProxy, unittest.TestCase):
    kind = "nginx"


class HAProxyTests(HTTPBehindProxy, unittest.TestCase):
    kind = "haproxy"


STOMP_INI = """
[node]
name = proxied-stomp

[interface:stomp]
type = stomp
endpoint = tcp:0:interface=127.0.0.1
trusted_proxies = 127.0.0.1
proxy_protocol = yes
max_connections_per_address = 1

[interface:logins]
type = stomp
endpoint = tcp:0:interface=127.0.0.1
trusted_proxies = 127.0.0.1
proxy_protocol = yes
auth = password
auth_file = passwd
login_attempts = 1
"""

STOMP_INTRO = "of a STOMP listener::"


def stomp_connect(port: int, source: str, header: bytes = b"", login: bytes = b"") -> tuple[bytes, socket.socket]:
    """CONNECT from ``source``: (the first frame up to its body, or b""
    when the connection was closed, the socket)."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    creds = b"login:%s\npasscode:wrong\n" % login if login else b""
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(header + b"CONNECT\naccept-version:1.2\nhost:/\n" + creds + b"\n\x00")
    except (ConnectionResetError, BrokenPipeError):
        # refused (and reset) at once: before connect() returned, or before all was written
        return b"", s
    data = recv_until(s, b"\x00", reset_ends=True)
    return data.partition(b"\n\n")[0] if b"\x00" in data else b"", s


class ProxyProtocolTests(unittest.TestCase):
    """HAProxy in TCP mode with send-proxy-v2 (docs/security.rst's snippet)
    in front of STOMP listeners with ``proxy_protocol = yes``."""

    def setUp(self):
        self.node = start_node(self, STOMP_INI)

    def haproxy(self, interface: str) -> tuple[int, int]:
        """(HAProxy's port, the node's) in front of ``interface``."""
        direct = self.node.interfaces[interface].port.getHost().port
        port = free_port()
        conf = swap(doc_block("security.rst", STOMP_INTRO),
                    {"bind :61613": f"bind 127.0.0.1:{port}", "127.0.0.1:61701": f"127.0.0.1:{direct}",
                     "127.0.0.1:61702": f"127.0.0.1:{direct}"})
        srv = servers.haproxy("defaults\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\n"
                              + conf, port)
        self.addCleanup(srv.cleanup)
        return port, direct

    @defer.inlineCallbacks
    def test_stomp_sees_the_real_clients(self):
        node = self.node
        port, direct = self.haproxy("stomp")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for source, expected in ((ALICE, b"CONNECTED"), (ALICE, b"ERROR"), (BOB, b"CONNECTED")):
            frame, s = yield deferToThread(stomp_connect, port, source)
            held.append(s)
            self.assertEqual(frame.split(b"\n")[0], expected, source)
        self.assertEqual(node.interfaces["stomp"].guard.connections.by_address, {ALICE: 1, BOB: 1})
        # straight to the node from an address that is not a trusted proxy: its PROXY header is refused
        header = b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 61613\r\n"
        frame, s = yield deferToThread(stomp_connect, direct, BOB, header)
        held.append(s)
        self.assertEqual(frame, b"")
        self.assertTrue(any(e.get("address") == BOB and "PROXY" in e.get("log_format", "") for e in events))
        self.assertNotIn("10.9.9.9", node.interfaces["stomp"].guard.connections.by_address)

    @defer.inlineCallbacks
    def test_stomp_login_throttling_per_real_client(self):
        port, _ = self.haproxy("logins")
        frames = []
        for source, user in ((ALICE, b"u1"), (ALICE, b"u2"), (BOB, b"u3")):
            frame, s = yield deferToThread(stomp_connect, port, source, login=user)
            s.close()
            frames.append(frame)
        self.assertIn(b"message:login failed", frames[0])
        self.assertIn(b"msgd-code:-32005", frames[1])          # Alice's address is throttled ...
        self.assertIn(b"message:login failed", frames[2])      # ... Bob's is not


# -- long-poll sessions through a round-robin proxy in front of two nodes ------------

CLUSTER_INI = """
[node]
name = {name}
reload_interval = 0

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
trusted_proxies = 127.0.0.1
poll_wait = 1s

[pubsub]
backend = redis
redis = tcp:host=127.0.0.1:port={redis}
prefix = lb
"""

SUBSCRIBE = """
const [transport, done] = arguments;
const go = () => {
  const got = [], states = [], gaps = [], answers = [];
  // every HTTP answer the client gets, to see that none is a lost session's 404
  const fetch = (url, init) => window.fetch(url, init).then((r) => { answers.push(r.status); return r; });
  const client = msgd.connect(undefined, { transport, minDelay: 50, maxDelay: 200, fetch });
  client.on("state", (s) => states.push(s));
  client.on("gap", (c) => gaps.push(c));
  window.lb = window.lb || {};
  window.lb[transport] = { client, got, states, gaps, answers };
  client.subscribe("lb.events", (data, ev) => got.push([ev.offset, data])).then(
    () => done("subscribed"), (e) => done("failed: " + e.message));
};
""" + WITH_MSGD_JS


class LongPollBehindBalancer(unittest.TestCase):
    """msgd.js on long-poll and on SSE sessions, through the documented
    nginx/HAProxy snippets (round robin for everything else) in front of two
    nodes sharing pub/sub through Redis: every event arrives once, in order,
    and the client never has to reconnect."""

    def run_through(self, kind: str):
        from tests.browser import chromium, wait_for
        from tests.process import NodeProcess, call
        redis = servers.redis()
        self.addCleanup(redis.cleanup)
        nodes = []
        for name in ("a", "b"):
            node = NodeProcess(os.path.abspath(self.mktemp()),
                               CLUSTER_INI.replace("{name}", name).replace("{redis}", str(redis.port)))
            self.addCleanup(node.stop)
            nodes.append(node.start())
        pubsub_connected(*nodes, timeout=20)  # both nodes share pub/sub before anything is published
        srv = start_proxy(kind, [n.port for n in nodes])
        self.addCleanup(srv.cleanup)
        # requests without an affinity key go round robin
        seen = {json.loads(get(srv.port, "/health", source="127.0.0.1")[1])["node"] for _ in range(6)}
        self.assertEqual(seen, {"a", "b"})
        driver = chromium(self)
        driver.get(f"http://127.0.0.1:{srv.port}/msgd.js")          # a page of the proxy's origin
        for transport in ("poll", "sse"):
            self.assertEqual(driver.execute_async_script(SUBSCRIBE, transport), "subscribed")
        total = 0
        for i in range(40):                   # from either node, and from the browser through its sessions
            if i % 4 == 3:
                for transport in ("poll", "sse"):
                    driver.execute_script("lb[arguments[0]].client.publish('lb.events', arguments[1])",
                                          transport, f"{transport}-{i}")
                    total += 1
            else:
                r = call(nodes[i % 2].port, "rpc.publish", "lb.events", f"node-{i}")
                self.assertIn("result", r)
                total += 1
        for transport in ("poll", "sse"):
            self.assertTrue(wait_for(driver, f"lb.{transport}.got.length >= {total}", timeout=30),
                            driver.execute_script(f"return lb.{transport}.states"))
        # a few more long-polls through the balancer: nothing arrives twice, nobody reconnects
        polled = driver.execute_script("return lb.poll.answers.length")
        self.assertTrue(wait_for(driver, f"lb.poll.answers.length >= {polled + 3}", timeout=10))
        for transport in ("poll", "sse"):
            got, states, gaps, answers = driver.execute_script(
                "const x = lb[arguments[0]]; return [x.got, x.states, x.gaps, x.answers]", transport)
            self.assertEqual(set(answers) - {200, 201, 202}, set(), transport)
            self.assertEqual([offset for offset, _ in got], list(range(1, total + 1)), transport)
            self.assertEqual(len({data for _, data in got}), total)
            self.assertEqual(states, ["open"], transport)       # no reconnect, ever
            self.assertEqual(gaps, [])
            self.assertEqual(driver.execute_script("return lb[arguments[0]].client.transport", transport), transport)

    def test_nginx(self):
        self.run_through("nginx")

    def test_haproxy(self):
        self.run_through("haproxy")
