"""The demo page in real headless Chromium: two pages chat through the node;
one page's socket is cut, messages are sent while it is away, and after it
reconnects it shows them all, once each."""

import os

from twisted.trial import unittest

from tests.browser import WITH_MSGD_JS, chromium, open_demo, send_chat, wait_for
from tests.helpers import ROOT
from tests.process import NodeProcess, call
from tests.proxy import CuttableProxy

INI = """
[node]
name = browser
apps = {apps}

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
"""


class DemoPageTests(unittest.TestCase):
    def setUp(self):
        ini = INI.replace("{apps}", os.path.join(ROOT, "apps"))
        self.node = NodeProcess(os.path.abspath(self.mktemp()), ini).start()
        self.addCleanup(self.node.stop)
        self.proxy = CuttableProxy(self.node.port)
        self.addCleanup(self.proxy.stop)

    def open_page(self, port, name):
        return open_demo(self, f"http://127.0.0.1:{port}/?name={name}")

    def send(self, driver, text):
        send_chat(driver, text)

    def texts(self, driver):
        return driver.execute_script("return demo.messages.filter(m => m.room === 'lobby').map(m => m.text)")

    def test_chat_and_resume_after_cut(self):
        alice = self.open_page(self.proxy.port, "alice")     # through the cuttable proxy
        bob = self.open_page(self.node.port, "bob")          # straight to the node

        self.send(bob, "hello alice")
        self.assertTrue(wait_for(alice, "demo.messages.some(m => m.text === 'hello alice')"))
        self.send(alice, "hi bob")
        self.assertTrue(wait_for(bob, "demo.messages.some(m => m.text === 'hi bob')"))
        # what a person sees
        self.assertIn("hi bob", alice.find_element("id", "log").text)

        self.proxy.cut()
        self.assertTrue(wait_for(alice, "demo.client.state === 'reconnecting'"))
        for i in range(3):
            self.send(bob, f"while away {i}")
        self.assertTrue(wait_for(bob, "demo.messages.filter(m => m.text.startsWith('while away')).length === 3"))
        self.proxy.restore()

        self.assertTrue(wait_for(alice, "demo.client.state === 'open' && "
                                        "demo.messages.filter(m => m.text.startsWith('while away')).length >= 3",
                                 timeout=30))
        texts = self.texts(alice)
        self.assertEqual(texts, ["hello alice", "hi bob", "while away 0", "while away 1", "while away 2"])
        offsets = alice.execute_script("return demo.messages.map(m => m.offset)")
        self.assertEqual(offsets, sorted(set(offsets)))      # no duplicates, in order
        self.assertIn("while away 2", alice.find_element("id", "log").text)


PATTERN_INI = """
[node]
name = browser-patterns

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
poll_wait = 2s

[channel:*.x]
history_size = 2
"""

SUBSCRIBE = """
const [transport, pattern, done] = arguments;
const go = () => {
  const client = msgd.connect(undefined, { transport, minDelay: 50, maxDelay: 200 });
  const seen = window[pattern] = { client, got: [], gaps: [] };
  client.on("gap", (channel, info) => seen.gaps.push([channel, info.recovered]));
  client.subscribe(pattern, (data, ev) => seen.got.push(ev.channel + ":" + ev.offset))
    .then(() => done(true), (e) => done(e.message));
};
""" + WITH_MSGD_JS


class PatternResumeTests(unittest.TestCase):
    """msgd.js resumes a pattern subscription after a cut with the positions
    it holds: every matched channel's missed events, once each, in order —
    and a ``gap`` when the node's history no longer covers them — over
    WebSocket, SSE and long-poll."""

    def setUp(self):
        self.node = NodeProcess(os.path.abspath(self.mktemp()), PATTERN_INI).start()
        self.addCleanup(self.node.stop)
        self.proxy = CuttableProxy(self.node.port)
        self.addCleanup(self.proxy.stop)

    def publish(self, channel):
        call(self.node.port, "rpc.publish", channel, None)

    def away(self, driver, pattern, *channels):
        """Cut the client off, publish on ``channels`` meanwhile, let it back."""
        self.proxy.cut()
        self.assertTrue(wait_for(driver, f"window['{pattern}'].client.state === 'reconnecting'"))
        for c in channels:
            self.publish(c)
        self.proxy.restore()
        self.assertTrue(wait_for(driver, f"window['{pattern}'].client.state === 'open'", timeout=30))

    def test_pattern_resumed_over_every_transport(self):
        driver = chromium(self)
        driver.get(f"http://127.0.0.1:{self.proxy.port}/msgd.js")     # the node's origin, through the proxy
        for t in ("websocket", "sse", "poll"):
            pattern, x, y = f"{t}.*", f"{t}.x", f"{t}.y"
            self.publish(x)                                  # before: the answer gives its position
            self.assertTrue(driver.execute_async_script(SUBSCRIBE, t, pattern))
            self.publish(x)
            self.assertTrue(wait_for(driver, f"window['{pattern}'].got.length === 1"))
            self.away(driver, pattern, x, y)                 # x 3 and y 1 while away
            self.publish(x)
            self.assertTrue(wait_for(driver, f"window['{pattern}'].got.length === 4"), t)
            self.assertEqual(driver.execute_script(f"return window['{pattern}'].got"),
                             [f"{x}:2", f"{x}:3", f"{y}:1", f"{x}:4"], t)
            # history of 2: x 5, 6, 7 while away cannot all be replayed: the gap is told
            self.away(driver, pattern, x, x, x)
            self.assertTrue(wait_for(driver, f"window['{pattern}'].gaps.length === 1"), t)
            self.assertEqual(driver.execute_script(f"return window['{pattern}'].gaps"), [[pattern, False]], t)
            self.publish(x)
            self.assertTrue(wait_for(driver, f"window['{pattern}'].got.includes('{x}:8')"), t)
            driver.execute_script(f"window['{pattern}'].client.close()")
