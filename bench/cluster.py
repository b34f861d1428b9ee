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
latency (publish → delivery), the CPU time per delivery of the subscribers'
node, and where the time went: each process's CPU over the measured phase
(load generator, the node or nodes, redis-server) as a fraction of a core,
each CPU's busy fraction (the machine's other load included), and which CPU
was full — or none, when the window of events in flight and the hops
through Redis bound the run.

CPU placement, one policy for every mode (``--placement``): by default
(``apart``) the load generator has CPU 1 to itself and everything under
test — every msgd node and Redis — shares CPU 0, so each row gets the same
one core for msgd and the same one for the generator (docs/performance.rst
says why; ``nodes``, ``split`` and ``none`` are the other policies measured
there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common


S, C = common.SERVER_CPU, common.CLIENT_CPU
ANY = ",".join(str(c) for c in range(common.CPUS))
# placement: (node A's CPU, Redis' CPU, what it is); the subscribers' node (and the one node) on S,
# the load generator on C, unless "none"
PLACEMENT = "apart"
PLACEMENTS = {
    "apart": (S, S, f"the load generator alone on CPU {C}; every msgd node and Redis on CPU {S}"),
    "nodes": (S, C, f"every msgd node on CPU {S}; the load generator and Redis on CPU {C}"),
    "split": (C, C, f"the subscribers' node on CPU {S}; node A, the load generator and Redis on CPU {C}"),
    "none": (ANY, ANY, "no pinning: the kernel places every process"),
}


def _redis(cpu: str):
    sys.path.insert(0, common.ROOT)
    from tests import servers      # the tests' throwaway redis-server
    redis = servers.redis()
    if common.CPUS > 1:
        os.sched_setaffinity(redis.proc.pid, {int(c) for c in cpu.split(",")})
    return redis


def _redis_ini(redis, prefix: str) -> str:
    return f"backend = redis\nredis = tcp:host=127.0.0.1:port={redis.port}\nprefix = {prefix}"


MODES = (("memory", "one node, memory backend"),
         ("redis", "one node, backend = redis"),
         ("two", "publisher on A, subscribers on B (redis)"))


class Setup:
    """The four nodes, started once: the memory one, the redis one, and A
    (on the CPU ``placement`` says) + B sharing another prefix."""

    def __init__(self, redis, placement: str):
        self.redis = redis
        self.a_cpu, self.redis_cpu, _ = PLACEMENTS[placement]
        self.cpu = ANY if placement == "none" else S       # the subscribers' node's, the one node's
        self.gen_cpu = ANY if placement == "none" else C
        self.nodes = {}
        try:
            self.nodes["memory"] = common.msgd_server(cpu=self.cpu)[0]
            self.nodes["redis"] = common.msgd_server(pubsub=_redis_ini(redis, "bench1"), cpu=self.cpu)[0]
            self.nodes["B"] = common.msgd_server(pubsub=_redis_ini(redis, "bench2"), cpu=self.cpu)[0]
            self.nodes["A"] = common.msgd_server(pubsub=_redis_ini(redis, "bench2"), cpu=self.a_cpu)[0]
        except BaseException:
            self.stop()
            raise

    def urls(self, mode: str) -> tuple:
        url = lambda n: f"ws://127.0.0.1:{self.nodes[n].port}/ws"    # noqa: E731
        return (self.nodes["B"], url("B"), url("A")) if mode == "two" else (self.nodes[mode], url(mode))

    def stop(self):
        for n in self.nodes.values():
            n.stop()


def cpu_time(pid: int) -> float:
    """CPU seconds of process ``pid`` so far, all its threads: from
    ``/proc/PID/task/*/schedstat`` (nanoseconds: a run of half a second
    is measured to far better than /proc/PID/stat's 10 ms ticks), else
    user + sys from ``/proc/PID/stat``."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return common.cpu_seconds(pid)


def _load_generator() -> int | None:
    """The pid of the running load generator (``node``, a child of this process)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                kids = f.read().split()
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/comm") as f:
                    if f.read().strip() == "node":
                        return int(kid)
            except OSError:
                pass
    return None


def cpu_busy() -> dict:
    """Busy seconds of each CPU so far (``/proc/stat``: all but idle and
    iowait; every process's, the machine's other load included)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *ticks = line.split()
            if name.startswith("cpu") and name != "cpu":
                t = [int(x) for x in ticks]
                out[name[3:]] = (sum(t[:8]) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")
    return out


def run(setup: Setup, mode: str, subscribers: int, events: int, window: int, payload: int) -> dict:
    """One run; the result has, over its measured phase (connections set
    up), the CPU of each process as a fraction of a core (``cpu``: name ->
    (fraction, CPU it is pinned to)) and each CPU's busy fraction, whoever
    used it (``busy``)."""
    node, *urls = setup.urls(mode)
    extra = [1, *urls[1:]] if urls[1:] else []     # one publisher, on the other node
    procs = {"subscribers' node" if mode == "two" else "node": (node.pid, setup.cpu)}
    if mode == "two":
        procs["publisher's node A"] = (setup.nodes["A"].pid, setup.a_cpu)
    if mode != "memory":
        procs["redis"] = (setup.redis.proc.pid, setup.redis_cpu)
    marks: list = []

    def mark() -> float:
        if not marks:
            gen = _load_generator()
            if gen is not None:
                procs["load generator"] = (gen, setup.gen_cpu)
                if setup.gen_cpu == ANY and common.CPUS > 1:     # common.loadgen pins it: no pinning
                    os.sched_setaffinity(gen, range(common.CPUS))
        marks.append((time.monotonic(), {n: cpu_time(pid) for n, (pid, _) in procs.items()}, cpu_busy()))
        return 0.0
    result, gen_cpu = common.loadgen("fanout", urls[0], subscribers, events, window, payload, *extra, cpu=mark)
    (t0, p0, b0), (t1, p1, b1) = marks
    wall = t1 - t0
    if "load generator" not in procs:       # not found: common.loadgen's figure (10 ms ticks)
        procs["load generator"] = (0, setup.gen_cpu)
        p0["load generator"], p1["load generator"] = 0.0, gen_cpu
    cpu = {n: ((p1[n] - p0[n]) / wall, c) for n, (_, c) in sorted(procs.items(), key=lambda i: i[0] != "load generator")}
    result["cpu"] = cpu
    result["busy"] = {c: (b1[c] - b0[c]) / wall for c in b1}
    result["wall"] = wall
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


BUSY = 0.9      # a CPU at least this busy over the run is taken as the bottleneck


def bottleneck(r: dict) -> str:
    """Which CPU limited the run (and whose processes were on it), or that
    none did: the window of events in flight and the hops bound it."""
    full = [c for c, b in sorted(r["busy"].items()) if b >= BUSY]
    if not full:
        return "no CPU full: window/latency-bound"
    if any(cpu == ANY for _, cpu in r["cpu"].values()):     # no pinning: whose time it was is not known
        return f"CPU {' and '.join(full)} full"
    out = []
    for c in full:
        ours = sorted(((f, n) for n, (f, cpu) in r["cpu"].items() if cpu == c), reverse=True)
        rest = r["busy"][c] - sum(f for f, _ in ours)
        out.append(f"CPU {c} full ({' + '.join(f'{n} {f:.2f}' for f, n in ours)}"
                   f"{f' + others {rest:.2f}' if rest > 0.05 else ''})")
    return "; ".join(out)


def report(out: dict, subscribers: int) -> list[str]:
    base = out["memory"]
    node = lambda r: r["cpu"]["subscribers' node" if "subscribers' node" in r["cpu"] else "node"][0]   # noqa: E731
    base_cost = node(base) / base["per_second"]
    lines = []
    for mode, label in MODES:
        r = out[mode]
        cost = node(r) / r["per_second"]
        ratio = r["per_second"] / base["per_second"]
        lines.append(f"  {label:42s} {r['per_second']:>9,.0f} deliveries/s  {ratio:4.2f}x  "
                     f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                     f"subscribers' node {cost * 1e6:.2f} us/delivery ({base_cost / cost if cost else 0:.2f}x)")
        events = r["per_second"] / subscribers
        procs = ", ".join(f"{n} {f:.2f}" + (f" ({f / events * 1e6:.1f} us/event)" if n in ("redis", "publisher's node A")
                                           else "") for n, (f, _) in r["cpu"].items())
        busy = ", ".join(f"CPU {c} {b:.2f}" for c, b in sorted(r["busy"].items()))
        lines.append(f"      cores: {procs}; busy: {busy} -> {bottleneck(r)}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--deliveries", type=int, default=1_000_000, help="deliveries per run")
    p.add_argument("--window", type=int, default=100, help="events in flight (not yet seen by every subscriber)")
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--repeat", type=int, default=2, help="runs of each mode (the best is shown)")
    p.add_argument("--placement", choices=list(PLACEMENTS), default=PLACEMENT,
                   help="; ".join(f"{k}: {v[2]}" for k, v in PLACEMENTS.items()))
    a = p.parse_args(argv)
    print(common.machine())
    print(f"load average {os.getloadavg()[0]:.1f} at start (figures are comparable only within one run)")
    redis = _redis(PLACEMENTS[a.placement][1])
    setup = None
    try:
        setup = Setup(redis, a.placement)
        print(f"placement {a.placement}: {PLACEMENTS[a.placement][2]}")
        for n in a.subscribers:
            print(f"fan-out, {n} subscribers, {a.payload}-byte events, window {a.window}, best of {a.repeat}:")
            for line in report(measure(setup, n, a.deliveries, a.window, a.payload, a.repeat), n):
                print(line, flush=True)
    finally:
        if setup is not None:
            setup.stop()
        redis.cleanup()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
