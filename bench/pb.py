"""PB calls per second through msgd next to a raw PB ``Referenceable`` doing
the same, and cross-node pub/sub deliveries per second through Redis.

    .venv/bin/python -m bench.pb [--seconds 2] [--rounds 3] [--concurrency 16] [--events 5000]

Calls: each server runs in its own process (``python -m bench.pb serve KIND
PORT``): an msgd node with a ``type = pb`` interface serving ``bench.add``,
or a plain ``pb.PBServerFactory`` whose root's ``remote_call`` takes the same
arguments (target, args, kwargs, deadline) and calls the function from a
dict.  This process logs in (msgd) or takes the root object (raw) and keeps
``concurrency`` ``call("bench.add", [2, 3], {}, 10.0)`` calls outstanding for ``seconds``.  Rounds
alternate between the two; the best round of each is reported and the ratio.

Pub/sub: two nodes (processes) share a private redis-server
(``tests/servers.py``); a WebSocket client on node A counts the events that
an app on node B publishes as fast as Redis takes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

APP = '''
from msgd import api

def add(a: int, b: int) -> int:
    return a + b

async def flood(channel: str, n: int) -> int:
    from twisted.internet import defer
    for start in range(0, n, 500):
        await defer.gatherResults([api.publish(channel, i) for i in range(start, min(n, start + 500))])
    return n
'''


# -- the servers (child processes) ---------------------------------------------

def serve(kind: str, port: int) -> None:
    from twisted.internet import reactor

    if kind == "msgd":
        from bench.common import node_in_process
        node_in_process(reactor, f"[interface:pb]\ntype = pb\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                                 f"users = bench:bench\n", {"bench.py": APP})
    else:
        from twisted.spread import pb

        functions = {"bench.add": lambda a, b: a + b}

        class Root(pb.Root):
            """The same wire shape as msgd's call(target, args, kwargs, deadline)."""

            def remote_call(self, target, args, kwargs, deadline):
                return functions[target](*args, **kwargs)
        reactor.listenTCP(port, pb.PBServerFactory(Root()), interface="127.0.0.1")
    reactor.run()


def start_server(kind: str) -> tuple[subprocess.Popen, int]:
    from tests.servers import free_port, wait_port
    port = free_port()
    from bench.common import SERVER_CPU, pinned
    proc = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, "-m", "bench.pb", "serve", kind, str(port)]),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wait_port("127.0.0.1", port, 20, proc)
    return proc, port


# -- the load generator ------------------------------------------------------------

async def connect(reactor, kind: str, port: int):
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.spread import pb
    factory = pb.PBClientFactory()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    if kind == "msgd":
        obj = await factory.login(UsernamePassword(b"bench", b"bench"))
        return factory, lambda: obj.callRemote("call", "bench.add", [2, 3], {}, 10.0)
    root = await factory.getRootObject()
    return factory, lambda: root.callRemote("call", "bench.add", [2, 3], {}, 10.0)


async def rate(reactor, call, seconds: float, concurrency: int) -> float:
    from twisted.internet import defer
    done = 0
    stop_at = reactor.seconds() + seconds

    async def worker():
        nonlocal done
        while reactor.seconds() < stop_at:
            assert (await call()) == 5
            done += 1
    started = reactor.seconds()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return done / (reactor.seconds() - started)


async def calls(reactor, args) -> dict:
    servers = {kind: start_server(kind) for kind in ("msgd", "raw")}
    try:
        clients = {}
        for kind, (_, port) in servers.items():
            clients[kind] = await connect(reactor, kind, port)
            await rate(reactor, clients[kind][1], 0.3, args.concurrency)      # warm up
        best = {"msgd": 0.0, "raw": 0.0}
        for _ in range(args.rounds):
            for kind in ("raw", "msgd"):
                best[kind] = max(best[kind], await rate(reactor, clients[kind][1], args.seconds, args.concurrency))
        for factory, _ in clients.values():
            factory.disconnect()
        return best
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)


def pubsub(args) -> float | None:
    """Cross-node deliveries per second (blocking; run in a thread)."""
    import unittest

    import websocket

    from tests import servers
    from tests.process import NodeProcess, post
    try:
        redis = servers.redis()
    except (unittest.SkipTest, RuntimeError) as e:
        print(f"pub/sub: skipped ({e})")
        return None
    base = tempfile.mkdtemp(prefix="msgd-bench-pubsub-")
    ini = ("[node]\nname = {name}\nreload_interval = 0\n"
           "[interface:web]\ntype = http\nendpoint = tcp:{port}:interface=127.0.0.1\nws_max_pending = 64MiB\n"
           f"[pubsub]\nbackend = redis\nredis = tcp:host=127.0.0.1:port={redis.port}\nhistory_size = 100\n")
    nodes = [NodeProcess(os.path.join(base, n), ini.replace("{name}", n), {"bench.py": APP}) for n in "ab"]
    try:
        for n in nodes:
            n.start()
        a, b = nodes
        ws = websocket.create_connection(f"ws://127.0.0.1:{a.port}/ws", subprotocols=["jsonrpc"], timeout=30)
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "rpc.subscribe", "params": {"channel": "bench"}}))
        json.loads(ws.recv())
        post(b.port, {"jsonrpc": "2.0", "id": 1, "method": "bench.flood", "params": ["bench", 100]})
        for _ in range(100):
            ws.recv()
        started = time.perf_counter()
        post(b.port, {"jsonrpc": "2.0", "id": 1, "method": "bench.flood", "params": ["bench", args.events]},
             timeout=120)
        for _ in range(args.events):
            ws.recv()
        elapsed = time.perf_counter() - started
        ws.close()
        return args.events / elapsed
    finally:
        for n in nodes:
            n.stop()
        redis.cleanup()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pb")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--events", type=int, default=5000)
    args = p.parse_args(argv)
    from bench.common import CLIENT_CPU, CPUS
    if CPUS > 1:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})   # this process is the load generator: off the servers' core

    from twisted.internet import defer, task, threads

    async def run(reactor):
        best = await calls(reactor, args)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpu(s), Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}")
        print(f"PB calls/s, {args.concurrency} outstanding, best of {args.rounds} x {args.seconds}s:")
        print(f"  raw pb.Root remote_call     {best['raw']:10.0f}")
        print(f"  msgd type=pb call(...)      {best['msgd']:10.0f}")
        print(f"  ratio msgd/raw              {best['msgd'] / best['raw']:10.2f}")
        deliveries = await threads.deferToThread(pubsub, args)
        if deliveries is not None:
            print(f"cross-node pub/sub (publish on B, WebSocket client on A, Redis): {deliveries:.0f} deliveries/s")

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
