"""apps/stomp_demo.py as its author would test it (the broker side is in
tests/test_stomp_rabbitmq.py)."""

import os

from twisted.internet import defer
from twisted.trial import unittest

from msgd.core import errors
from msgd.testing import AppHarness
from tests.helpers import ROOT


class FakeBroker:
    def __init__(self):
        self.sent = []

    def send(self, destination, body, headers=None):
        self.sent.append((destination, body))
        return defer.succeed(None)


class StompDemoTests(unittest.TestCase):
    def setUp(self):
        self.apps = AppHarness(os.path.join(ROOT, "apps"))

    def test_take_announces(self):
        msg = {"destination": "/queue/o", "redelivered": False, "headers": {}, "body": b'{"id":1}', "data": {"id": 1}}
        self.apps.result("stomp_demo.take", msg)
        text = dict(msg, body=b"hello", redelivered=True)
        del text["data"]
        self.apps.result("stomp_demo.take", text)
        self.assertEqual(self.apps.published, [
            ("broker.messages", {"destination": "/queue/o", "data": {"id": 1}, "redelivered": False}),
            ("broker.messages", {"destination": "/queue/o", "data": "hello", "redelivered": True})])

    def test_take_refuses_binary(self):
        msg = {"destination": "/queue/o", "redelivered": False, "headers": {}, "body": b"\xff\xfe"}
        e = self.assertRaises(errors.ApplicationError, self.apps.result, "stomp_demo.take", msg)
        self.assertEqual(e.code, -32020)

    def test_forward(self):
        broker = self.apps.adapters["broker"] = FakeBroker()
        self.assertEqual(self.apps.result("stomp_demo.forward", "/queue/x", {"a": 1}), {"sent": "/queue/x"})
        self.assertEqual(broker.sent, [("/queue/x", {"a": 1})])
        self.assertRaises(errors.InvalidParams, self.apps.result, "stomp_demo.forward", "x", 1)
