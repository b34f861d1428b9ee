"""Throughput of the asynchronous inputs with a no-op handler.

``python -m bench.ingest [--files N] [--mails N]`` prints files per second
through a dirwatch interface (files moved into the watched directory while
the node runs, inotify) and messages per second through a pop3 interface
polling a private dovecot (tests/servers.py; skipped when dovecot is not
installed).  Each figure counts from the first item offered to the last
handler call finished and its file moved / its DELE committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
import unittest

from twisted.internet import defer, task

from bench.common import node_in_process

NOOP = "def take(item: dict):\n    return None\n"


@defer.inlineCallbacks
def until_done(reactor, node, interface: str, n: int, timeout: float = 600):
    for _ in range(int(timeout / 0.005)):
        if (node.metrics.value("msgd_ingest_succeeded_total", {"interface": interface}) or 0) >= n:
            return
        yield task.deferLater(reactor, 0.005, lambda: None)
    raise RuntimeError(f"{interface}: not done after {timeout}s")


@defer.inlineCallbacks
def bench_dirwatch(reactor, n: int):
    if n <= 0:
        return
    base = tempfile.mkdtemp(prefix="msgd-bench-")
    try:
        staging, incoming = os.path.join(base, "staging"), os.path.join(base, "in")
        os.makedirs(staging)
        os.makedirs(incoming)
        for i in range(n):
            with open(os.path.join(staging, f"f{i:06d}.json"), "wb") as f:
                f.write(b'{"n": %d}\n' % i)
        node = node_in_process(reactor, f"[interface:drop]\ntype = dirwatch\ndirectory = {incoming}\n"
                                        "handler = bench.take\nconcurrency = 8\n", {"bench.py": NOOP}, base)
        yield node.ready()
        started = time.perf_counter()
        yield node.run_blocking(lambda: [os.rename(os.path.join(staging, name), os.path.join(incoming, name))
                                         for name in sorted(os.listdir(staging))])
        yield until_done(reactor, node, "drop", n)
        elapsed = time.perf_counter() - started
        assert len(os.listdir(os.path.join(incoming, "done"))) == n
        print(f"dirwatch: {n} files in {elapsed:.2f}s: {n / elapsed:.0f} files/s (mode {node.interfaces['drop'].mode})")
        yield node.stopService()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@defer.inlineCallbacks
def bench_pop3(reactor, n: int):
    if n <= 0:
        return
    from tests import servers
    try:
        srv = servers.dovecot({"bench": "secret"})
    except unittest.SkipTest as e:
        print(f"pop3: skipped ({e})")
        return
    base = tempfile.mkdtemp(prefix="msgd-bench-")
    try:
        for i in range(n):
            servers.deliver(srv, "bench", b"From: a@example.org\r\nSubject: m%d\r\n\r\nhello %d\r\n" % (i, i))
        started = time.perf_counter()
        node = node_in_process(reactor, "[interface:mail]\ntype = pop3\n"
                                        f"endpoint = tcp:host=127.0.0.1:port={srv.port}\n"
                                        "username = bench\npassword = secret\nallow_plaintext = yes\n"
                                        "handler = bench.take\nbatch = 100\n", {"bench.py": NOOP}, base)
        yield until_done(reactor, node, "mail", n)
        while node.interfaces["mail"]._session is not None:      # the last QUIT commits the deletions
            yield task.deferLater(reactor, 0.005, lambda: None)
        elapsed = time.perf_counter() - started
        print(f"pop3: {n} messages in {elapsed:.2f}s: {n / elapsed:.0f} messages/s")
        yield node.stopService()
    finally:
        srv.stop(signal.SIGKILL)    # a throwaway dovecot takes ~6 s to obey SIGTERM
        srv.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000, help="files through the directory watcher")
    p.add_argument("--mails", type=int, default=1000, help="messages through the POP3 poller")
    args = p.parse_args(argv)

    @defer.inlineCallbacks
    def run(reactor):
        yield bench_dirwatch(reactor, args.files)
        yield bench_pop3(reactor, args.mails)

    task.react(run)


if __name__ == "__main__":
    main()
