"""The demo page in headless Chromium without WebSocket: msgd.js told to use
SSE (one page) and long-poll (the other), or finding /ws missing; the pages
chat through the node with the same API."""

import os

from twisted.trial import unittest

from tests.browser import WITH_MSGD_JS, chromium, open_demo, send_chat, wait_for
from tests.helpers import ROOT
from tests.process import NodeProcess

INI = """
[node]
name = browser-fallback
apps = {apps}

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
poll_wait = 5s
{extra}
"""


class FallbackTests(unittest.TestCase):
    def start(self, extra=""):
        ini = INI.replace("{apps}", os.path.join(ROOT, "apps")).replace("{extra}", extra)
        self.node = NodeProcess(os.path.abspath(self.mktemp()), ini).start()
        self.addCleanup(self.node.stop)

    def open_page(self, name, query=""):
        return open_demo(self, f"http://127.0.0.1:{self.node.port}/?name={name}{query}")

    def send(self, driver, text):
        send_chat(driver, text)

    def chat(self, alice, bob):
        self.send(bob, "hello alice")
        self.assertTrue(wait_for(alice, "demo.messages.some(m => m.text === 'hello alice')"))
        self.send(alice, "hi bob")
        self.assertTrue(wait_for(bob, "demo.messages.some(m => m.text === 'hi bob')"))
        self.assertIn("hi bob", alice.find_element("id", "log").text)
        for d in (alice, bob):
            self.assertEqual(d.execute_script("return demo.messages.map(m => m.text)"), ["hello alice", "hi bob"])

    def test_told_not_to_use_websocket(self):
        self.start()
        alice = self.open_page("alice", "&transport=sse")
        bob = self.open_page("bob", "&transport=poll")
        self.assertEqual(alice.execute_script("return demo.client.transport"), "sse")
        self.assertEqual(bob.execute_script("return demo.client.transport"), "poll")
        self.chat(alice, bob)
        # presence counts both pages, whatever their transport
        self.assertTrue(wait_for(bob, "document.getElementById('presence').textContent === '2 here'"))

    def test_falls_back_when_websocket_cannot_open(self):
        self.start("websocket = no")         # /ws is not there: the upgrade fails
        alice = self.open_page("alice")
        bob = self.open_page("bob")
        self.assertEqual(alice.execute_script("return demo.client.transport"), "sse")
        self.chat(alice, bob)


CONNECT = """
const [transport, token, cookie, asFunction, done] = arguments;
if (cookie) document.cookie = "msgd_token=" + cookie + "; path=/";
const go = () => {
  const client = msgd.connect(undefined, { transport, token: asFunction ? () => token : token,
                                            minDelay: 50, maxDelay: 200 });
  client.on("state", (s) => { if (s === "refused") done({ state: s, transport: client.transport }); });
  client.call("secure.whoami", [], { timeout: 10000 }).then(
    (who) => done({ state: client.state, transport: client.transport, who: who.name }),
    (e) => done({ error: e.message, state: client.state }));
};
""" + WITH_MSGD_JS


class LoginTests(unittest.TestCase):
    """msgd.js on a node that refuses anonymous callers: a token given to
    connect() (or the msgd_token cookie) logs it in over every transport,
    and refused credentials stop its retries on every transport."""

    def setUp(self):
        from twisted.internet import reactor
        from msgd.security.tokens import Tokens
        extra = "anonymous = no\ntoken_secret = browser-login-secret\n"
        ini = INI.replace("{apps}", os.path.join(ROOT, "apps")).replace("{extra}", extra)
        self.node = NodeProcess(os.path.abspath(self.mktemp()), ini).start()
        self.addCleanup(self.node.stop)
        self.token = Tokens(b"browser-login-secret", reactor, 3600).issue("alice")[0]
        self.driver = chromium(self)
        self.driver.get(f"http://127.0.0.1:{self.node.port}/msgd.js")    # any page of the node's origin

    def connect(self, transport, token=None, cookie=None, as_function=False):
        return self.driver.execute_async_script(CONNECT, transport, token, cookie, as_function)

    def test_token_option_on_every_transport(self):
        for transport in ("websocket", "sse", "poll"):
            for as_function in (False, True):          # the token, or a function giving it
                self.assertEqual(self.connect(transport, self.token, as_function=as_function),
                                 {"state": "open", "transport": transport, "who": "alice"})

    def test_token_cookie_on_every_transport(self):
        for transport in ("websocket", "sse", "poll"):
            self.assertEqual(self.connect(transport, cookie=self.token),
                             {"state": "open", "transport": transport, "who": "alice"})

    def test_refused_stops_retrying(self):
        for transport in ("sse", "poll", "websocket"):
            self.assertEqual(self.connect(transport, "v1.forged.token"), {"state": "refused", "transport": transport})
