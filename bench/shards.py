"""What one publish costs Redis, and how publishes spread over several.

    .venv/bin/python -m bench.shards [--events 20000] [--channels 200]

A node in this process (``[pubsub] backend = redis``) follows ``--channels``
channels (one local subscriber each) and publishes ``--events`` 100-byte
events over them, 200 in flight, through: one standalone Redis, two
standalone shards, and a three-master Redis Cluster (private servers from
tests/servers.py).  For each it prints the node's publishes per second (the
node is the bottleneck on a small machine), and from each Redis' ``INFO
commandstats`` the share of the scripts it ran (the publishes, plus one
channel read per channel) and its CPU time per script (``EVALSHA``,
including the ``PUBLISH``/``SPUBLISH`` to the subscribed node): 1e6 / that
is about what one Redis core can carry, the figure to size shards with
(docs/cluster.rst, "Sizing").
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer, reactor, task

from bench.common import machine, node_in_process
from tests import servers


class Sink:
    principal = None

    def __init__(self):
        self.n = 0

    def deliver(self, ev):
        self.n += 1


def commandstats(srv) -> dict:
    out = servers.cli(srv, "info", "commandstats")
    stats = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=") for kv in rest.split(","))
            stats[name[len("cmdstat_"):]] = (int(fields["calls"]), float(fields["usec"]))
    return stats


def reset(srv) -> None:
    servers.cli(srv, "config", "resetstat")


@defer.inlineCallbacks
def run(label: str, ini: str, redises: list, events: int, channels: int):
    node = node_in_process(reactor, ini)
    bridge = node.pubsub_bridge
    for _ in range(400):
        if bridge.connected:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    names = [f"bench.{i}" for i in range(channels)]
    sink = Sink()
    yield defer.gatherResults([node.pubsub.subscribe(n, sink) for n in names])
    for srv in redises:
        reset(srv)
    data = "x" * 100
    started = time.perf_counter()
    window, sent = [], 0
    while sent < events:
        while len(window) < 200 and sent < events:
            window.append(node.pubsub.publish(names[sent % channels], data))
            sent += 1
        yield window.pop(0)
    yield defer.gatherResults(window)
    for _ in range(400):
        if sink.n >= events:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    seconds = time.perf_counter() - started
    print(f"  {label}: {events / seconds:,.0f} publishes/s through the node ({sink.n:,} delivered)")
    stats = [commandstats(srv).get("evalsha", (0, 0.0)) for srv in redises]
    total = sum(calls for calls, _ in stats) or 1
    for srv, (calls, usec) in zip(redises, stats):
        per = usec / calls if calls else 0.0
        print(f"      Redis {srv.address}: {calls / total:6.1%} of the scripts, "
              f"{per:5.1f} us of Redis CPU per script -> {1e6 / per if per else 0:,.0f}/s per core")
    yield node.stopService()


@defer.inlineCallbacks
def main_async(args):
    print(machine())
    base = "[pubsub]\nbackend = redis\nprefix = bench\nhistory_size = 100\n"
    one = servers.redis()
    try:
        yield run("one Redis", base + f"redis = tcp:host=127.0.0.1:port={one.port}\n", [one], args.events,
                  args.channels)
    finally:
        one.cleanup()
    two = [servers.redis(), servers.redis()]
    try:
        eps = ", ".join(f"tcp:host=127.0.0.1:port={s.port}" for s in two)
        yield run("two standalone shards", base + f"redis = {eps}\n", two, args.events, args.channels)
    finally:
        for s in two:
            s.cleanup()
    cluster = servers.redis_cluster()
    try:
        yield run("Redis Cluster, three masters",
                  base + f"redis = tcp:host=127.0.0.1:port={cluster.nodes[0].port}\ncluster = yes\n",
                  cluster.nodes, args.events, args.channels)
    finally:
        cluster.cleanup()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--channels", type=int, default=200)
    args = p.parse_args(argv)
    failures = []
    d = main_async(args)
    d.addErrback(failures.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        failures[0].raiseException()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
