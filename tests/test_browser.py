"""The demo page in real headless Chromium: two pages chat through the node;
one page's socket is cut, messages are sent while it is away, and after it
reconnects it shows them all, once each."""

import os

from twisted.trial import unittest

from tests.browser import open_demo, send_chat, wait_for
from tests.helpers import ROOT
from tests.process import NodeProcess
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
