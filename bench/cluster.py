"""Cluster pub/sub: does a delivery through Redis cost what a local one does?

``python -m bench.cluster [--subscribers 100 1000] [--deliveries N] [--window 100]``
runs, in one go, the WebSocket fan-out of bench/ws_fanout.py (Node.js ``ws``
load generator, one channel, 100-byte events, ``window`` events in flight)
on:

- one node with the memory backend (the reference);
- the same node with ``[pubsub] backend = redis`` (a private redis-server);
- a publisher connected to node A and the subscribers to node B, both
  sharing pub/sub through that Redis;

and prints deliveries per second, the ratio to the reference, p50/p99
latency (publish → delivery) and the CPU time of the subscribers' node.
The subscribers' node is pinned to one core; the load generator, node A and
Redis share the other.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench import common


def _redis():
    sys.path.insert(0, common.ROOT)
    from tests import servers      # the tests' throwaway redis-server
    redis = servers.redis()
    if common.CPUS > 1:
        os.sched_setaffinity(redis.proc.pid, {int(common.CLIENT_CPU)})   # off the subscribers' node's core
    return redis


def _redis_ini(redis, prefix: str) -> str:
    return f"backend = redis\nredis = tcp:host=127.0.0.1:port={redis.port}\nprefix = {prefix}"


MODES = (("memory", "one node, memory backend"),
         ("redis", "one node, backend = redis"),
         ("two", "publisher on A, subscribers on B (redis)"))


class Setup:
    """The four nodes, started once: the memory one, the redis one, and A
    (on the other core) + B sharing another prefix."""

    def __init__(self, redis):
        self.nodes = {}
        try:
            self.nodes["memory"] = common.msgd_server()[0]
            self.nodes["redis"] = common.msgd_server(pubsub=_redis_ini(redis, "bench1"))[0]
            self.nodes["B"] = common.msgd_server(pubsub=_redis_ini(redis, "bench2"))[0]
            self.nodes["A"] = common.msgd_server(pubsub=_redis_ini(redis, "bench2"), cpu=common.CLIENT_CPU)[0]
        except BaseException:
            self.stop()
            raise

    def urls(self, mode: str) -> tuple:
        url = lambda n: f"ws://127.0.0.1:{self.nodes[n].port}/ws"    # noqa: E731
        return (self.nodes["B"], url("B"), url("A")) if mode == "two" else (self.nodes[mode], url(mode))

    def stop(self):
        for n in self.nodes.values():
            n.stop()


def run(setup: Setup, mode: str, subscribers: int, events: int, window: int, payload: int) -> dict:
    node, *urls = setup.urls(mode)
    extra = [1, *urls[1:]] if urls[1:] else []     # one publisher, on the other node
    cpu0 = node.cpu()
    result, client_cpu = common.loadgen("fanout", urls[0], subscribers, events, window, payload, *extra)
    result["server_cpu"] = node.cpu() - cpu0
    result["client_cpu"] = client_cpu
    return result


def measure(setup: Setup, subscribers: int, deliveries: int, window: int, payload: int, repeat: int) -> dict:
    """The best of ``repeat`` runs of each mode, interleaved (the machine's
    other load hurts some runs: the best one is the least disturbed)."""
    events = max(200, deliveries // subscribers)
    best: dict = {}
    for mode, _ in MODES:
        run(setup, mode, subscribers, max(20, events // 10), window, payload)      # warm-up
    for _ in range(repeat):
        for mode, _ in MODES:
            r = run(setup, mode, subscribers, events, window, payload)
            if mode not in best or r["per_second"] > best[mode]["per_second"]:
                best[mode] = r
    return best


def report(out: dict) -> list[str]:
    base = out["memory"]
    base_cost = base["server_cpu"] / base["deliveries"]
    lines = []
    for mode, label in MODES:
        r = out[mode]
        cost = r["server_cpu"] / r["deliveries"]
        ratio = r["per_second"] / base["per_second"]
        lines.append(f"  {label:42s} {r['per_second']:>9,.0f} deliveries/s  {ratio:4.2f}x  "
                     f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                     f"subscribers' node {r['server_cpu'] / r['seconds']:.2f} cores, "
                     f"{cost * 1e6:.2f} us/delivery ({base_cost / cost if cost else 0:.2f}x)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--deliveries", type=int, default=300_000, help="deliveries per run")
    p.add_argument("--window", type=int, default=100, help="events in flight (not yet seen by every subscriber)")
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--repeat", type=int, default=2, help="runs of each mode (the best is shown)")
    a = p.parse_args(argv)
    print(common.machine())
    print(f"load average {os.getloadavg()[0]:.1f} at start (figures are comparable only within one run)")
    redis = _redis()
    setup = None
    try:
        setup = Setup(redis)
        for n in a.subscribers:
            print(f"fan-out, {n} subscribers, {a.payload}-byte events, window {a.window}, best of {a.repeat}:")
            for line in report(measure(setup, n, a.deliveries, a.window, a.payload, a.repeat)):
                print(line, flush=True)
    finally:
        if setup is not None:
            setup.stop()
        redis.cleanup()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
