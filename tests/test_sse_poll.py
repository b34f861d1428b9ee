"""/sse with a real SSE client (sseclient-py over requests, in a thread) and
/poll with plain HTTP: subscribe, receive, resume after a cut, calls,
session expiry and bounds."""

import gc
import json
import tracemalloc

import requests
import sseclient
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from msgd.core import jsonrpc
from msgd.interfaces.sse import EventStream
from tests.helpers import SocketTransport, http, http_port, make_node

INI = """
[node]
name = sse-test

[pubsub]
history_size = 10

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
poll_wait = 5s
poll_max_queue = 4KiB
"""

APPS = {"m.py": '''
from msgd import api

def add(a: int, b: int) -> int:
    return a + b

def announce(channel: str, text: str):
    return api.publish(channel, {"text": text})
'''}


class SSE:
    """A blocking SSE client: every method runs in a thread."""

    def __init__(self, url: str, last_event_id: str | None = None):
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.response = requests.get(url, stream=True, headers=headers, timeout=10)
        self.status = self.response.status_code
        self.content_type = self.response.headers.get("content-type")
        self.events = sseclient.SSEClient(self.response).events()

    def read(self, n: int) -> list[tuple[str, dict]]:
        """The next ``n`` messages as (id, JSON-RPC message)."""
        out = []
        for event in self.events:
            out.append((event.id, json.loads(event.data)))
            if len(out) == n:
                break
        return out

    def close(self):
        self.response.close()


class Base(unittest.TestCase):
    def setUp(self):
        self.node = make_node(self, INI, APPS)
        self.base = f"http://127.0.0.1:{http_port(self.node)}"
        self.registry = self.node.interfaces["web"].shared.poll_sessions
        self.addCleanup(self.registry.close_all)

    @defer.inlineCallbacks
    def sse(self, query: str, last_event_id=None):
        c = yield deferToThread(SSE, f"{self.base}/sse?{query}", last_event_id)
        self.addCleanup(deferToThread, c.close)
        return c

    def publish(self, channel, *values):
        for v in values:
            self.node.pubsub.publish(channel, v)


class SSETests(Base):
    @defer.inlineCallbacks
    def test_subscribe_receive_resume(self):
        c = yield self.sse("channel=room&channel=news.*")
        self.assertEqual((c.status, c.content_type), (200, "text/event-stream; charset=utf-8"))
        first = yield deferToThread(c.read, 2)
        answers = {m["params"]["channel"]: m["params"] for _, m in first}
        self.assertEqual(set(answers), {"room", "news.*"})
        self.assertEqual(first[0][1]["method"], "rpc.subscribed")
        epoch = answers["room"]["epoch"]
        self.publish("room", "a", "b")
        self.publish("news.today", "n1")
        got = yield deferToThread(c.read, 3)
        self.assertEqual([(m["method"], m["params"]["channel"], m["params"]["data"]) for _, m in got],
                         [("rpc.event", "room", "a"), ("rpc.event", "room", "b"), ("rpc.event", "news.today", "n1")])
        last_id = got[1][0]          # seen: room up to offset 2 (not news yet), and the pattern
        self.assertEqual(last_id, f"{epoch}:2:room -:0:news.*")
        yield deferToThread(c.close)
        # the cut: more events while away; a new stream with Last-Event-ID gets exactly the missed ones
        self.publish("room", "c", "d")
        c2 = yield self.sse("channel=room", last_event_id=last_id)
        got = yield deferToThread(c2.read, 3)
        self.assertEqual([m["params"].get("data") for _, m in got[:2]], ["c", "d"])
        self.assertEqual([m["params"]["offset"] for _, m in got[:2]], [3, 4])
        self.assertEqual(got[2][1]["method"], "rpc.subscribed")
        self.assertTrue(got[2][1]["params"]["recovered"])
        self.assertEqual(got[1][0], f"{epoch}:4:room")

    @defer.inlineCallbacks
    def test_pattern_resumes_every_matched_channel(self):
        self.publish("a.x", "x1")
        c = yield self.sse("channel=a.*")
        [(first_id, answer)] = yield deferToThread(c.read, 1)
        self.assertEqual(answer["params"]["offset"], {"a.x": 1})
        self.publish("a.x", "x2")
        [(last_id, _)] = yield deferToThread(c.read, 1)
        epoch = answer["params"]["epoch"]["a.x"]
        self.assertEqual(last_id, f"-:0:a.* {epoch}:2:a.x")
        yield deferToThread(c.close)
        # while away: a.x goes on, and a channel the stream never saw begins
        self.publish("a.x", "x3")
        self.publish("a.y", "y1")
        c2 = yield self.sse("channel=a.*", last_event_id=last_id)
        got = yield deferToThread(c2.read, 3)
        self.assertEqual([(m["params"]["channel"], m["params"]["data"]) for _, m in got[:2]],
                         [("a.x", "x3"), ("a.y", "y1")])
        self.assertEqual(got[2][1]["method"], "rpc.subscribed")
        self.assertTrue(got[2][1]["params"]["recovered"])
        yield deferToThread(c2.close)
        # history (10) no longer covers what a stream that stopped at a.x 2 missed: it is told
        self.publish("a.x", *range(10))
        c3 = yield self.sse("channel=a.*", last_event_id=last_id)
        got = yield deferToThread(c3.read, 2)
        self.assertEqual(got[0][1]["params"]["channel"], "a.y")       # what can be replayed still is
        self.assertEqual(got[1][1]["method"], "rpc.subscribed")
        self.assertFalse(got[1][1]["params"]["recovered"])

    @defer.inlineCallbacks
    def test_channel_and_pattern_resumed_together_send_each_event_once(self):
        c = yield self.sse("channel=a.x&channel=a.*")
        yield deferToThread(c.read, 2)
        self.publish("a.x", "x1")
        [(last_id, _)] = yield deferToThread(c.read, 1)
        yield deferToThread(c.close)
        self.publish("a.x", "x2", "x3")
        c2 = yield self.sse("channel=a.x&channel=a.*", last_event_id=last_id)
        got = yield deferToThread(c2.read, 4)
        self.assertEqual([(m["method"], m["params"].get("data"), m["params"].get("recovered")) for _, m in got],
                         [("rpc.event", "x2", None), ("rpc.event", "x3", None),
                          ("rpc.subscribed", None, True), ("rpc.subscribed", None, True)])

    @defer.inlineCallbacks
    def test_resume_with_a_lost_epoch_is_told(self):
        self.publish("room", "a")
        c = yield self.sse("channels=room", last_event_id="oldepoch:1:room")
        got = yield deferToThread(c.read, 1)
        self.assertEqual(got[0][1]["method"], "rpc.subscribed")
        self.assertFalse(got[0][1]["params"]["recovered"])

    @defer.inlineCallbacks
    def test_bad_requests(self):
        for query in ["", "channel=", "channel=bad%20name"]:
            code, _, body = yield http("GET", f"{self.base}/sse?{query}")
            self.assertEqual(code, 400, query)
            self.assertEqual(json.loads(body)["error"]["code"], -32602)
        code, _, _ = yield http("GET", f"{self.base}/sse?session=nope")
        self.assertEqual(code, 404)

    def stream_over_socket(self):
        """An SSE stream of ``room`` over a transport that buffers like Twisted's TCP one."""
        iface = self.node.interfaces["web"]
        t = SocketTransport(room=10 ** 9)
        p = t.protocol = iface.factory().buildProtocol(None)
        p.makeConnection(t)
        self.addCleanup(t.abortConnection)
        p.dataReceived(b"GET /sse?channel=room HTTP/1.1\r\nHost: x\r\n\r\n")
        return iface, t, p

    def test_events_of_the_turn_go_before_the_end_of_the_stream(self):
        """An event written in the turn the stream ends in (held for the end
        of the turn) still goes, before the response's end."""
        iface, t, p = self.stream_over_socket()
        iface.turn.run()
        [stream] = [c for c in gc.get_referrers(p.requests[0]) if isinstance(c, EventStream)]
        self.publish("room", "last")
        stream.close()
        iface.turn.run()
        t.flush()
        self.assertIn(b'"data":"last"', t.sent)
        self.assertTrue(t.sent.endswith(b"0\r\n\r\n"))

    def test_slow_consumer_told_before_what_was_not_sent(self):
        """Over a transport that buffers like Twisted's TCP one: the events
        the socket has begun go whole, the rest is dropped, an rpc.closing
        message comes next, then the end of the stream, and the connection
        closes once that is read (aborted after close_timeout otherwise)."""
        iface, t, p = self.stream_over_socket()
        for i in range(3):
            self.publish("room", "x" * 1000)
        iface.turn.run()                # the turn's three events go in one write
        t.room = len(t.sent) + 1500     # the socket takes the head, one event and a half, then no more
        t.flush()
        for i in range(100):
            self.publish("room", "x" * 1000)
        iface.turn.run()
        self.assertEqual(self.node.metrics.value("msgd_poll_dropped_total",
                                                 {"interface": "web", "reason": "slow_consumer"}), 1)
        self.assertEqual(self.node.pubsub.presence("room")["count"], 0)
        self.assertIn(t, iface._aborts)            # aborted after close_timeout unless it reads
        t.room = 10 ** 9                # it reads again
        t.flush()
        head, _, body = t.sent.partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        stream = b""
        while True:                     # the chunked body: whole chunks, then the last one
            size, _, body = body.partition(b"\r\n")
            if int(size, 16) == 0:
                self.assertEqual(body, b"\r\n")
                break
            stream, body = stream + body[:int(size, 16)], body[int(size, 16) + 2:]
        messages = [json.loads(line[len(b"data: "):]) for line in stream.split(b"\n")
                    if line.startswith(b"data: ")]
        self.assertEqual([m["method"] for m in messages], ["rpc.subscribed"] + ["rpc.event"] * 3 + ["rpc.closing"])
        self.assertEqual([m["params"]["offset"] for m in messages[1:4]], [1, 2, 3])
        self.assertTrue(messages[-1]["params"]["reason"].startswith("slow consumer"))
        self.assertTrue(t.disconnected)
        self.assertNotIn(t, iface._aborts)


class PollTests(Base):
    @defer.inlineCallbacks
    def open(self):
        code, _, body = yield http("POST", f"{self.base}/poll")
        self.assertEqual(code, 201)
        info = json.loads(body)
        self.assertEqual((info["wait"], info["idle"]), (5.0, 60.0))
        return info["session"]

    @defer.inlineCallbacks
    def post(self, sid, msg):
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        code, _, body = yield http("POST", f"{self.base}/poll?session={sid}", data,
                                   {"content-type": "application/json"})
        return code, json.loads(body)

    @defer.inlineCallbacks
    def get(self, sid, wait=5):
        code, _, body = yield http("GET", f"{self.base}/poll?session={sid}&wait={wait}")
        return code, json.loads(body)

    @defer.inlineCallbacks
    def test_calls_answered(self):
        sid = yield self.open()
        code, out = yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "m.add", "params": [2, 3]})
        self.assertEqual((code, out), (202, {"queued": True}))
        yield self.post(sid, [{"jsonrpc": "2.0", "id": 2, "method": "m.add", "params": [1, 1]},
                              {"jsonrpc": "2.0", "id": 3, "method": "nope.nope"}])
        code, msgs = yield self.get(sid)
        self.assertEqual(code, 200)
        self.assertEqual(msgs[0], {"jsonrpc": "2.0", "result": 5, "id": 1})
        self.assertEqual([(a["id"], a.get("result"), a.get("error", {}).get("code")) for a in msgs[1]],
                         [(2, 2, None), (3, None, -32601)])
        yield self.post(sid, b"{not json")
        code, msgs = yield self.get(sid)
        self.assertEqual(msgs[0]["error"]["code"], -32700)

    @defer.inlineCallbacks
    def test_queued_answers_are_right_sized(self):
        """An answer waiting in a session's queue holds its length, not the
        4 KB buffer of orjson 3.12+'s bytes (the queue's bound counts lengths)."""
        sid = yield self.open()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        for i in range(20):
            yield self.post(sid, {"jsonrpc": "2.0", "id": i, "method": "m.add", "params": [i, 1]})
        queue = self.registry.get(sid).queue
        self.assertEqual(len(queue), 20)
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, jsonrpc.__file__)])
        held = sum(stat.size for stat in snapshot.statistics("filename"))
        self.assertLess(held, 20 * 200, f"{held} bytes for {sum(map(len, queue))} bytes of answers")

    @defer.inlineCallbacks
    def test_subscribe_receive_and_wait(self):
        sid = yield self.open()
        self.publish("room", "old")
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe",
                              "params": {"channel": "room", "since": 0}})
        code, msgs = yield self.get(sid)
        # the replayed event comes before the subscribe answer, as on /ws
        self.assertEqual(msgs[0]["method"], "rpc.event")
        self.assertEqual(msgs[0]["params"]["data"], "old")
        self.assertEqual((msgs[1]["id"], msgs[1]["result"]["recovered"]), (1, True))
        # a waiting GET is answered when an event comes
        waiting = self.get(sid)
        yield deferToThread(lambda: None)     # let the GET reach the node
        for _ in range(100):
            session = self.registry.get(sid)
            if session.waiter is not None:
                break
            yield deferToThread(lambda: None)
        self.assertIsNotNone(session.waiter)
        other = yield self.open()
        yield self.post(other, {"jsonrpc": "2.0", "id": 9, "method": "m.announce", "params": ["room", "hi"]})
        code, msgs = yield waiting
        self.assertEqual([(m["method"], m["params"]["data"]) for m in msgs], [("rpc.event", {"text": "hi"})])
        # nothing queued: an empty answer after the wait
        code, msgs = yield self.get(sid, wait=0)
        self.assertEqual((code, msgs), (200, []))

    @defer.inlineCallbacks
    def test_pattern_resume(self):
        self.publish("a.x", "x1")
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "a.*"}})
        _, [answer] = yield self.get(sid)
        held = {"since": answer["result"]["offset"], "epoch": answer["result"]["epoch"]}
        yield http("DELETE", f"{self.base}/poll?session={sid}")
        self.publish("a.x", "x2")
        self.publish("a.y", "y1")
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe",
                              "params": dict(held, channel="a.*")})
        _, msgs = yield self.get(sid)
        self.assertEqual([m["params"]["data"] for m in msgs[:2]], ["x2", "y1"])
        self.assertTrue(msgs[2]["result"]["recovered"])
        yield http("DELETE", f"{self.base}/poll?session={sid}")
        # history (10) no longer covers what a session that stopped at a.x 1 missed: it is told,
        # and what can be replayed still is
        self.publish("a.x", *range(10))
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe",
                              "params": dict(held, channel="a.*")})
        _, msgs = yield self.get(sid)
        self.assertEqual([m["params"]["data"] for m in msgs[:-1]], ["y1"])
        self.assertFalse(msgs[-1]["result"]["recovered"])

    @defer.inlineCallbacks
    def test_session_stream_over_sse(self):
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "room"}})
        c = yield self.sse(f"session={sid}")
        got = yield deferToThread(c.read, 1)
        self.assertEqual(got[0][1]["id"], 1)      # the queued answer
        self.publish("room", "x")
        yield self.post(sid, {"jsonrpc": "2.0", "id": 2, "method": "m.add", "params": [1, 2]})
        got = yield deferToThread(c.read, 2)
        self.assertEqual(got[0][1]["params"]["data"], "x")
        self.assertEqual(got[1][1]["result"], 3)

    @defer.inlineCallbacks
    def test_expiry_and_delete(self):
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "room"}})
        self.assertEqual(len(self.node.pubsub.channels["room"].subscribers), 1)
        self.registry.get(sid).last_seen -= 61       # as if nobody polled for longer than poll_idle
        self.registry.expire()
        code, out = yield self.get(sid)
        self.assertEqual((code, out["error"]["code"]), (404, -32003))
        self.assertEqual(len(self.node.pubsub.channels["room"].subscribers), 0)
        self.assertEqual(self.node.metrics.value("msgd_poll_dropped_total",
                                                 {"interface": "web", "reason": "idle"}), 1)
        sid = yield self.open()
        code, _, _ = yield http("DELETE", f"{self.base}/poll?session={sid}")
        self.assertEqual(code, 200)
        code, _ = yield self.get(sid)
        self.assertEqual(code, 404)
        self.assertIsNone(self.registry._expiry)    # no sessions: no timer

    @defer.inlineCallbacks
    def test_slow_consumer_ends_the_session(self):
        sid = yield self.open()
        yield self.post(sid, {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "room"}})
        self.publish("room", *["x" * 500] * 10)
        code, body = yield self.get(sid)        # told why, on the next request
        self.assertEqual(code, 410)
        self.assertTrue(body["error"]["message"].startswith("session ended: slow consumer"))
        code, _, _ = yield http("GET", f"{self.base}/sse?session={sid}")
        self.assertEqual(code, 410)
        self.assertEqual(self.node.metrics.value("msgd_poll_dropped_total",
                                                 {"interface": "web", "reason": "slow_consumer"}), 1)


class AccessTests(unittest.TestCase):
    """The [access:*] rules hold on /sse and /poll as on /ws."""

    def setUp(self):
        self.node = make_node(self, INI + """
            [access:public]
            interfaces = web
            call = m.add
            subscribe = news.*
            """, APPS)
        self.base = f"http://127.0.0.1:{http_port(self.node)}"
        self.addCleanup(self.node.interfaces["web"].shared.poll_sessions.close_all)

    @defer.inlineCallbacks
    def test_rules(self):
        code, _, body = yield http("GET", f"{self.base}/sse?channel=secret")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (403, -32001))
        code, _, body = yield http("POST", f"{self.base}/poll")
        sid = json.loads(body)["session"]
        url = f"{self.base}/poll?session={sid}"
        yield http("POST", url, json.dumps([
            {"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "secret"}},
            {"jsonrpc": "2.0", "id": 2, "method": "m.announce", "params": ["news.a", "x"]},
            {"jsonrpc": "2.0", "id": 3, "method": "rpc.subscribe", "params": {"channel": "news.a"}},
            {"jsonrpc": "2.0", "id": 4, "method": "m.add", "params": [1, 2]}]).encode())
        code, _, body = yield http("GET", url + "&wait=5")
        answers = {a["id"]: a for a in json.loads(body)[0]}
        self.assertEqual(answers[1]["error"]["code"], -32001)
        self.assertEqual(answers[2]["error"]["code"], -32001)
        self.assertTrue(answers[3]["result"]["recovered"])
        self.assertEqual(answers[4]["result"], 3)


class LoginTests(unittest.TestCase):
    """With anonymous off: opening a long-poll session or an SSE stream needs
    credentials (Authorization, or the msgd_token cookie from an allowed
    Origin, as on the WebSocket handshake); after that the session id speaks
    for the session and its principal."""

    SECRET = "sse-login-secret"

    def setUp(self):
        self.node = make_node(self, INI + f"""
            anonymous = no
            token_secret = {self.SECRET}
            ws_origins = http://app.example
            """, dict(APPS, **{"who.py": "from msgd import api\n\ndef ami():\n"
                                     "    p = api.request().principal\n    return p and p.name\n"}))
        self.base = f"http://127.0.0.1:{http_port(self.node)}"
        self.addCleanup(self.node.interfaces["web"].shared.poll_sessions.close_all)
        self.token = self.node.interfaces["web"].guard.issue_token("alice")["token"]

    @defer.inlineCallbacks
    def who(self, sid):
        url = f"{self.base}/poll?session={sid}"
        code, _, _ = yield http("POST", url, b'{"jsonrpc": "2.0", "id": 1, "method": "who.ami"}')
        self.assertEqual(code, 202)          # no credentials needed: the session id speaks for it
        code, _, body = yield http("GET", url + "&wait=5")
        return json.loads(body)[0]["result"]

    @defer.inlineCallbacks
    def test_open_needs_credentials(self):
        code, headers, _ = yield http("POST", f"{self.base}/poll")
        self.assertEqual(code, 401)
        # no Basic challenge: a browser would prompt for a password instead of failing the fetch
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="msgd"'])
        code, _, _ = yield http("GET", f"{self.base}/sse?channel=room")
        self.assertEqual(code, 401)
        code, _, _ = yield http("POST", f"{self.base}/poll", None, {"authorization": "Bearer v1.forged.token"})
        self.assertEqual(code, 401)
        code, _, _ = yield http("POST", f"{self.base}/poll?session=unknown", b"{}")
        self.assertEqual(code, 404)          # an unknown id is not a login: nothing to authenticate

    @defer.inlineCallbacks
    def test_token_header_then_session(self):
        code, _, body = yield http("POST", f"{self.base}/poll", None, {"authorization": f"Bearer {self.token}"})
        self.assertEqual(code, 201)
        name = yield self.who(json.loads(body)["session"])
        self.assertEqual(name, "alice")

    @defer.inlineCallbacks
    def test_token_cookie_from_an_allowed_origin(self):
        cookie = {"cookie": f"theme=dark; msgd_token={self.token}"}
        code, _, body = yield http("POST", f"{self.base}/poll", None, dict(cookie, origin="http://app.example"))
        self.assertEqual(code, 201)
        name = yield self.who(json.loads(body)["session"])
        self.assertEqual(name, "alice")
        code, _, _ = yield http("POST", f"{self.base}/poll", None, dict(cookie, origin="http://evil.example"))
        self.assertEqual(code, 401)          # a cookie another site's page brought along is not believed
        c = yield deferToThread(requests.get, f"{self.base}/sse?channel=room", stream=True, timeout=10,
                                headers=cookie)
        self.addCleanup(deferToThread, c.close)
        self.assertEqual(c.status_code, 200)
        # the cookie counts only where a browser cannot send a header: not on /rpc
        code, _, _ = yield http("POST", f"{self.base}/rpc", b'{"jsonrpc": "2.0", "id": 1, "method": "who.ami"}',
                                dict(cookie, origin="http://app.example"))
        self.assertEqual(code, 401)
