"""Pipelined JSON-RPC calls over WebSocket: C connections x K calls in flight.

``python -m bench.ws_rpc [--connections 10] [--inflight 10] [--seconds 5]``
prints calls per second and latency for msgd (``util.echo``) and for a raw
Autobahn server that parses each call and echoes its first parameter
(bench/refserver.py), in the same run, with the ratio and CPU times.
Also ``--idle N`` measures memory per idle subscribed connection.
"""

from __future__ import annotations

import argparse
import time

from bench import common


def measure(connections=10, inflight=10, seconds=5.0) -> dict:
    out = {}
    for name, start in (("raw autobahn", common.ref_server), ("msgd", lambda: common.msgd_server()[0])):
        server = start()
        try:
            url = f"ws://127.0.0.1:{server.port}/ws"
            common.loadgen("rpc", url, connections, inflight, 1)          # warm-up
            r, client_cpu = common.loadgen("rpc", url, connections, inflight, seconds, cpu=server.cpu)
            r["client_cpu"] = client_cpu
            out[name] = r
        finally:
            server.stop()
    return out


def idle_memory(connections=10000, hold=15.0) -> dict:
    """KB per idle subscribed WebSocket: server RSS with N open minus before."""
    import subprocess
    import os
    out = {}
    for name, start in (("raw autobahn", common.ref_server), ("msgd", lambda: common.msgd_server()[0])):
        server = start()
        try:
            before = server.rss()
            env = dict(os.environ, NODE_PATH=common.ensure_ws_package())
            gen = subprocess.Popen(common.pinned(common.CLIENT_CPU, [
                "node", os.path.join(common.ROOT, "bench", "loadgen.js"), "idle",
                f"ws://127.0.0.1:{server.port}/ws", str(connections), str(hold)]),
                env=env, stdout=subprocess.PIPE, text=True)
            line = gen.stdout.readline()       # {"open": N} once all are open and subscribed
            time.sleep(min(3.0, hold / 3))     # let the server settle
            during = server.rss()
            gen.wait(hold + 60)
            out[name] = {"connections": connections, "kib_each": (during - before) * 1024 / connections / 1024,
                         "opened": line.strip()}
        finally:
            server.stop()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--inflight", type=int, default=10)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--idle", type=int, default=0, help="also measure memory at this many idle connections")
    a = p.parse_args(argv)
    print(common.machine())
    out = measure(a.connections, a.inflight, a.seconds)
    print(f"RPC, {a.connections} connections x {a.inflight} in flight:")
    for name, r in out.items():
        print(f"  {name:13s} {r['per_second']:>10,.0f} calls/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
              f"errors {r['errors']}  ({common.bottleneck(r['server_cpu'], r['client_cpu'], r['seconds'])})")
    print(f"  msgd / raw autobahn = {out['msgd']['per_second'] / out['raw autobahn']['per_second']:.2f}x")
    if a.idle:
        mem = idle_memory(a.idle)
        print(f"memory per idle subscribed connection at {a.idle}:")
        for name, r in mem.items():
            print(f"  {name:13s} {r['kib_each']:.1f} KiB each")


if __name__ == "__main__":
    main()
