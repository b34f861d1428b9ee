"""The services interface (msgd.services.Services): the node and the
AppHarness both provide it, and parts built on it run on the harness without
a node — a PB perspective and interface, a JSON-RPC stream listener (on a
MemoryReactorClock), a peer (which takes a reactor and an outbox)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from msgd.cluster.peers import Peer
from msgd.config import PeerConfig, parse_text
from msgd.core import errors
from msgd.core.pubsub import Broker
from msgd.interfaces import base
from msgd.interfaces.pb import PBInterface, Perspective
from msgd.interfaces.stream import StreamInterface
from msgd.node import NodeService
from msgd.services import Services
from msgd.testing import AppHarness
from tests.helpers import write

APP = '''
from msgd import api

def add(a: int, b: int) -> int:
    return a + b

async def whoami() -> str:
    await api.sleep(1)
    return api.request().principal

notes = []

def note(text: str) -> int:
    notes.append(text)
    return len(notes)
'''


class ServicesTests(unittest.TestCase):
    def setUp(self):
        apps = os.path.abspath(self.mktemp())
        write(os.path.join(apps, "m.py"), APP)
        self.harness = AppHarness(apps, timeout=5, principal="bob", interface="web")

    def test_node_and_harness_provide_it(self):
        node = NodeService(parse_text("[node]\nname = n\n", os.path.abspath("node.ini")), Clock())
        for services in (node, self.harness):
            self.assertIsInstance(services, Services)
        self.assertNotIsInstance(object(), Services)

    def test_harness_requests(self):
        self.harness.clock.advance(100)
        r = self.harness.new_request("pb", timeout=2, principal="alice")
        self.assertEqual((r.interface, r.deadline, r.principal, r.services), ("pb", 102, "alice", self.harness))
        r = self.harness.new_request()
        self.assertEqual((r.interface, r.deadline, r.principal), ("web", 105, "bob"))
        self.assertEqual(self.successResultOf(self.harness.run_blocking(sum, [1, 2])), 3)

    def test_tokens_through_the_services(self):
        """``api.issue_token`` asks the services for the interface's token:
        the stream interface's guard signs it and accepts it as a login;
        an interface that is not there gives NotFound."""
        iface = StreamInterface("s", self.options("[interface:s]\ntype = jsonrpc-stream\nendpoint = tcp:0\n"
                                                  "token_secret = 0123456789abcdef\n"), self.harness)
        self.harness.interfaces["s"] = iface
        token = self.harness.issue_token("s", "carol", ["ops"], 60)["token"]
        principal = iface.guard.verify_token(token)
        self.assertEqual((principal.name, principal.roles), ("carol", frozenset({"ops"})))
        self.assertRaises(errors.NotFound, self.harness.issue_token, "nope", "carol")

    def test_pb_perspective_on_a_harness(self):
        p = Perspective(base.Interface("pb", SimpleNamespace(request_timeout=5.0), self.harness), "alice")
        self.assertEqual(p.perspective_call("m.add", [2, 3]), 5)
        d = p.perspective_call("m.whoami")
        self.assertNoResult(d)
        self.harness.clock.advance(1)
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertEqual(self.successResultOf(p.perspective_publish("news", {"n": 1})), 1)
        self.assertEqual(self.harness.published, [("news", {"n": 1})])

    def options(self, section: str):
        return parse_text(section, os.path.abspath("node.ini")).interfaces[0].options

    def test_pb_interface_on_a_harness(self):
        """A message delivered twice is handled once: the second is answered
        as a duplicate from the services' ``received`` store (the harness
        keeps it in memory)."""
        iface = PBInterface("pb", self.options("[interface:pb]\ntype = pb\nendpoint = tcp:0\nusers = a:pw\n"),
                            self.harness)
        self.assertIs(iface.received, self.harness.received)
        p = Perspective(iface, "alice")
        for duplicate in (False, True):
            answer = p.perspective_send("m.note", ["hi"], message_id="msg-1")
            self.assertEqual(self.successResultOf(answer), {"message_id": "msg-1", "duplicate": duplicate})
        self.assertEqual(self.harness.apps.modules["m"].module.notes, ["hi"])

    def test_a_listener_on_a_harness(self):
        """A JSON-RPC stream listener built on a harness whose reactor is a
        MemoryReactorClock (and, for its Sessions, a real Broker): it
        listens on the memory reactor, counts its connections in the
        services' metrics and answers a call over a StringTransport."""
        reactor = MemoryReactorClock()
        harness = AppHarness(self.harness.apps.directory, clock=reactor)
        harness.pubsub = Broker(reactor)
        iface = StreamInterface("s", self.options("[interface:s]\ntype = jsonrpc-stream\nendpoint = tcp:0\n"), harness)
        iface.startService()
        self.assertEqual(self.successResultOf(iface.ready), iface)
        [(port, factory, _, _)] = reactor.tcpServers
        client = IPv4Address("TCP", "192.0.2.1", 5000)
        protocol, transport = factory.buildProtocol(client), StringTransport(peerAddress=client)
        protocol.makeConnection(transport)
        self.assertEqual(harness.metrics.value("msgd_interface_connections", {"interface": "s"}), 1)
        protocol.dataReceived(b'{"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]}\n')
        reactor.advance(0)                      # writes go out at the end of the reactor turn
        self.assertEqual(transport.value(), b'{"jsonrpc":"2.0","result":5,"id":1}\n')
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(harness.metrics.value("msgd_interface_connections", {"interface": "s"}), 0)
        iface.stopService()


class PeerTests(unittest.TestCase):
    def test_a_peer_takes_a_reactor_and_an_outbox(self):
        sent = []

        class Outbox:
            def send(self, peer, target, args, kwargs, message_id=None):
                sent.append((peer, target, args, kwargs, message_id))
                return defer.succeed("id-1")
        reactor = MemoryReactorClock()
        peer = Peer("b", PeerConfig(endpoints=("tcp:host=127.0.0.1:port=1",)), reactor, Outbox())
        self.assertEqual(self.successResultOf(peer.proxy.send("m.add", 1, b=2)), "id-1")
        self.assertEqual(sent, [("b", "m.add", (1,), {"b": 2}, None)])
        self.failureResultOf(peer.proxy.m.add(1, 2), errors.Unavailable)     # not connected: at once
        peer.startService()
        self.assertEqual(len(reactor.tcpClients), 1)                          # connecting on the given reactor
        peer.stopService()
