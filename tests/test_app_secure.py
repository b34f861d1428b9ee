"""apps/secure.py: a function that reads the principal and refuses."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from msgd.core import errors
from msgd.security import Principal
from tests.helpers import ROOT, make_node

INI = """
[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
token_secret = 0123456789abcdef0123456789abcdef
"""


class SecureAppTests(unittest.TestCase):
    def setUp(self):
        with open(os.path.join(ROOT, "apps", "secure.py")) as f:
            self.node = make_node(self, INI, {"secure.py": f.read()})

    def call(self, target, *args, principal=None):
        req = self.node.new_request("web", principal=principal)
        return self.node.dispatcher.call(req, target, args)

    @defer.inlineCallbacks
    def test_refund_needs_ops(self):
        ops = Principal("ann", frozenset({"ops"}), "password")
        result = yield self.call("secure.refund", "o1", 10.0, principal=ops)
        self.assertEqual(result, {"order_id": "o1", "refunded": 10.0, "by": "ann"})
        for who, amount in ((None, 1.0), (Principal("bob"), 1.0), (ops, 5000.0)):
            with self.assertRaises(errors.Unauthorized):
                yield self.call("secure.refund", "o1", amount, principal=who)

    @defer.inlineCallbacks
    def test_whoami_and_token(self):
        self.assertEqual((yield self.call("secure.whoami"))["via"], "anonymous")
        with self.assertRaises(errors.Unauthorized):
            yield self.call("secure.browser_token")
        token = yield self.call("secure.browser_token", principal=Principal("ann", frozenset({"ops"})))
        p = self.node.interfaces["web"].guard.tokens.verify(token["token"])
        self.assertEqual((p.name, p.roles), ("ann", frozenset({"ops"})))
