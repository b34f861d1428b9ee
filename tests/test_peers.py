"""Peer calls and async messages between two in-process nodes over real PB
connections."""

from twisted.internet import defer
from twisted.trial import unittest

from msgd.core import errors
from tests.helpers import eventually, make_node, rpc
from tests.servers import free_port

CALLEE = """
[node]
name = callee
request_timeout = 5s

[interface:pb]
type = pb
endpoint = tcp:0:interface=127.0.0.1
users = caller:s3cret
"""

CALLEE_APPS = {
    "inv.py": '''
from msgd import api
events = []

def total(a: int, b: int = 0) -> int:
    return a + b

def whoami():
    return [api.request().principal, round(api.request().remaining(), 1)]

async def slow(seconds: float):
    events.append("started")
    try:
        await api.sleep(seconds)
    except BaseException:
        events.append("cancelled")
        raise
    return "done"

def fail():
    raise api.AppError("no stock", code=-32020)

def take(item):
    events.append(item)
''',
}

CALLER_APPS = {
    "front.py": '''
from msgd import api

async def proxied(a, b):
    return await api.peer("back").inv.total(a, b=b)

async def explicit(target, *args):
    return await api.peer("back").call(target, *args)

async def queue(item):
    return await api.peer("back").send("inv.take", item)

async def queue_as(message_id, item):
    return await api.peer("back").send_with_id(message_id, "inv.take", item)
''',
}


def caller_ini(*ports, timeout="5s", extra=""):
    endpoints = " ".join(f"tcp:host=127.0.0.1:port={p}" for p in ports)
    return f"""
[node]
name = caller
request_timeout = {timeout}

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1

[peer:back]
endpoints = {endpoints}
username = caller
password = s3cret
timeout = 3s
max_retry_delay = 1s
{extra}
"""


def connected(peer, count=1) -> defer.Deferred:
    """Fires once ``count`` endpoints of ``peer`` are logged in."""
    if len(peer.live) >= count:
        return defer.succeed(peer)
    d = defer.Deferred()

    def check(name):
        if len(peer.live) >= count and not d.called:
            peer.listeners.remove(check)
            d.callback(peer)
    peer.listeners.append(check)
    return d


class PeerTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.callee = make_node(self, CALLEE, CALLEE_APPS)
        yield self.callee.ready()
        self.events = self.callee.apps.modules["inv"].module.events

    def pb_port(self, node):
        return node.interfaces["pb"].port.getHost().port

    @defer.inlineCallbacks
    def caller(self, ports=None, **kw):
        node = make_node(self, caller_ini(*(ports or [self.pb_port(self.callee)]), **kw), CALLER_APPS)
        yield node.ready()
        return node

    @defer.inlineCallbacks
    def test_calls_through_the_proxy(self):
        a = yield self.caller()
        yield connected(a.peers["back"])
        web = a.interfaces["web"].port.getHost().port
        r = yield rpc(web, {"jsonrpc": "2.0", "id": 1, "method": "front.proxied", "params": [2, 3]})
        self.assertEqual(r["result"], 5)
        r = yield rpc(web, {"jsonrpc": "2.0", "id": 1, "method": "front.explicit", "params": ["inv.whoami"]})
        principal, remaining = r["result"]
        self.assertEqual(principal, "caller")
        self.assertLessEqual(remaining, 5.0)     # the caller's remaining time travelled
        self.assertGreater(remaining, 3.0)

    @defer.inlineCallbacks
    def test_errors_come_back_as_the_taxonomy(self):
        a = yield self.caller()
        yield connected(a.peers["back"])
        peer = a.peer("back")
        with self.assertRaises(errors.NotFound):
            yield peer.call("inv.missing")
        with self.assertRaises(errors.InvalidParams):
            yield peer.inv.total("x")
        try:
            yield peer.inv.fail()
        except errors.ApplicationError as e:
            self.assertEqual((e.code, e.message), (-32020, "no stock"))
        else:
            self.fail("no error")

    @defer.inlineCallbacks
    def test_deadline_enforced_on_the_callee(self):
        a = yield self.caller(timeout="0.3s")
        yield connected(a.peers["back"])
        web = a.interfaces["web"].port.getHost().port
        r = yield rpc(web, {"jsonrpc": "2.0", "id": 1, "method": "front.explicit", "params": ["inv.slow", 30]})
        self.assertEqual(r["error"]["code"], errors.Timeout.code)
        yield self.callee.dispatcher.drained()
        self.assertEqual(self.events, ["started", "cancelled"])   # the callee stopped the work itself

    @defer.inlineCallbacks
    def test_down_peer_fails_fast(self):
        a = yield self.caller([free_port()])
        with self.assertRaises(errors.Unavailable):
            yield a.peer("back").inv.total(1, 2)
        self.assertEqual(a.health()["peers"]["back"]["connected"], 0)

    @defer.inlineCallbacks
    def test_replicas_take_over(self):
        second = make_node(self, CALLEE.replace("callee", "callee2"), CALLEE_APPS)
        yield second.ready()
        a = yield self.caller([self.pb_port(self.callee), self.pb_port(second)])
        peer = a.peers["back"]
        yield connected(peer, 2)
        results = yield defer.gatherResults([a.peer("back").inv.total(i) for i in range(4)])
        self.assertEqual(results, [0, 1, 2, 3])
        yield self.callee.stopService()
        yield eventually(lambda: len(peer.live) == 1)     # the drop is seen when the connection closes
        self.assertEqual((yield a.peer("back").inv.total(7)), 7)

    @defer.inlineCallbacks
    def test_send_is_delivered_once(self):
        a = yield self.caller()
        web = a.interfaces["web"].port.getHost().port
        r = yield rpc(web, {"jsonrpc": "2.0", "id": 1, "method": "front.queue", "params": ["apple"]})
        message_id = r["result"]
        self.assertTrue(message_id)
        yield eventually(lambda: not a.outbox.queues["back"])
        self.assertEqual(self.events, ["apple"])
        yield self.callee.received.handle(message_id, lambda: self.fail("handled twice")).addCallback(
            self.assertTrue)

    @defer.inlineCallbacks
    def test_send_with_the_callers_id_again_is_harmless(self):
        """A caller that cannot know whether its send() was written (it was
        killed before the answer) sends again under the same id."""
        a = yield self.caller()
        web = a.interfaces["web"].port.getHost().port
        for _ in range(2):
            r = yield rpc(web, {"jsonrpc": "2.0", "id": 1, "method": "front.queue_as", "params": ["order-7", "pear"]})
            self.assertEqual(r["result"], "order-7")
            yield eventually(lambda: not a.outbox.queues["back"])
        self.assertEqual(self.events, ["pear"])


