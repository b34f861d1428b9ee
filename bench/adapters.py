"""Adapter overhead: Redis GET round trips per second through the Redis
adapter next to raw txredisapi in the same run, and LDAP searches per second.

    .venv/bin/python -m bench.adapters [--seconds 2] [--rounds 3] [--concurrency 8]

Servers: a private redis-server and slapd from ``tests/servers.py``
(``MSGD_TEST_REDIS`` / ``MSGD_TEST_LDAP`` to use others).  One process, the
epoll reactor; ``--concurrency`` callers each issue the next call as soon as
the previous answer is in.  The adapter and txredisapi both get a pool of
``--concurrency`` connections.  Rounds alternate between the two Redis
clients, so that other load on the machine hits both alike; the best round
of each is reported.  Each adapter caller is one request (with a deadline)
making one call after the other, as an app function would.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from twisted.internet import defer, task

from bench.common import node_in_process


async def _rate(call, seconds: float, concurrency: int, node=None) -> float:
    """Calls per second with ``concurrency`` callers for ``seconds``; with
    ``node``, each caller is one request (with its deadline) making calls
    one after the other, as an app function would."""
    from msgd.core.request import current
    done = [0]
    end = time.perf_counter() + seconds

    async def caller():
        while time.perf_counter() < end:
            await call()
            done[0] += 1
    start = time.perf_counter()
    callers = []
    for _ in range(concurrency):
        token = current.set(node.new_request("bench", timeout=seconds + 30) if node is not None else None)
        try:
            callers.append(defer.ensureDeferred(caller()))
        finally:
            current.reset(token)
    await defer.gatherResults(callers)
    return done[0] / (time.perf_counter() - start)


async def main(reactor, args):
    import txredisapi

    from tests import servers

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPU, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    redis = servers.redis(own=False)
    try:
        node = node_in_process(reactor, f"[adapter:cache]\ntype = redis\nurl = redis://{redis.host}:{redis.port}/0\n"
                               f"pool_size = {args.concurrency}\n")
        cache = node.adapter("cache")
        await cache.set("bench:key", "x" * 32)
        raw = await txredisapi.ConnectionPool(redis.host, redis.port, poolsize=args.concurrency,
                                              reconnect=False)
        best = {"adapter": 0.0, "txredisapi": 0.0}
        calls = {"adapter": (lambda: cache.get("bench:key"), node),
                 "txredisapi": (lambda: raw.get("bench:key"), None)}
        for _ in range(args.rounds):
            for name in ("txredisapi", "adapter"):
                call, in_node = calls[name]
                best[name] = max(best[name], await _rate(call, args.seconds, args.concurrency, in_node))
        await raw.disconnect()
        await node.stopService()
    finally:
        redis.cleanup()
    print(f"redis GET, raw txredisapi:  {best['txredisapi']:9.0f} round trips/s")
    print(f"redis GET, through adapter: {best['adapter']:9.0f} round trips/s")
    print(f"ratio adapter/raw:          {best['adapter'] / best['txredisapi']:9.2f} (target >= 0.90)")

    ldif = "".join(f"dn: uid=u{i},{{base}}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: User {i}\nsn: {i}\n\n"
                   for i in range(100))
    slapd = servers.slapd(suffix="dc=bench,dc=org", ldif=ldif.replace("{base}", "dc=bench,dc=org"))
    try:
        node = node_in_process(reactor, f"[adapter:dir]\ntype = ldap\nurl = ldap://{slapd.host}:{slapd.port}\n"
                               f"bind_dn = {slapd.extra['bind_dn']}\npassword = {slapd.extra['password']}\n"
                               f"base = dc=bench,dc=org\npool_size = {args.ldap_pool}\n")
        ldap = node.adapter("dir")
        n = [0]

        def search():
            n[0] += 1
            return ldap.search("(uid={})", f"u{n[0] % 100}", attributes=["cn"])
        rate = 0.0
        for _ in range(args.rounds):
            rate = max(rate, await _rate(search, args.seconds, args.concurrency, node))
        await node.stopService()
    finally:
        slapd.cleanup()
    print(f"ldap search by uid (pool {args.ldap_pool}): {rate:7.0f} searches/s")


def run(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per client (best is reported)")
    p.add_argument("--concurrency", type=int, default=8, help="callers at once")
    p.add_argument("--ldap-pool", type=int, default=4, help="LDAP adapter pool (and thread) size")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    run()
