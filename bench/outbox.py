"""The outbox's bookkeeping cost: messages queued to a peer that is down,
then drained when it comes back.

    .venv/bin/python -m bench.outbox [--messages 20000 40000]

Runs msgd.cluster.outbox.Outbox in this process with sqlite on a temporary
file (inline, no thread hop) and a fake peer: first refusing every delivery
at once (not connected), as a real peer does while down, then accepting.
Prints messages per second for both phases at each size; with a scheduler
that scans the whole queue per event the rate falls as the queue grows
(quadratic time), with the heaps it stays flat.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from twisted.internet import defer, task

from msgd.cluster.outbox import Outbox
from msgd.core import errors


class Peer:
    ordered = False
    default_ttl = 86400.0

    def __init__(self):
        self.up = False
        self.delivered = 0

    def deliver(self, msg):
        if not self.up:
            raise errors.Unavailable("not connected")
        self.delivered += 1
        return defer.succeed({"duplicate": False})


def run(n: int) -> tuple[float, float]:
    clock = task.Clock()
    clock.advance(time.time())
    peer = Peer()
    box = Outbox(os.path.join(tempfile.mkdtemp(prefix="msgd-bench-outbox-"), "outbox.sqlite"), clock,
                 defer.maybeDeferred, {"b": peer})
    box.start()
    started = time.process_time()
    for i in range(n):
        box.send("b", "m.take", [i])
    queued = time.process_time()
    peer.up = True
    box.kick("b")
    drained = time.process_time()
    assert peer.delivered == n and not box.queues["b"], (peer.delivered, len(box.queues["b"]))
    box.stop()
    return n / (queued - started), n / (drained - queued)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, nargs="+", default=[5000, 20000, 40000])
    args = p.parse_args(argv)
    print("outbox: messages sent while the peer is down, then drained (CPU time, sqlite inline)")
    for n in args.messages:
        q, d = run(n)
        print(f"  {n:>7,} messages   queued {q:9,.0f}/s   drained {d:9,.0f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
