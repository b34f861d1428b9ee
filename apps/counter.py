"""Counters kept in Redis: a small, real use of a Redis adapter.

Needs ``[adapter:cache] type = redis`` (see etc/node.ini)::

    curl -s -d '{"jsonrpc":"2.0","id":1,"method":"counter.hit","params":["home"]}' \\
         http://127.0.0.1:8080/rpc

Counts live in Redis, so every node sharing it sees the same numbers, and a
node restart loses nothing.  If Redis is down, calls fail at once with an
``unavailable`` error naming the adapter.
"""

from __future__ import annotations

from msgd import api

__all__ = ["hit", "get", "top", "reset"]

ADAPTER = "cache"
PREFIX = "counter:"


def _redis():
    return api.adapter(ADAPTER)


def _key(name: str) -> str:
    if not name or len(name) > 200:
        raise api.InvalidParams("name must be 1..200 characters")
    return PREFIX + name


async def hit(name: str, by: int = 1) -> int:
    """Add ``by`` to counter ``name``; returns the new count."""
    key = _key(name)
    count, _ = await _redis().pipeline(lambda p: [p.incrby(key, by), p.zincrby(PREFIX + "rank", by, name)])
    return count


async def get(name: str) -> int:
    """The count of ``name`` (0 if never hit)."""
    value = await _redis().get(_key(name))
    return int(value or 0)


async def top(n: int = 10) -> list:
    """The ``n`` highest counters as ``[name, count]`` pairs."""
    if not 1 <= n <= 100:
        raise api.InvalidParams("n must be 1..100")
    flat = await _redis().execute("ZREVRANGE", PREFIX + "rank", 0, n - 1, "WITHSCORES")
    return [[flat[i], int(float(flat[i + 1]))] for i in range(0, len(flat), 2)]


async def reset(name: str) -> int:
    """Set counter ``name`` back to 0; returns the count it had."""
    key = _key(name)
    old, _, _ = await _redis().multi(lambda t: [t.get(key), t.delete(key), t.zrem(PREFIX + "rank", name)])
    return int(old or 0)
