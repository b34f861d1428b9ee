"""A short run of bench/fuzz.py's hypothesis generators over every decoder
that faces the network (JSON-RPC, WebSocket messages, XML-RPC, SOAP, STOMP
frames): every input answered with a result or an error, nothing escaping a
decoder, no failure logged.  ``python -m bench.fuzz`` runs 100,000 inputs."""

from __future__ import annotations

from collections import Counter

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from bench import fuzz

EXAMPLES = 60      # generated inputs per decoder, each followed by 3 damaged copies


class FuzzTests(unittest.TestCase):
    def setUp(self):
        self.harness = fuzz.Harness()
        self.addCleanup(self.harness.close)
        self.failures = fuzz.Failures()
        globalLogPublisher.addObserver(self.failures)
        self.addCleanup(globalLogPublisher.removeObserver, self.failures)

    def run_decoder(self, name):
        counts = Counter()
        fuzz.run(self.harness, name, EXAMPLES, counts, variants=3)
        self.assertEqual(self.failures.seen, [])
        self.assertGreaterEqual(sum(counts.values()), EXAMPLES * 4)
        # dispatcher's logged internal errors (m.boom) are expected; trial must not fail on them
        self.flushLoggedErrors(RuntimeError)

    def test_jsonrpc(self):
        self.run_decoder("jsonrpc")

    def test_websocket(self):
        self.run_decoder("websocket")

    def test_xmlrpc(self):
        self.run_decoder("xmlrpc")

    def test_soap(self):
        self.run_decoder("soap")

    def test_stomp(self):
        self.run_decoder("stomp")
