"""The JSON-RPC connection object (msgd.interfaces.connection) without a
transport: an AppHarness for the node's services, a real pub/sub Broker on
its clock, bytes in and out as lists."""

import json
import os
from types import SimpleNamespace

from twisted.trial import unittest

from msgd.core import errors
from msgd.core.pubsub import Broker
from msgd.interfaces import base
from msgd.interfaces.connection import CONNECTED, STATELESS, Clients
from msgd.security.principal import Principal
from msgd.testing import AppHarness
from tests.helpers import write

APP = "def add(a, b):\n    return a + b\n"


class Guard:
    """What rpc.login and rpc.token use of an interface's guard."""

    def __init__(self):
        self.logins, self.denials = [], []

    def login(self, user, password, address=""):
        from twisted.internet import defer
        self.logins.append((user, password, address))
        return defer.succeed(Principal(user or "t", frozenset({"r"}), "password" if user else "token"))

    def denied(self, reason, *args):
        self.denials.append(reason)

    def issue_token(self, name, roles=(), ttl=None):
        return {"token": f"T-{name}"}


class ConnectionTests(unittest.TestCase):
    def setUp(self):
        apps = os.path.abspath(self.mktemp())
        write(os.path.join(apps, "m.py"), APP)
        self.harness = AppHarness(apps, interface="web")
        self.harness.pubsub = Broker(self.harness.clock)
        self.iface = base.Interface("web", SimpleNamespace(request_timeout=7.0), self.harness)
        self.iface.guard = Guard()
        self.events, self.answers = [], []

    def connect(self, methods=CONNECTED, principal=None):
        clients = Clients(self.iface, max_batch=10, max_subscriptions=2, methods=methods)
        return clients.connect(self.events.append, principal, address="10.0.0.9")

    def ask(self, c, method, params, id=1):
        c.answer(json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode(),
                 lambda data: self.answers.append(json.loads(data)))
        return self.answers[-1] if self.answers else None

    def test_a_call_is_answered_with_the_interface_deadline_and_the_principal(self):
        c = self.connect(principal="alice")
        self.assertEqual(self.ask(c, "m.add", [2, 3])["result"], 5)
        r = c.new_request()
        self.assertEqual((r.interface, r.principal, r.deadline - self.harness.clock.seconds()), ("web", "alice", 7.0))

    def test_a_notification_gets_no_answer(self):
        c = self.connect()
        c.answer(b'{"jsonrpc":"2.0","method":"m.add","params":[1,2]}', self.answers.append)
        self.assertEqual(self.answers, [])

    def test_subscribe_delivers_events_to_the_adapter_until_closed(self):
        c = self.connect(principal="alice")
        self.assertEqual(self.ask(c, "rpc.subscribe", {"channel": "c"})["result"]["offset"], 0)
        self.harness.pubsub.publish("c", 1)
        self.assertEqual([e.data for e in self.events], [1])
        self.assertEqual(self.harness.pubsub.presence("c")["principals"], ["alice"])
        c.close()
        self.harness.pubsub.publish("c", 2)
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.harness.pubsub.presence("c")["count"], 0)

    def test_subscriptions_are_bounded(self):
        c = self.connect()
        self.ask(c, "rpc.subscribe", ["a"], 1)
        self.ask(c, "rpc.subscribe", ["b"], 2)
        self.assertEqual(self.ask(c, "rpc.subscribe", ["d"], 3)["error"]["code"], -32004)

    def test_only_the_methods_given_are_offered(self):
        c = self.connect()
        self.assertEqual(self.ask(c, "rpc.login", {"user": "u", "password": "p"})["error"]["code"], -32601)
        self.assertEqual(self.ask(c, "rpc.token", {})["error"]["code"], -32601)

    def test_login_sets_the_principal_for_later_calls(self):
        c = self.connect(methods=(*CONNECTED, "rpc.login"))
        self.assertEqual(self.ask(c, "rpc.login", {"user": "bob", "password": "pw"})["result"],
                         {"name": "bob", "roles": ["r"], "via": "password"})
        self.assertEqual(self.iface.guard.logins, [("bob", "pw", "10.0.0.9")])
        self.assertEqual(c.principal.name, "bob")
        self.ask(c, "rpc.login", {"token": "TOK"})
        self.assertEqual(self.iface.guard.logins[-1], ("", "TOK", "10.0.0.9"))

    def test_stateless_table_is_what_http_offers(self):
        builtins = Clients(self.iface, 10, 0, STATELESS).stateless()
        self.assertEqual(sorted(builtins), ["rpc.presence", "rpc.publish", "rpc.token"])
        request = self.harness.new_request("web", principal=Principal("carol", frozenset(), "password"))
        self.assertEqual(builtins["rpc.token"](request, {}), {"token": "T-carol"})
        request = self.harness.new_request("web", principal=Principal("carol", frozenset(), "token"))
        self.assertRaises(errors.Unauthorized, builtins["rpc.token"], request, {})
        self.assertEqual(self.iface.guard.denials, ["token_request"])

    def test_channel_access_is_the_access_rules(self):
        calls = []

        def authorize(request, action, channel):
            calls.append((action, channel))
            if channel == "secret":
                raise errors.Unauthorized("unauthorized")
        clients = Clients(self.iface, 10, 5)
        clients.authorize = authorize
        c = clients.connect(self.events.append)
        self.assertEqual(self.ask(c, "rpc.subscribe", ["secret"])["error"]["code"], -32001)
        self.ask(c, "rpc.publish", {"channel": "open", "data": 1})
        self.ask(c, "rpc.presence", ["open"])
        self.assertEqual(calls, [("subscribe", "secret"), ("publish", "open"), ("subscribe", "open")])
