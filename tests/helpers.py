"""Helpers shared by the test modules."""

from __future__ import annotations

import json
import os
import textwrap

import socket

import treq
from twisted.internet import defer, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from msgd.config import parse_text
from msgd.core.pubsub import Event
from msgd.node import NodeService

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(path: str, text: str, bump: bool = True) -> None:
    """Write ``text`` (dedented) to ``path``; ``bump`` moves the mtime forward
    so a change within the same clock tick is still seen."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    existed = os.path.exists(path)
    old = os.stat(path).st_mtime_ns if existed else 0
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    if bump and existed:
        st = os.stat(path)
        if st.st_mtime_ns <= old:
            os.utime(path, ns=(st.st_atime_ns, old + 1_000_000))


def run_now(fn, *args, **kwargs):
    """A ``run_blocking`` stand-in that runs the work at once, in the calling
    thread (for code on a task.Clock, which has no threads)."""
    return defer.maybeDeferred(fn, *args, **kwargs)


class QueuedPool:
    """A ``run_blocking`` stand-in that only queues the work: nothing runs
    until the test calls :meth:`run`, as with a busy thread pool; so a test
    sees what happens on the calling (reactor) thread and what does not."""

    def __init__(self):
        self.queue: list = []

    def __call__(self, fn, *args, **kwargs):
        d = defer.Deferred()
        self.queue.append((fn, args, kwargs, d))
        return d

    def run(self, most: int = 100) -> int:
        """Run what is queued (and what that queues), in order; how many ran."""
        n = 0
        while self.queue and n < most:
            fn, args, kwargs, d = self.queue.pop(0)
            defer.maybeDeferred(fn, *args, **kwargs).chainDeferred(d)
            n += 1
        return n


def make_node(testcase, ini: str, apps: dict[str, str] | None = None, start: bool = True) -> NodeService:
    """A node from ``ini`` text, with its apps dir and state dir in the test's
    temp dir, running on the real reactor; stopped at cleanup."""
    base = os.path.abspath(testcase.mktemp())
    os.makedirs(os.path.join(base, "apps"))
    for name, source in (apps or {}).items():
        write(os.path.join(base, "apps", name), source)
    text = textwrap.dedent(ini)
    if "[node]" not in text:
        text = "[node]\nname = test\n" + text
    config = parse_text(text, os.path.join(base, "node.ini"))
    node = NodeService(config, reactor)
    if start:
        node.privilegedStartService()
        node.startService()
        testcase.addCleanup(lambda: node.stopService() if node.running else None)
    return node


def http_port(node, name: str = "web") -> int:
    return node.interfaces[name].port.getHost().port


@defer.inlineCallbacks
def eventually(check, timeout=10.0, step=0.02):
    """Let the reactor run until ``check()`` (may return a Deferred) is true,
    polling every ``step`` seconds; fail after ``timeout``."""
    for _ in range(max(1, int(timeout / step))):
        if (yield defer.maybeDeferred(check)):
            return
        yield deferLater(reactor, step, lambda: None)
    raise AssertionError(f"condition not reached within {timeout}s")


class Hung(Protocol):
    """Accepts and never answers."""


def hung_listener(testcase) -> int:
    port = reactor.listenTCP(0, Factory.forProtocol(Hung), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


@defer.inlineCallbacks
def disconnect_cancels(testcase, node, port: int, path: bytes, body: bytes, calls: list):
    """POST ``body`` to ``path`` through a raw socket, wait for the app to
    record ``"started"`` in ``calls``, drop the connection, and check that the
    call was cancelled (``"cancelled"``) and nothing is left in flight."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s"
              % (path, len(body), body))
    yield eventually(lambda: calls == ["started"], step=0.01)
    s.close()
    yield eventually(lambda: len(calls) > 1, step=0.01)
    testcase.assertEqual(calls, ["started", "cancelled"])
    testcase.assertEqual(node.dispatcher.in_flight, 0)


@defer.inlineCallbacks
def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one HTTP request through a real socket."""
    from twisted.web.client import FileBodyProducer
    import io
    agent = Agent(reactor)
    h = Headers({k: [v] for k, v in (headers or {}).items()})
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    response = yield agent.request(method.encode(), url.encode(), h, producer)
    data = yield treq.content(response)   # readBody warns on Agent's transport proxy (no abortConnection)
    return response.code, response.headers, data


@defer.inlineCallbacks
def rpc(port: int, payload, raw: bool = False):
    """POST a JSON-RPC payload to /rpc; returns the decoded answer (or None
    for 204)."""
    body = payload if raw else json.dumps(payload).encode()
    code, _, data = yield http("POST", f"http://127.0.0.1:{port}/rpc", body,
                               {"content-type": "application/json"})
    return json.loads(data) if code == 200 else (None if code == 204 else (code, data))


@defer.inlineCallbacks
def breaker_opens(testcase, attempt, attempts: int = 5):
    """Call ``attempt()`` until the adapter's circuit breaker refuses it
    (bounded); returns that CircuitOpen.  On a loaded machine a call that only
    waited in the pool does not count as the server's failure, so the breaker
    may need a few more real timeouts than the fault test made."""
    from msgd.adapters.base import AdapterTimeout, CircuitOpen
    for _ in range(attempts):
        try:
            yield attempt()
        except CircuitOpen as e:
            return e
        except AdapterTimeout:
            continue
    testcase.fail("the circuit breaker did not open")


def ws_subscribe(port: int, channel: str, rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
    """A hand-made WebSocket client on 127.0.0.1:``port`` that has sent
    ``rpc.subscribe`` for ``channel`` (its answer not read): a blocking
    socket with ``timeout`` on every wait, and a receive buffer of
    ``rcvbuf`` when given (a client that stops reading)."""
    import base64
    s = socket.socket()
    s.settimeout(timeout)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = recv_until(s, b"\r\n\r\n")          # the server says nothing more until it is asked
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")
    payload = ('{"jsonrpc":"2.0","id":1,"method":"rpc.subscribe","params":{"channel":"%s"}}' % channel).encode()
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return s


def recv_until(sock: socket.socket, marker: bytes | None = None, reset_ends: bool = False) -> bytes:
    """Read a blocking ``sock`` (in a thread) until ``marker`` has come, or
    (``None``, or first) until the peer closes; a reset is raised, or with
    ``reset_ends`` taken as the close."""
    data = b""
    while marker is None or marker not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            if not reset_ends:
                raise
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data


def raw_exchange(port: int, *parts: bytes, timeout: float = 10.0) -> bytes:
    """Send ``parts`` one after the other on a plain blocking socket (run it
    in a thread) and return the answer, read until the server closes; a
    reset is raised."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for part in parts:
            s.sendall(part)
        return recv_until(s)


class SocketTransport(FileDescriptor):
    """Twisted's own write buffering (``FileDescriptor``) over a pretend
    socket that takes ``room`` bytes and then nothing, as a client that
    stopped reading; the test plays the reactor (``flush``)."""

    def __init__(self, room: int):
        super().__init__(MemoryReactor())
        self.connected = 1
        self.room = room
        self.sent = b""

    def writeSomeData(self, data):
        n = min(len(data), self.room)
        self.sent += bytes(data[:n])
        self.room -= n
        return n

    def flush(self):
        """The reactor's part when the socket is writable."""
        if (self.dataBuffer or self._tempDataBuffer or self.disconnecting) and not self.disconnected:
            if self.doWrite() is not None:      # everything sent after loseConnection: closed
                self.abortConnection()

    def reading(self) -> bool:
        return self in self.reactor.readers

    def startReading(self):
        self.reactor.addReader(self)

    def stopReading(self):
        self.reactor.removeReader(self)

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def abortConnection(self):
        if not self.disconnected:
            self.connectionLost(Failure(ConnectionDone()))
            self.protocol.connectionLost(Failure(ConnectionDone()))


def open_websocket(testcase, interface, transport, subprotocol: bytes = b""):
    """A WebSocket connection of ``interface`` on ``transport`` (a
    :class:`SocketTransport`), past its opening handshake (asking for
    ``subprotocol`` when given); ``transport.sent`` is emptied."""
    from msgd.interfaces.websocket import MsgdWebSocketFactory
    proto = MsgdWebSocketFactory(interface).buildProtocol(None)
    transport.protocol = proto
    proto.makeConnection(transport)
    ask = b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol if subprotocol else b""
    proto.dataReceived(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + ask + b"\r\n")
    transport.flush()
    head, _, rest = transport.sent.partition(b"\r\n\r\n")
    testcase.assertIn(b" 101 ", head.split(b"\r\n")[0])
    testcase.assertEqual(rest, b"")
    transport.sent = b""
    return proto


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames in ``data``; they must be whole."""
    out = []
    while data:
        n, at = data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        assert len(data) >= at + n, "a partial frame"
        out.append((data[0] & 0x0F, data[at:at + n]))
        data = data[at + n:]
    return out


def stomp_frames(data: bytes | str, version: str = "1.2", chunk: int = 0) -> list:
    """Every STOMP frame in ``data`` (fed ``chunk`` bytes at a time, or at once)."""
    from msgd.stomp.codec import Decoder, Limits
    data = data.encode() if isinstance(data, str) else data
    d = Decoder(Limits(), version)
    out = []
    for piece in [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]:
        out += d.feed(piece)
        while d.pending():
            more = d.feed(b"")
            if not more:
                break
            out += more
    return out


class FakeBackend:
    """Stands in for the Redis bridge: publishes and joins are answered by the test."""

    def __init__(self, broker):
        self.broker = broker
        broker.backend = self
        self.connected = True
        self.published: list = []
        self.joins: list = []
        self.following: set = set()
        self.live: set = set()
        self.watching: set = set()
        self.forks: set = set()
        self.listings: list = []      # (pattern, Deferred) of channels(pattern)
        self.reads: list = []         # (name, Deferred) of read(name)

    def available(self, name):
        return self.connected

    def publish(self, name, data_json):
        d = defer.Deferred()
        self.published.append((name, data_json, d))
        return d

    def follow(self, name):
        self.following.add(name)
        if name in self.live or not self.connected:
            return None
        d = defer.Deferred()
        self.joins.append((name, d))
        return d

    def join(self, name, epoch, offset, events):
        """The shared state arrives (what the bridge does after SUBSCRIBE + read)."""
        if name in self.following:
            self.broker.resync(name, epoch, offset, events)
        self.live.add(name)
        for n, d in [j for j in self.joins if j[0] == name]:
            self.joins.remove((n, d))
            d.callback(None)

    def unfollow(self, name):
        self.following.discard(name)
        self.live.discard(name)

    def watch(self, pattern):
        self.watching.add(pattern)

    def unwatch(self, pattern):
        self.watching.discard(pattern)

    def forked(self, name):
        self.forks.add(name)

    def channels(self, pattern):
        d = defer.Deferred()
        self.listings.append((pattern, d))
        return d

    def read(self, name):
        d = defer.Deferred()
        self.reads.append((name, d))
        return d


def shared(offset, data, epoch="E1", channel="c"):
    return Event(channel, offset, epoch, data, 0.0)
