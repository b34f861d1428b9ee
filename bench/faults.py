"""Fault injection on loopback: counts of violated promises (never timings).

``python -m bench faults sender-killed [--messages 1000] [--runs 2]``
    node A sends ``--messages`` durable peer messages to a blocking handler on
    node B (real twistd processes); A is SIGKILLed while B works through them
    and restarted; once A's outbox is drained, the messages B handled twice
    and the ones it never handled are counted (docs/cluster.rst: each message
    handled once).

``python -m bench faults stalled-subscriber [--subscribers 1000] [--events 1500] [--size 8000]``
    ``--subscribers`` WebSocket clients on one channel of a node (a twistd
    process), one of which stops reading until the node has dropped it; the
    others must get every event once, in order; the stalled one, when it
    reads again, the events already on their way and then the close frame
    1008 "slow consumer" (docs/websocket.rst).

``python -m bench faults pattern-resume [--rounds 30] [--history 10]``
    a subscription to ``PROTOCOL.*`` is left and resumed from the positions
    held while events are published on the matched channels (new ones too),
    over WebSocket, SSE, long-poll, STOMP and the plain stream; events missed
    without a gap signal (``recovered: false`` / ``rpc.gap``) are counted
    (docs/websocket.rst, "Patterns").

``python -m bench faults all`` runs the three.  Every figure must be 0; the
exit status is 1 when one is not.  Everything listens on 127.0.0.1 and ends
on its own (each wait is bounded).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

from bench.common import machine


def sender_killed(messages: int, runs: int) -> int:
    """Print each run's counts; the number of violations."""
    from tests.test_cluster import ClusterTests
    bad = 0
    for run in range(1, runs + 1):
        case = ClusterTests("test_sender_killed_during_delivery")
        case.setUp()
        case.base = tempfile.mkdtemp(prefix="msgd-faults-")
        try:
            twice, lost = case.sender_killed(messages)
        finally:
            case._cleanup()
            shutil.rmtree(case.base, ignore_errors=True)
        print(f"  sender killed, run {run}: {messages} messages, {twice} handled twice, {lost} lost", flush=True)
        bad += twice + lost
    return bad


STALLED_INI = """
[node]
name = faults
reload_interval = 0

[pubsub]
history_size = 10

[interface:web]
type = http
endpoint = tcp:{port}:interface=127.0.0.1
ws_max_pending = 64KiB
"""

STALLED_APPS = {"fan.py": '''
from msgd import api

def burst(channel: str, count: int, size: int):
    blob = "x" * size
    for _ in range(count):
        api.publish(channel, blob)
    return count
'''}


class FrameReader:
    """The server frames of one WebSocket connection, read without blocking:
    ``feed()`` whatever the socket has and get the whole frames' (opcode,
    payload)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            n, at = self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                n, at = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < at + n:
                break
            out.append((self.buf[0] & 0x0F, self.buf[at:at + n]))
            self.buf = self.buf[at + n:]
        return out


def ws_subscriber(port: int, channel: str, rcvbuf: int | None = None):
    """``tests.helpers.ws_subscribe``, the answer read (within its socket's
    timeout): (socket, its FrameReader)."""
    from tests.helpers import ws_subscribe
    s = ws_subscribe(port, channel, rcvbuf)
    reader = FrameReader(s)
    while True:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before the subscription was answered")
        frames = reader.feed(data)
        if frames:
            assert b'"result"' in frames[0][1], frames[0]
            assert len(frames) == 1, "an event before the subscription's answer"
            return s, reader


def stalled_subscriber(subscribers: int, events: int, size: int, chunk: int = 5) -> int:
    """One of ``subscribers`` stops reading: each other one must get every
    event once, in order; the stalled one, reading again after 2 s, the
    events already on their way and then close 1008 "slow consumer"."""
    import json
    import selectors
    import time
    from bench.common import raise_fd_limit
    from tests.process import NodeProcess, call, wait_for
    raise_fd_limit()
    base = tempfile.mkdtemp(prefix="msgd-faults-")
    node = NodeProcess(base, STALLED_INI, STALLED_APPS)
    node.start()
    sel = selectors.DefaultSelector()
    socks = []
    try:
        readers = []
        for _ in range(subscribers - 1):
            s, r = ws_subscriber(node.port, "firehose")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, len(readers))
            readers.append(r)
            socks.append(s)
        stalled, stalled_reader = ws_subscriber(node.port, "firehose", rcvbuf=4096)
        socks.append(stalled)
        got = [[] for _ in readers]          # offsets each reading client got
        closes = []

        def pump(until: int, timeout: float = 60.0) -> None:
            """Read until every reading client has offset ``until`` (bounded)."""
            deadline = time.monotonic() + timeout
            while min(len(g) for g in got) < until and time.monotonic() < deadline:
                for key, _ in sel.select(0.5):
                    i = key.data
                    try:
                        data = key.fileobj.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    if not data:
                        closes.append((i, "eof"))
                        sel.unregister(key.fileobj)
                        got[i].append(None)     # stands out as a loss
                        continue
                    for opcode, payload in readers[i].feed(data):
                        if opcode == 1:
                            got[i].append(json.loads(payload)["params"]["offset"])
                        else:
                            closes.append((i, opcode, payload[:40]))

        def presence() -> int:
            return call(node.port, "rpc.presence", "firehose")["result"]["count"]

        wait_for(lambda: presence() == subscribers, what="every subscriber counted")
        published = 0
        dropped_at = None
        while published < events:
            published += call(node.port, "fan.burst", "firehose", chunk, size, timeout=30)["result"]
            pump(published)
            if dropped_at is None and presence() == subscribers - 1:
                dropped_at = published
                events = min(events, published + 40 * chunk)      # and some more after the drop
        time.sleep(2.0)                       # the stalled client stays away past Autobahn's 1 s
        stalled.settimeout(15)
        offsets, close = [], None
        while close is None:
            try:
                data = stalled.recv(1 << 20)
            except ConnectionResetError:     # aborted before it could read the close frame
                close = ("reset",)
                break
            if not data:
                close = ("eof",)
                break
            for opcode, payload in stalled_reader.feed(data):
                if opcode == 1:
                    offsets.append(json.loads(payload)["params"]["offset"])
                elif opcode == 8:
                    close = (int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace"))
        expected = list(range(1, published + 1))
        lost = sum(len(set(expected) - set(g)) for g in got)
        twice = sum(len(g) - len(set(g)) for g in got)
        disorder = sum(1 for g in got if g != sorted(g))
        stalled_ok = (close[0] == 1008 and close[1].startswith("slow consumer")
                      and offsets == list(range(1, len(offsets) + 1)))
        print(f"  stalled subscriber among {subscribers}: {published} events of {size} bytes, "
              f"dropped after {dropped_at}; the stalled one got {len(offsets)} events then close {close}; "
              f"the other {len(readers)}: {lost} lost, {twice} duplicated, {disorder} out of order, "
              f"{len(closes)} closed", flush=True)
        return lost + twice + disorder + len(closes) + (0 if stalled_ok and dropped_at else 1)
    finally:
        for s in socks:
            s.close()
        sel.close()
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


RESUME_INI = """
[node]
name = faults
reload_interval = 0

[pubsub]
history_size = {history}

[interface:web]
type = http
endpoint = tcp:{{port}}:interface=127.0.0.1

[interface:stream]
type = jsonrpc-stream
endpoint = tcp:{stream}:interface=127.0.0.1

[interface:stomp]
type = stomp
endpoint = tcp:{stomp}:interface=127.0.0.1
"""


class JSONRPCClient:
    """A pattern subscriber speaking JSON-RPC (WebSocket, long-poll or the
    plain stream): ``subscribe`` returns the events sent before the answer
    and the answer; ``events`` what came since."""

    def __init__(self, node, ports, protocol):
        import json
        import socket

        import requests
        import websocket
        self.json, self.requests = json, requests
        self.protocol, self.base, self.queue = protocol, f"http://127.0.0.1:{node.port}", []
        if protocol == "websocket":
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{node.port}/ws", timeout=10)
        elif protocol == "poll":
            r = requests.post(f"{self.base}/poll", timeout=10)
            self.session = r.json()["session"]
        else:
            self.sock = socket.create_connection(("127.0.0.1", ports["stream"]), timeout=10)
            self.buf = b""

    def send(self, msg):
        data = self.json.dumps(msg)
        if self.protocol == "websocket":
            self.ws.send(data)
        elif self.protocol == "poll":
            self.requests.post(f"{self.base}/poll?session={self.session}", data=data,
                               headers={"content-type": "application/json"}, timeout=10)
        else:
            self.sock.sendall(data.encode() + b"\n")

    def receive(self, wait: float) -> list:
        """What came (waiting at most ``wait`` seconds for something)."""
        import socket

        import websocket
        if self.protocol == "websocket":
            self.ws.settimeout(wait)
            try:
                return [self.json.loads(self.ws.recv())]
            except websocket.WebSocketTimeoutException:
                return []
        if self.protocol == "poll":
            r = self.requests.get(f"{self.base}/poll?session={self.session}&wait={wait}", timeout=wait + 10)
            return r.json()
        self.sock.settimeout(wait)
        try:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    return []
                self.buf += data
        except socket.timeout:
            return []
        lines, self.buf = self.buf.rsplit(b"\n", 1)
        return [self.json.loads(line) for line in lines.split(b"\n")]

    def subscribe(self, pattern, held):
        params = {"channel": pattern}
        if held:
            params["since"] = {c: o for c, (e, o) in held.items()}
            params["epoch"] = {c: e for c, (e, o) in held.items()}
        self.send({"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": params})
        before = []
        for _ in range(100):
            for m in self.receive(5):
                if m.get("id") == 1:
                    r = m["result"]
                    return before, r["recovered"], {c: (r["epoch"][c], o) for c, o in r["offset"].items()}
                before.append(self.event(m))
        raise AssertionError("no answer to rpc.subscribe")

    @staticmethod
    def event(m):
        if m.get("method") == "rpc.gap":
            return ("gap", m["params"]["channel"], None, None)
        p = m["params"]
        return (p["channel"], p["epoch"], p["offset"])

    def events(self, wait):
        return [self.event(m) for m in self.receive(wait) if "method" in m]

    def close(self):
        if self.protocol == "websocket":
            self.ws.close()
        elif self.protocol == "poll":
            self.requests.delete(f"{self.base}/poll?session={self.session}", timeout=10)
        else:
            self.sock.close()


class SSEClient:
    """A pattern subscriber over /sse, resuming with Last-Event-ID (the last
    id it got)."""

    last_id = None

    def __init__(self, node, ports, protocol):
        self.port = node.port

    def subscribe(self, pattern, held):
        import http.client
        import json
        import threading
        import urllib.parse
        from queue import Queue
        headers = {"Accept": "text/event-stream"}
        if SSEClient.last_id:
            headers["Last-Event-ID"] = SSEClient.last_id
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.conn.request("GET", "/sse?" + urllib.parse.urlencode({"channel": pattern}), headers=headers)
        response = self.conn.getresponse()
        assert response.status == 200, response.status
        self.queue = Queue()

        def read():                    # the SSE fields this stream uses: id and data
            ident, data = None, []
            try:
                while True:
                    line = response.readline()
                    if not line:
                        return
                    line = line.decode().rstrip("\r\n")
                    if line.startswith("id:"):
                        ident = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif not line and data:
                        self.queue.put((ident, json.loads("\n".join(data))))
                        ident, data = None, []
            except Exception:          # closed under it (by close(), from another thread)
                return
        threading.Thread(target=read, daemon=True).start()
        before = []
        while True:
            ident, m = self.queue.get(timeout=10)
            SSEClient.last_id = ident or SSEClient.last_id
            if m["method"] == "rpc.subscribed":
                return before, m["params"]["recovered"], None
            before.append(JSONRPCClient.event(m))

    def events(self, wait):
        from queue import Empty
        try:
            ident, m = self.queue.get(timeout=wait)
        except Empty:
            return []
        SSEClient.last_id = ident or SSEClient.last_id
        return [JSONRPCClient.event(m)]

    def close(self):
        import socket
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)    # ends the reading thread's readline
        except OSError:
            pass
        self.conn.close()


class StompClient:
    """A pattern subscriber over STOMP: msgd-since with the positions held,
    the RECEIPT's msgd-recovered and msgd-positions."""

    def __init__(self, node, ports, protocol):
        import socket

        from msgd.stomp.codec import Decoder, Frame, encode
        self.Frame, self.encode = Frame, encode
        self.decoder = Decoder()
        self.sock = socket.create_connection(("127.0.0.1", ports["stomp"]), timeout=10)
        self.sock.sendall(encode(Frame("CONNECT", [("accept-version", "1.2"), ("host", "localhost")])))
        self.pending = []
        for _ in range(10):         # read() waits at most 10 s each time
            if any(f.command == "CONNECTED" for f in self.pending):
                break
            self.read(10)
        else:
            raise TimeoutError("no CONNECTED frame")
        self.pending = [f for f in self.pending if f.command != "CONNECTED"]

    def read(self, wait):
        import socket
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        if not data:
            raise ConnectionError("closed")
        self.pending += self.decoder.feed(data)
        while self.decoder.pending():
            more = self.decoder.feed(b"")
            if not more:
                break
            self.pending += more

    def subscribe(self, pattern, held):
        headers = [("destination", f"/topic/{pattern}"), ("id", "1"), ("receipt", "r")]
        if held:
            headers.append(("msgd-since", " ".join(f"{e}:{o}:{c}" for c, (e, o) in held.items())))
        self.sock.sendall(self.encode(self.Frame("SUBSCRIBE", headers)))
        before = []
        for _ in range(1000):
            while self.pending:
                f = self.pending.pop(0)
                if f.command == "RECEIPT":
                    positions = {}
                    for item in (f.get("msgd-positions") or "").split():
                        e, o, c = item.split(":", 2)
                        positions[c] = (e, int(o))
                    return before, f.get("msgd-recovered") == "true", positions
                if f.command == "ERROR":
                    raise AssertionError(f"ERROR {f.headers} {f.body!r}")
                before.append(self.event(f))
            self.read(5)
        raise AssertionError("no RECEIPT")

    @staticmethod
    def event(f):
        return (f.get("msgd-channel"), f.get("msgd-epoch"), int(f.get("msgd-offset")))

    def events(self, wait):
        if not self.pending:
            self.read(wait)
        out = [self.event(f) for f in self.pending if f.command == "MESSAGE"]
        self.pending = []
        return out

    def close(self):
        self.sock.close()


CLIENTS = {"websocket": JSONRPCClient, "sse": SSEClient, "poll": JSONRPCClient,
           "stream": JSONRPCClient, "stomp": StompClient}


class ResumeRun:
    """One protocol's pattern subscriber across resumes: what was published
    (by channel), what it got, the positions it holds, and the counts."""

    def __init__(self, protocol: str, node, rng):
        self.protocol, self.node, self.rng = protocol, node, rng
        self.channels = [f"{protocol}.x", f"{protocol}.y"]
        self.published: dict[str, list[int]] = {}     # offsets by channel
        self.got: dict[str, set] = {}
        self.missing: set = set()                     # (channel, offset) published, not received (yet)
        self.held: dict = {}                          # channel -> (epoch, offset)
        self.silent = self.duplicates = self.told = 0

    def publish(self, n: int, channel: str | None = None) -> None:
        """``n`` events on ``channel``, else on channels drawn at random
        (sometimes a new one)."""
        from tests.process import call
        if channel is None and self.rng.random() < 0.3:     # a channel begins
            self.channels.append(f"{self.protocol}.n{len(self.channels)}")
        for _ in range(n):
            c = channel or self.rng.choice(self.channels)
            offset = call(self.node.port, "rpc.publish", c, "x")["result"]["offset"]
            self.published.setdefault(c, []).append(offset)
            self.missing.add((c, offset))

    def take(self, events) -> None:
        for ev in events:
            if ev[0] == "gap":                        # said: events were lost
                self.told += 1
                self.missing.clear()
                continue
            c, epoch, offset = ev
            if offset in self.got.setdefault(c, set()):
                self.duplicates += 1
            self.got[c].add(offset)
            self.missing.discard((c, offset))
            self.held[c] = (epoch, max(offset, self.held.get(c, (epoch, 0))[1]))

    def resumed(self, first: bool, recovered: bool, positions: dict | None) -> None:
        """The subscribe answer came (after the events replayed before it)."""
        for c, pos in (positions or {}).items():
            if c not in self.held or not recovered:
                self.held[c] = pos
        if first:
            pass                                      # what was published before it is not owed
        elif not recovered:
            self.told += 1
        else:
            self.silent += len(self.missing)          # should have been replayed before the answer
        self.missing.clear()

    def live(self, client, wait: float = 15.0) -> None:
        """Until every event published since the answer came (bounded)."""
        import time
        deadline = time.monotonic() + wait
        while self.missing and time.monotonic() < deadline:
            self.take(client.events(1.0))
        self.silent += len(self.missing)
        self.missing.clear()


def pattern_resume(rounds: int, history: int, seed: int = 18) -> int:
    """For each protocol, ``rounds`` times: resume ``PROTOCOL.*`` from the
    positions held, read events published live, leave, and let 0 to
    4 x ``history`` events be published on its channels (sometimes a new
    one) while away, and every fifth time more than one channel's history
    keeps.  An event never received whose resume answered
    ``recovered: true`` (and no ``rpc.gap`` came) is lost silently."""
    import random
    from tests.process import NodeProcess
    from tests.servers import free_port
    rng = random.Random(seed)
    ports = {"stream": free_port(), "stomp": free_port()}
    base = tempfile.mkdtemp(prefix="msgd-faults-")
    node = NodeProcess(base, RESUME_INI.format(history=history, **ports))
    node.start()
    SSEClient.last_id = None
    bad = 0
    try:
        for protocol, client_class in CLIENTS.items():
            run = ResumeRun(protocol, node, rng)
            run.publish(3)
            for r in range(rounds + 1):
                client = client_class(node, ports, protocol)
                before, recovered, positions = client.subscribe(f"{protocol}.*", run.held)
                run.take(before)
                run.resumed(r == 0, recovered, positions)
                if r == rounds:
                    client.close()
                    break
                run.publish(rng.randint(1, 5))                # live
                run.live(client)
                client.close()
                run.publish(rng.randint(0, 4 * history))      # while away
                if r % 5 == 4:                                # more than a channel's history keeps
                    run.publish(history + 1, rng.choice(run.channels))
            total = sum(map(len, run.published.values()))
            print(f"  pattern resume over {protocol}: {rounds} resumes, {total} events on "
                  f"{len(run.published)} channels; told of a loss {run.told} times; "
                  f"{run.silent} lost without a gap signal, {run.duplicates} duplicated", flush=True)
            bad += run.silent + run.duplicates
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("scenario", nargs="?", default="all",
                   choices=["all", "sender-killed", "stalled-subscriber", "pattern-resume"])
    p.add_argument("--messages", type=int, default=1000, help="sender-killed: peer messages (default 1000)")
    p.add_argument("--runs", type=int, default=2, help="sender-killed: runs (default 2)")
    p.add_argument("--subscribers", type=int, default=1000, help="stalled-subscriber: WebSocket clients (default 1000)")
    p.add_argument("--events", type=int, default=1500,
                   help="stalled-subscriber: most events published (default 1500; 200 more once it is dropped)")
    p.add_argument("--size", type=int, default=8000,
                   help="stalled-subscriber: bytes of each event (default 8000: the kernel's buffers for the "
                        "stalled client, a few MB on loopback, fill before the node drops it)")
    p.add_argument("--rounds", type=int, default=30, help="pattern-resume: resumes per protocol (default 30)")
    p.add_argument("--history", type=int, default=10, help="pattern-resume: [pubsub] history_size (default 10)")
    a = p.parse_args(argv)
    print(machine(), flush=True)
    bad = 0
    if a.scenario in ("all", "sender-killed"):
        bad += sender_killed(a.messages, a.runs)
    if a.scenario in ("all", "stalled-subscriber"):
        bad += stalled_subscriber(a.subscribers, a.events, a.size)
    if a.scenario in ("all", "pattern-resume"):
        bad += pattern_resume(a.rounds, a.history)
    print("violations:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
