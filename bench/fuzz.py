"""``python -m bench.fuzz [N]``: hypothesis-generated inputs for every
decoder that faces the network — JSON-RPC (as over HTTP /rpc), WebSocket
JSON-RPC messages (with pub/sub), XML-RPC, SOAP 1.1/1.2 and STOMP frames —
fed to the node's real code (no sockets: the resources and sessions are
driven directly, on a fake clock).  Each input must be answered with a
result or an error in its protocol's form; an exception escaping a decoder,
or an input left unanswered, is a crash.  N inputs per decoder (default
20,000: 100,000 in total).  Prints counts per decoder and outcome, ending
with ``0 crashes`` or exits 1.

tests/test_fuzz.py runs the same generators briefly as part of ``make test``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import textwrap
import time
from collections import Counter

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from msgd.core.jsonrpc import JSONRPC

APP = '''
from msgd import api

def add(a: int, b: int = 1) -> int:
    return a + b

def echo(x=None, *rest, **kw):
    return x

def boom(*a, **kw):
    raise RuntimeError("bug")

def deny():
    raise api.Unauthorized("no")
'''

INI = """
[node]
name = fuzz
request_timeout = 5s

[interface:web]
type = http
endpoint = tcp:0:interface=127.0.0.1
max_body = 64KiB
max_batch = 20
xml_max_depth = 32
token_secret = fuzz-secret-0123456789
"""

# -- generators ---------------------------------------------------------------------------

text = st.text(max_size=40)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(text, inner, max_size=4)),
                          max_leaves=12)
methods = st.one_of(st.sampled_from(["m.add", "m.echo", "m.boom", "m.deny", "m.nope", "nope.x", "m", ".",
                                     "rpc.subscribe", "rpc.unsubscribe", "rpc.publish", "rpc.presence",
                                     "rpc.token", "rpc.nope", "__import__", "m.__init__"]), text)
message = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.one_of(st.just("2.0"), json_scalar),
    "method": st.one_of(methods, json_scalar),
    "params": st.one_of(st.lists(json_value, max_size=4), st.dictionaries(
        st.sampled_from(["a", "b", "x", "channel", "data", "since", "epoch"]) | text, json_value, max_size=4),
        json_value),
    "id": st.one_of(st.integers(), text, st.none(), st.floats(allow_nan=False), st.booleans(), json_value),
})


def _dumps(v) -> bytes:
    return json.dumps(v).encode()


jsonrpc_input = st.one_of(
    message.map(_dumps),
    st.lists(message, max_size=8).map(_dumps),
    st.tuples(st.sampled_from(["m.add", "m.echo"]), st.lists(st.integers(-5, 5), max_size=2), st.integers()).map(
        lambda t: _dumps({"jsonrpc": "2.0", "method": t[0], "params": t[1], "id": t[2]})),   # mostly valid
    json_value.map(_dumps),
    st.binary(max_size=200),
    text.map(str.encode),
    st.tuples(message.map(_dumps), st.integers(0, 60), st.binary(max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),                   # damaged JSON
)

XML_TYPES = ["int", "i4", "i8", "boolean", "string", "double", "dateTime.iso8601", "base64", "nil", "struct",
             "array", "bogus", "ex:nil", "ex:i8"]


@st.composite
def xml_value(draw, depth=0):
    kind = draw(st.sampled_from(XML_TYPES if depth < 3 else XML_TYPES[:8]))
    if kind == "struct":
        members = draw(st.lists(st.tuples(text, xml_value(depth + 1)), max_size=3))
        inner = "".join(f"<member><name>{_esc(n)}</name>{v}</member>" for n, v in members)
    elif kind == "array":
        inner = "<data>" + "".join(draw(st.lists(xml_value(depth + 1), max_size=3))) + "</data>"
    elif kind in ("nil", "ex:nil"):
        inner = ""
    else:
        inner = _esc(draw(st.one_of(text, st.integers().map(str), st.sampled_from(
            ["1", "0", "true", "19980717T14:08:55", "AAEC", "2.5", "-0", "99999999999999999999"]))))
    body = f"<{kind}>{inner}</{kind}>" if draw(st.booleans()) else inner
    return f"<value>{body}</value>"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def xmlrpc_call(draw):
    method = draw(st.one_of(methods, st.sampled_from(["system.listMethods", "system.methodHelp",
                                                      "system.methodSignature", "system.multicall"])))
    params = "".join(f"<param>{v}</param>" for v in draw(st.lists(xml_value(), max_size=3)))
    head = draw(st.sampled_from(["<?xml version='1.0'?>", "", "<?xml version='1.0' encoding='latin-1'?>"]))
    return f"{head}<methodCall><methodName>{_esc(method)}</methodName><params>{params}</params></methodCall>".encode()


ATTACKS = [b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "x">]><methodCall><methodName>&e;</methodName></methodCall>',
           b'<!DOCTYPE a SYSTEM "file:///etc/passwd"><a/>', b"<a>" * 2000, b"<a xmlns:x='" + b"x" * 5000 + b"'/>",
           b"\xff\xfe<\x00a\x00/\x00>\x00", b"<methodCall><methodName>m.add</methodName><params><param>"
           b"<value><array><data>" * 40]
xmlrpc_input = st.one_of(
    xmlrpc_call(),
    st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=3).map(lambda ns: (    # mostly valid
        "<methodCall><methodName>m.add</methodName><params>" + "".join(
            f"<param><value><int>{n}</int></value></param>" for n in ns) + "</params></methodCall>").encode()),
    st.sampled_from(ATTACKS),
    st.binary(max_size=200),
    st.tuples(xmlrpc_call(), st.integers(0, 200), st.binary(max_size=4)).map(lambda t: t[0][:t[1]] + t[2]
                                                                                     + t[0][t[1]:]),
)

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"


@st.composite
def soap_call(draw):
    ns = draw(st.sampled_from([SOAP11, SOAP12, "urn:other"]))
    op = draw(st.one_of(st.sampled_from(["add", "echo", "boom", "deny", "nope"]), st.from_regex(r"[a-z]{1,8}",
                                                                                               fullmatch=True)))
    fields = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "x", "y"]), st.one_of(
        text, st.integers().map(str))), max_size=3))
    args = "".join(f"<{k}>{_esc(v)}</{k}>" for k, v in fields)
    header = draw(st.sampled_from(["", '<e:Header><h xmlns="urn:h" e:mustUnderstand="1"/></e:Header>',
                                   "<e:Header/>"]))
    body = draw(st.sampled_from([f'<t:{op}>{args}</t:{op}>', "", f"<t:{op}/><t:{op}/>", "text"]))
    return ns, (f'<e:Envelope xmlns:e="{ns}" xmlns:t="urn:msgd:m">{header}<e:Body>{body}</e:Body>'
                f'</e:Envelope>').encode()


soap_input = st.one_of(
    soap_call(),
    st.tuples(st.sampled_from([SOAP11, SOAP12]), st.integers(), st.integers()).map(lambda t: (t[0], (   # valid
        f'<e:Envelope xmlns:e="{t[0]}" xmlns:t="urn:msgd:m"><e:Body><t:add><a>{t[1]}</a><b>{t[2]}</b></t:add>'
        f'</e:Body></e:Envelope>').encode())),
    st.tuples(st.sampled_from([SOAP11, SOAP12]), st.one_of(st.sampled_from(ATTACKS), st.binary(max_size=200))),
    st.tuples(soap_call(), st.integers(0, 200), st.binary(max_size=4)).map(
        lambda t: (t[0][0], t[0][1][:t[1]] + t[2] + t[0][1][t[1]:])),
)

ws_message = st.one_of(
    jsonrpc_input,
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(0, 9),
                           "method": st.sampled_from(["rpc.subscribe", "rpc.unsubscribe", "rpc.publish",
                                                      "rpc.presence"]),
                           "params": st.fixed_dictionaries({}, optional={
                               "channel": st.one_of(st.sampled_from(["c", "news.*", "*", "a b", ""]), text,
                                                    json_value),
                               "data": json_value, "since": json_scalar, "epoch": json_scalar})}).map(_dumps),
)

STOMP_COMMANDS = ["CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT",
                  "ABORT", "DISCONNECT", "CONNECTED", "bogus", ""]
stomp_header = st.tuples(
    st.one_of(st.sampled_from(["destination", "id", "receipt", "content-length", "content-type", "ack",
                               "transaction", "accept-version", "heart-beat", "login", "passcode", "reply-to",
                               "message-id", "msgd-since"]), text),
    st.one_of(st.sampled_from(["/topic/c", "/app/m.add", "/app/m.boom", "/queue/x", "1", "0", "-1", "99999",
                               "client", "1.2", "1.0", "0,0", "10,10", "x\\c", "\\n", "\\q"]), text))


@st.composite
def stomp_frame(draw) -> bytes:
    command = draw(st.one_of(st.sampled_from(STOMP_COMMANDS), text))
    headers = draw(st.lists(stomp_header, max_size=5))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=40), st.just(b"[1,2]"), st.just(b'{"a":1}')))
    head = command + "\n" + "".join(f"{k}:{v}\n" for k, v in headers) + "\n"
    return head.encode("utf-8", "surrogatepass") + body + b"\x00"


CONNECT = b"CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\x00"
stomp_input = st.one_of(
    st.lists(stomp_frame(), min_size=1, max_size=4).map(lambda fs: CONNECT + b"".join(fs)),
    st.lists(stomp_frame(), min_size=1, max_size=3).map(b"".join),
    st.binary(max_size=200).map(lambda b: b + b"\x00"),
)


# -- the decoders, driven directly -------------------------------------------------------------

class Harness:
    """A node built from INI (not started: nothing listens) on a fake clock,
    and one ``feed_X(input) -> outcome`` per decoder.  Outcomes are
    ``result``, ``error``, ``none`` (a notification: nothing is due),
    ``waiting`` (STOMP: a frame not complete yet) or ``closed`` (WebSocket: a
    text message that is not UTF-8 fails the connection, code 1007); anything
    else raises."""

    def __init__(self):
        from msgd.config import parse_text
        from msgd.node import NodeService
        self.dir = tempfile.mkdtemp(prefix="msgd-fuzz-")
        os.makedirs(os.path.join(self.dir, "apps"))
        with open(os.path.join(self.dir, "apps", "m.py"), "w") as f:
            f.write(textwrap.dedent(APP))
        self.clock = Clock()
        self.node = NodeService(parse_text(INI, os.path.join(self.dir, "node.ini")), self.clock)
        self.node.load_apps()
        self.node.pubsub.start()
        web = self.node.interfaces["web"]
        self.web = web
        self.xmlrpc = web.root.children[b"RPC2"].inner
        self.soap = web.root.children[b"soap"].inner
        from msgd.interfaces.websocket import MsgdWebSocketFactory
        self.ws_factory = MsgdWebSocketFactory(web)

    def close(self):
        self.node.pubsub.stop()
        for call in self.clock.getDelayedCalls():
            call.cancel()

    _jsonrpc = None

    def _settle(self):
        self.clock.advance(10)      # past every deadline: nothing stays pending

    # JSON-RPC over HTTP: the /rpc resource's own path (decode, dispatch, encode)
    def feed_jsonrpc(self, data: bytes) -> str:
        answers = []
        if self._jsonrpc is None:
            self._jsonrpc = JSONRPC(self.node.dispatcher, max_batch=20)
        d = self._jsonrpc.handle(data, lambda: self.node.new_request("web", timeout=5),
                                 self.web.root.children[b"rpc"].inner.builtins)
        d.addBoth(answers.append)
        self._settle()
        return _json_outcome(answers, data)

    def feed_ws(self, data: bytes) -> str:
        from msgd.interfaces.writer import BoundedWriter
        from tests.helpers import server_frames
        proto = self.ws_factory.buildProtocol(None)
        sent = []
        proto.sendMessage = lambda payload, isBinary=False: sent.append(payload)
        proto.transport = StringTransport()      # answers are written as ready-made frames
        proto._perMessageCompress = None
        proto.state = proto.STATE_OPEN
        proto.connection = self.ws_factory.clients.connect(proto.deliver)
        proto.writer = BoundedWriter(proto.transport.write, 1 << 30, lambda limit: None)   # answers: at once
        proto.transport.registerProducer(proto, True)      # as onOpen does
        proto.onMessage(data, False)
        self._settle()
        proto.connection.close()
        if proto.failedByMe:
            # not UTF-8: the connection is failed with 1007; the client goes (ends the close handshake's timer)
            proto.connectionLost(Failure(ConnectionDone()))
            return "closed"
        sent += [payload for _, payload in server_frames(proto.transport.value())]
        return _json_outcome(sent, data)

    def _render(self, resource, data: bytes, path: list, headers: dict) -> bytes:
        req = DummyRequest(path)
        req.method = b"POST"
        req.content = io.BytesIO(data)
        for k, v in headers.items():
            req.requestHeaders.setRawHeaders(k, [v])
        body = resource.render(req)
        if body is not NOT_DONE_YET:
            return body
        self._settle()
        if not req.finished:
            raise AssertionError("request left unanswered")
        return b"".join(req.written)

    def feed_xmlrpc(self, data: bytes) -> str:
        body = self._render(self.xmlrpc, data, [], {b"content-type": b"text/xml"})
        if b"<fault>" in body:
            return "error"
        if b"<params>" in body:
            return "result"
        raise AssertionError(f"not an XML-RPC answer: {body[:200]!r}")

    def feed_soap(self, version_and_data) -> str:
        version, data = version_and_data
        ctype = b"application/soap+xml" if version == SOAP12 else b"text/xml"
        headers = {b"content-type": ctype}
        if version != SOAP12:
            headers[b"soapaction"] = b'""'
        body = self._render(self.soap, data, [b"m"], headers)
        if b"Fault>" in body:
            return "error"
        if b"Envelope" in body:
            return "result"
        raise AssertionError(f"not a SOAP answer: {body[:200]!r}")

    def feed_stomp(self, data: bytes) -> str:
        from msgd.interfaces.stomp.session import SessionOptions, StompSession
        out, closed = [], []
        web = self.node.interfaces["web"]      # a session of /ws, with the bounds the WebSocket layer gives it
        o = web.options
        session = StompSession(self.node, "web", out.append, closed.append, peer="fuzz",
                               options=SessionOptions.within(o.ws_max_message, o.ws_max_pending, web.timeout()))
        session.data_received(data)
        self._settle()
        session.connection_lost()
        written = b"".join(out)
        if b"ERROR\n" in written:
            return "error"
        if written:
            return "result"
        if session.decoder.pending():
            return "waiting"
        raise AssertionError(f"STOMP input unanswered: {data[:200]!r}")


def _notifications_only(data: bytes) -> bool:
    """Is ``data`` one valid notification, or a batch of nothing else (the
    only inputs JSON-RPC leaves unanswered)?"""
    def one(m):
        return (isinstance(m, dict) and m.get("jsonrpc") == "2.0" and isinstance(m.get("method"), str)
                and "id" not in m and isinstance(m.get("params", []), (list, dict)))
    try:
        msg = json.loads(data)
    except ValueError:
        return False
    return one(msg) or (isinstance(msg, list) and bool(msg) and all(one(m) for m in msg))


def _json_outcome(answers: list, data: bytes) -> str:
    answers = [a for a in answers if a is not None]
    if len(answers) > 1:
        raise AssertionError(f"{len(answers)} answers to one message")
    if not answers:
        if _notifications_only(data):
            return "none"     # JSON-RPC answers nothing to notifications
        raise AssertionError(f"no answer to {data[:200]!r}")
    answer = answers[0]
    if not isinstance(answer, bytes):
        raise AssertionError(f"not bytes: {answer!r}")
    decoded = json.loads(answer)
    items = decoded if isinstance(decoded, list) else [decoded]
    for a in items:
        if not (isinstance(a, dict) and a.get("jsonrpc") == "2.0" and ("result" in a) != ("error" in a)):
            raise AssertionError(f"not a JSON-RPC answer: {a!r}")
    return "error" if all("error" in a for a in items) else "result"


DECODERS = {
    "jsonrpc": (jsonrpc_input, "feed_jsonrpc"),
    "websocket": (ws_message, "feed_ws"),
    "xmlrpc": (xmlrpc_input, "feed_xmlrpc"),
    "soap": (soap_input, "feed_soap"),
    "stomp": (stomp_input, "feed_stomp"),
}


def mutations(data: bytes, seed: int, n: int):
    """``n`` damaged copies of ``data`` (truncated, a byte flipped, bytes
    inserted, a slice repeated): cheap extra inputs around each generated one."""
    import random
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(len(data) + 1)
        how = rng.randrange(4)
        if how == 0:
            yield data[:i]
        elif how == 1 and data:
            i = min(i, len(data) - 1)
            yield data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
        elif how == 2:
            yield data[:i] + rng.choice([b"\x00", b"\xff", b"<", b"\"", b"{", b"\n\n", b"]", b":"]) + data[i:]
        else:
            yield data[:i] + data[i:i + rng.randrange(1, 40)] * 2 + data[i + 40:]


def run(harness: Harness, name: str, examples: int, counts: Counter, variants: int = 0) -> None:
    """Feed ``examples`` generated inputs, each followed by ``variants``
    mutations of it, to one decoder; raises on the first crash (hypothesis
    then prints the input)."""
    strategy, method = DECODERS[name]
    feed = getattr(harness, method)

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy, st.integers(0, 2 ** 32))
    def check(data, seed):
        counts[(name, feed(data))] += 1
        raw = data[1] if isinstance(data, tuple) else data
        for damaged in mutations(raw, seed, variants):
            counts[(name, feed((data[0], damaged) if isinstance(data, tuple) else damaged))] += 1
    check()


class Failures:
    """A log observer keeping failures logged anywhere but where the
    dispatcher reports the app bugs it maps to internal_error (m.boom):
    an unhandled error in a Deferred, a decoder's logged failure."""

    def __init__(self):
        self.seen: list = []

    def __call__(self, event):
        if "log_failure" in event and not event.get("log_namespace", "").startswith("msgd.core.dispatch"):
            self.seen.append(event["log_failure"])


def main(argv) -> int:
    import argparse
    from twisted.logger import globalLogBeginner
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("n", nargs="?", type=int, default=20_000, help="inputs per decoder (default 20,000)")
    per = p.parse_args(argv).n
    variants = 7                    # each generated input is followed by 7 damaged copies of it
    examples = max(1, per // (variants + 1))
    failures = Failures()
    globalLogBeginner.beginLoggingTo([failures], redirectStandardIO=False)
    harness = Harness()
    counts: Counter = Counter()
    crashes = 0
    started = time.monotonic()
    try:
        for name in DECODERS:
            t0 = time.monotonic()
            try:
                run(harness, name, examples, counts, variants)
            except Exception as e:      # hypothesis re-raises the first failure with its input
                crashes += 1
                print(f"{name}: CRASH {type(e).__name__}: {e}", flush=True)
            n = sum(v for (d, _), v in counts.items() if d == name)
            detail = ", ".join(f"{o} {v}" for (d, o), v in sorted(counts.items()) if d == name)
            print(f"{name:10} {n:7d} inputs in {time.monotonic() - t0:6.1f}s: {detail}", flush=True)
    finally:
        harness.close()
    for f in failures.seen:
        print(f"CRASH logged: {f.getTraceback()}")
    crashes += len(failures.seen)
    total = sum(counts.values())
    print(f"{total} inputs in {time.monotonic() - started:.1f}s, {crashes} crashes")
    if crashes:
        raise SystemExit(1)      # also under ``python -m bench all``
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
