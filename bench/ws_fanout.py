"""Pub/sub fan-out: N subscribers on one channel, one publisher.

``python -m bench.ws_fanout [--subscribers 1000] [--events N] [--window 8]``
prints deliveries per second, p50/p99 latency (publish → delivery, sampled)
and the server's peak RSS, for msgd and for a raw Autobahn broadcast server
(bench/refserver.py) in the same run, with msgd's figure as a ratio of the
reference's and each side's CPU time.
"""

from __future__ import annotations

import argparse

from bench import common


def run_one(server, subscribers, events, window, payload):
    url = f"ws://127.0.0.1:{server.port}/ws"
    result, client_cpu = common.loadgen("fanout", url, subscribers, events, window, payload, cpu=server.cpu)
    result["client_cpu"] = client_cpu
    result["peak_rss_mib"] = server.peak_rss() / 1024
    return result


def measure(subscribers=1000, events=None, window=256, payload=100) -> dict:
    events = events or max(400, 1_000_000 // subscribers)
    out = {}
    for name, start in (("raw autobahn", common.ref_server), ("msgd", lambda: common.msgd_server()[0])):
        server = start()
        try:
            run_one(server, subscribers, max(20, events // 10), window, payload)   # warm-up
            out[name] = run_one(server, subscribers, events, window, payload)
        finally:
            server.stop()
    return out


def report(subscribers, out) -> list[str]:
    lines = []
    for name, r in out.items():
        per = r["server_cpu"] / r["deliveries"] * 1e6
        lines.append(f"  {name:13s} {r['per_second']:>10,.0f} deliveries/s  server {per:.2f} us/delivery  "
                     f"p50 {r['p50_ms']:.1f} ms  "
                     f"p99 {r['p99_ms']:.1f} ms  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                     f"({common.bottleneck(r['server_cpu'], r['client_cpu'], r['seconds'])})")
    ratio = out["msgd"]["per_second"] / out["raw autobahn"]["per_second"]
    lines.append(f"  msgd / raw autobahn = {ratio:.2f}x  ({subscribers} subscribers)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--events", type=int, default=None)
    p.add_argument("--window", type=int, default=256, help="events in flight (not yet seen by every subscriber)")
    p.add_argument("--payload", type=int, default=100)
    a = p.parse_args(argv)
    print(common.machine())
    for n in a.subscribers:
        print(f"fan-out, {n} subscribers, {a.payload}-byte events:")
        for line in report(n, measure(n, a.events, a.window, a.payload)):
            print(line)


if __name__ == "__main__":
    main()
