"""XML-RPC calls per second: msgd's ``/RPC2`` next to a plain
``twisted.web.xmlrpc.XMLRPC`` resource serving the same function.

    .venv/bin/python -m bench.xmlrpc [--seconds 2] [--rounds 3] [--connections 8]

Each server runs in its own process (``python -m bench.xmlrpc serve KIND
PORT``); this process is the load generator: a few keep-alive connections,
each posting the same pre-encoded ``add(2, 3)`` as soon as the previous
answer is in.  Rounds alternate between the servers so that other load on
the machine hits them alike; the best round of each is reported, with the
CPU time the server and the load generator used over all rounds.

The plain resource runs twice: on a default ``Site`` (the baseline of the
target) and on a ``Site(parsePOSTFormSubmission=False)``, the setting msgd's
Site uses, so the table shows how much of the difference is that setting
(Twisted parses every POST's Content-Type with the email package) and how
much is the rest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xmlrpc.client

from bench.common import CLIENT_CPU, SERVER_CPU, cpu_seconds, free_port, node_in_process, pinned

APP = '''
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b
'''


# -- the servers (child processes) ---------------------------------------------

def serve(kind: str, port: int) -> None:
    from twisted.internet import reactor

    if kind == "msgd":
        node_in_process(reactor, f"[interface:web]\ntype = http\nendpoint = tcp:{port}:interface=127.0.0.1\n",
                        {"bench.py": APP})
    else:
        from twisted.web import resource, server, xmlrpc as txrpc

        class Plain(txrpc.XMLRPC):
            def xmlrpc_add(self, a, b):
                """Add two integers."""
                return a + b

        root = resource.Resource()
        root.putChild(b"RPC2", Plain())
        site = server.Site(root, parsePOSTFormSubmission=(kind == "plain"))
        site.log = lambda request: None   # msgd logs no per-request line either
        reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: (print("ready", flush=True)))
    reactor.run()


def call_request(kind: str) -> bytes:
    """The HTTP request every call sends: ``add(2, 3)``."""
    body = xmlrpc.client.dumps((2, 3), "bench.add" if kind == "msgd" else "add").encode()
    return (b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"msgd": "msgd /RPC2",
         "plain": "twisted.web.xmlrpc.XMLRPC",
         "plain-noform": "twisted.web.xmlrpc.XMLRPC, no form parsing"}


class Server:
    def __init__(self, kind: str):
        self.kind = kind
        self.port = free_port()
        self.proc = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, "-m", "bench.xmlrpc", "serve", kind,
                                                         str(self.port)]), stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise SystemExit(f"{kind} server did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# -- the load generator ------------------------------------------------------------

def load(port: int, request: bytes, seconds: float, connections: int) -> tuple[int, int]:
    """(answers, wrong answers) within ``seconds``, from keep-alive
    connections that each keep one call in flight."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    stats = {"ok": 0, "bad": 0}
    stop_at = time.monotonic() + seconds

    class Caller(Protocol):
        def __init__(self):
            self.buf = b""
            self.done = Deferred()

        def connectionMade(self):
            self.transport.write(request)

        def dataReceived(self, data):
            self.buf += data
            while True:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = self.buf[:head_end].lower()
                i = head.find(b"content-length:")
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
                end = head_end + 4 + length
                if len(self.buf) < end:
                    return
                body, self.buf = self.buf[head_end + 4:end], self.buf[end:]
                stats["ok" if b"<int>5</int>" in body and b"<fault>" not in body else "bad"] += 1
                if time.monotonic() < stop_at:
                    self.transport.write(request)
                else:
                    self.transport.loseConnection()

        def connectionLost(self, reason):
            self.done.callback(None)

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    callers = [Caller() for _ in range(connections)]
    for c in callers:
        connectProtocol(endpoint, c)
    finished = gatherResults([c.done for c in callers])
    finished.addBoth(lambda _: reactor.stop())
    reactor.run()
    return stats["ok"], stats["bad"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.xmlrpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.5, help="length of one round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per server (alternating)")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    args = p.parse_args(argv)

    servers = [Server(kind) for kind in KINDS]
    best = {s.kind: 0.0 for s in servers}
    server_cpu = {s.kind: 0.0 for s in servers}
    client_cpu = {s.kind: 0.0 for s in servers}
    calls = {s.kind: 0 for s in servers}
    try:
        for rnd in range(args.rounds + 1):           # round 0 warms up and is not counted
            for s in servers:
                cpu_before = s.cpu()
                started = time.monotonic()
                ok, bad, cpu = run_round(s, args.seconds if rnd else min(0.5, args.seconds), args.connections)
                elapsed = time.monotonic() - started
                if bad:
                    print(f"{s.kind}: {bad} wrong answer(s)", file=sys.stderr)
                    return 1
                if rnd:
                    best[s.kind] = max(best[s.kind], ok / elapsed)
                    server_cpu[s.kind] += s.cpu() - cpu_before
                    client_cpu[s.kind] += cpu
                    calls[s.kind] += ok
    finally:
        for s in servers:
            s.stop()

    print(f"XML-RPC add(2, 3): {args.connections} keep-alive connections, {args.rounds} rounds of "
          f"{args.seconds:g} s per server, alternating; best round shown")
    for kind in KINDS:
        per_call = server_cpu[kind] / calls[kind] * 1e6 if calls[kind] else 0.0
        print(f"  {KINDS[kind]:<44} {best[kind]:8.0f} calls/s   server CPU {server_cpu[kind]:6.2f} s "
              f"({per_call:5.0f} us/call)   load generator CPU {client_cpu[kind]:6.2f} s")
    for base, note in (("plain", " (target >= 0.9x)"), ("plain-noform", "")):
        ratio = best["msgd"] / best[base] if best[base] else 0.0
        cpu_ratio = ((server_cpu[base] / calls[base]) / (server_cpu["msgd"] / calls["msgd"])
                     if calls[base] and calls["msgd"] and server_cpu["msgd"] else 0.0)
        print(f"  msgd / {base:<13} {ratio:.2f}x calls/s, {cpu_ratio:.2f}x by server CPU per call{note}")
    return 0


def run_round(server: Server, seconds: float, connections: int) -> tuple[int, int, float]:
    """One load round in a child process (a Twisted reactor runs once per
    process): (answers, wrong answers, the child's CPU seconds)."""
    out = subprocess.run(pinned(CLIENT_CPU, [sys.executable, "-m", "bench.xmlrpc", "load", server.kind,
                                             str(server.port), str(seconds), str(connections)]),
                         capture_output=True, check=True, cwd=ROOT)
    ok, bad, cpu = out.stdout.split()
    return int(ok), int(bad), float(cpu)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["load"]:
        kind, port, seconds, connections = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
        ok, bad = load(port, call_request(kind), seconds, connections)
        print(ok, bad, time.process_time())
    else:
        sys.exit(main())
