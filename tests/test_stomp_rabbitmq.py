"""The consumer interface and the STOMP adapter against a real RabbitMQ
(``rabbitmq_stomp``, from tests/servers.py).  Each test uses its own queue
(declared with ``x-expires`` so the broker forgets it afterwards); the
broker side of each test is driven with stomp.py in threads."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
import uuid

import stomp
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial import unittest

from msgd.adapters.base import AdapterRejected
from tests.helpers import ROOT, make_node
from tests.process import NodeProcess
from tests.servers import stomp_broker

WAIT = 15.0
EXPIRES = {"x-expires": "120000"}
with open(os.path.join(ROOT, "apps", "stomp_demo.py")) as _f:
    DEMO = _f.read()

FLAKY = """
    from msgd import api

    def take(message):
        if not message["redelivered"]:
            raise api.AppError("the first delivery fails")
        return api.publish("broker.messages", {"data": message["body"].decode(), "redelivered": True})
    """

SLOW = """
    import os
    import time
    from msgd import api

    BASE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    @api.blocking
    def take(message):
        body = message["body"].decode()
        if not message["redelivered"]:
            with open(os.path.join(BASE, "started"), "a") as f:
                f.write(body + "\\n")
            time.sleep(60)       # the node is killed in here
        with open(os.path.join(BASE, "done"), "a") as f:
            f.write(body + "\\n")
    """


def new_queue() -> str:
    return f"/queue/msgd-test-{uuid.uuid4().hex[:12]}"


def connect(server) -> stomp.Connection12:
    conn = stomp.Connection12([(server.host, server.port)], vhost=server.extra["vhost"])
    conn.connect(server.extra["login"], server.extra["passcode"], wait=True)
    return conn


def broker_send(server, destination: str, bodies, headers=EXPIRES) -> None:
    conn = connect(server)
    try:
        for body in bodies:
            conn.send(destination, body, headers=dict(headers))
    finally:
        conn.disconnect()       # waits for its receipt: everything before it was taken


def broker_take(server, destination: str, n: int = 1, headers=EXPIRES) -> list:
    got = queue.Queue()

    class L(stomp.ConnectionListener):
        def on_message(self, frame):
            got.put(frame)
    conn = connect(server)
    conn.set_listener("take", L())
    try:
        conn.subscribe(destination, id="take", ack="auto", headers=dict(headers))
        return [got.get(timeout=WAIT) for _ in range(n)]
    finally:
        conn.disconnect()


def consumer_ini(endpoint: str, destination: str, handler: str, extra: str = "") -> str:
    return f"""
        [interface:jobs]
        type = stomp-consumer
        endpoint = {endpoint}
        login = guest
        passcode = guest
        vhost = /
        destinations = {destination}
        handler = {handler}
        prefetch = 5
        heartbeat = 2s
        max_backoff = 1s
        subscribe_headers = x-expires:120000
        {extra}
        """


class Handled:
    """A pub/sub subscriber collecting what the handler announced."""

    principal = None

    def __init__(self, node, channel="broker.messages"):
        self.events = defer.DeferredQueue()
        node.pubsub.subscribe(channel, self)

    def deliver(self, event):
        self.events.put(event.data)

    @defer.inlineCallbacks
    def next(self):
        """The next announcement, once the consumer finished with its message
        (acked it: the ACK follows the handler in the same reactor turn)."""
        event = yield self.events.get().addTimeout(WAIT, reactor)
        yield deferLater(reactor, 0, lambda: None)
        return event


class CuttableProxy(portforward.ProxyFactory):
    """A loopback TCP proxy whose connections the test can cut."""

    def __init__(self, host, port):
        super().__init__(host, port)
        self.open = set()

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        made, lost = p.connectionMade, p.connectionLost
        p.connectionMade = lambda: (self.open.add(p), made())[1]
        p.connectionLost = lambda reason: (self.open.discard(p), lost(reason))[1]
        return p

    def cut(self):
        for p in list(self.open):
            if p.peer is not None:
                p.peer.transport.abortConnection()
            p.transport.abortConnection()


class ConsumerTests(unittest.TestCase):
    def setUp(self):
        self.server = stomp_broker()
        self.endpoint = f"tcp:host={self.server.host}:port={self.server.port}"
        self.queue = new_queue()

    def node(self, handler, apps, endpoint=None, extra=""):
        node = make_node(self, consumer_ini(endpoint or self.endpoint, self.queue, handler, extra), apps)
        return node

    def counted(self, node, outcome):
        return node.metrics.counter("msgd_stomp_consumer_messages_total", "", ["interface", "outcome"]) \
            .labels("jobs", outcome)._value.get()

    @defer.inlineCallbacks
    def test_each_message_handled_once_and_acked(self):
        node = self.node("stomp_demo.take", {"stomp_demo.py": DEMO})
        handled = Handled(node)
        bodies = [json.dumps({"n": i}) for i in range(5)]
        yield deferToThread(broker_send, self.server, self.queue, bodies, dict(EXPIRES, **{"content-type": "application/json"}))
        got = []
        for _ in bodies:
            got.append((yield handled.next()))
        self.assertEqual(sorted(e["data"]["n"] for e in got), list(range(5)))
        self.assertFalse(any(e["redelivered"] for e in got))
        self.assertEqual(self.counted(node, "acked"), 5)
        # nothing is left unacknowledged: after the consumer stops, the next
        # message on the queue is a new one, not one of ours coming back
        yield node.interfaces["jobs"].stopService()
        yield deferToThread(broker_send, self.server, self.queue, ["last"])
        left = yield deferToThread(broker_take, self.server, self.queue)
        self.assertEqual(left[0].body, "last")

    @defer.inlineCallbacks
    def test_failing_handler_nacks_and_the_broker_redelivers(self):
        node = self.node("flaky.take", {"flaky.py": FLAKY})
        handled = Handled(node)
        yield deferToThread(broker_send, self.server, self.queue, ["again"])
        event = yield handled.next()
        self.assertEqual(event, {"data": "again", "redelivered": True})
        self.assertEqual((self.counted(node, "failed"), self.counted(node, "acked")), (1, 1))

    @defer.inlineCallbacks
    def test_broker_connection_cut_then_restored(self):
        proxy = CuttableProxy(self.server.host, self.server.port)
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(lambda: port.stopListening() if port.connected else None)
        number = port.getHost().port
        node = self.node("stomp_demo.take", {"stomp_demo.py": DEMO},
                         endpoint=f"tcp:host=127.0.0.1:port={number}")
        handled = Handled(node)
        yield deferToThread(broker_send, self.server, self.queue, ["one"])
        self.assertEqual((yield handled.next())["data"], "one")

        # break: no listener and the open connection cut; a message arrives meanwhile
        yield port.stopListening()
        proxy.cut()
        yield deferToThread(broker_send, self.server, self.queue, ["two"])
        # restore on the same port: the consumer reconnects, subscribes again, continues
        port = reactor.listenTCP(number, proxy, interface="127.0.0.1")
        # "one" may come again (redelivered) when the cut beat its ACK to the broker
        event = yield handled.next()
        if event["data"] == "one":
            self.assertTrue(event["redelivered"])
            event = yield handled.next()
        self.assertEqual(event["data"], "two")
        connects = node.metrics.counter("msgd_stomp_consumer_connects_total", "", ["interface"]) \
            .labels("jobs")._value.get()
        self.assertGreaterEqual(connects, 2)

    @defer.inlineCallbacks
    def test_kill_mid_handling_then_restart_redelivers(self):
        base = os.path.abspath(self.mktemp())
        ini = """
            [node]
            name = killme
            apps = apps
            state_dir = state

            [interface:web]
            type = http
            endpoint = tcp:{port}:interface=127.0.0.1
            """ + consumer_ini(self.endpoint, self.queue, "slow.take")
        proc = NodeProcess(base, ini, {"slow.py": SLOW})
        self.addCleanup(proc.stop)
        yield deferToThread(proc.start)
        yield deferToThread(broker_send, self.server, self.queue, ["precious"])
        started = yield deferToThread(wait_for_file, os.path.join(base, "started"))
        self.assertEqual(started, "precious\n")
        proc.signal(signal.SIGKILL)
        yield deferToThread(proc.wait)
        self.assertFalse(os.path.exists(os.path.join(base, "done")))
        proc.stop()                      # closes the old pipes
        yield deferToThread(proc.start)
        done = yield deferToThread(wait_for_file, os.path.join(base, "done"))
        self.assertEqual(done, "precious\n")


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return text
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {WAIT}s")


class AdapterTests(unittest.TestCase):
    def setUp(self):
        self.server = stomp_broker()
        self.queue = new_queue()
        self.node = make_node(self, f"""
            [adapter:broker]
            type = stomp
            endpoint = tcp:host={self.server.host}:port={self.server.port}
            login = guest
            passcode = guest
            timeout = 10s
            """, {"stomp_demo.py": DEMO})

    @defer.inlineCallbacks
    def test_send_fires_after_the_receipt(self):
        broker = self.node.adapters["broker"]
        yield broker.send(self.queue, {"n": 1}, EXPIRES)
        yield broker.send(self.queue, "text", EXPIRES)
        got = yield deferToThread(broker_take, self.server, self.queue, 2)
        self.assertEqual([(f.body, f.headers["content-type"]) for f in got],
                         [('{"n":1}', "application/json"), ("text", "text/plain; charset=utf-8")])

    @defer.inlineCallbacks
    def test_app_forwards_through_the_adapter(self):
        # the example app, as /app/stomp_demo.forward would call it
        request = self.node.new_request("test")
        result = yield self.node.dispatcher.call(request, "stomp_demo.forward", (self.queue, [1, 2]))
        self.assertEqual(result, {"sent": self.queue})
        got = yield deferToThread(broker_take, self.server, self.queue, 1, {})
        self.assertEqual(json.loads(got[0].body), [1, 2])

    @defer.inlineCallbacks
    def test_broker_error_is_a_rejection(self):
        broker = self.node.adapters["broker"]
        with self.assertRaises(AdapterRejected) as cm:
            yield broker.send("/nowhere/x", "lost")
        self.assertIn("broker ERROR", str(cm.exception))
        # the pool replaces the closed connection
        yield broker.send(self.queue, "after", EXPIRES)
        got = yield deferToThread(broker_take, self.server, self.queue)
        self.assertEqual(got[0].body, "after")
