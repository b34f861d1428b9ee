"""Which of several standalone Redis shards a channel lives on.

Rendezvous (highest-random-weight) hashing: for a channel, every shard gets
a score, the first 8 bytes of BLAKE2b(shard name, NUL, channel) read as an
unsigned integer, and the channel lives on the shard with the highest score.

- *Stable*: BLAKE2b is the same on every machine, process and Python
  version (unlike ``hash()``), so every node that lists the same shards puts
  a channel on the same one; the order they are listed in does not matter.
- *Consistent*: adding a shard moves only the channels that now score
  highest on it (about 1/N of them), all to the new shard; removing one moves
  only its own channels, spread over the others.
- *Even*: each of N shards gets about 1/N of the channels.

A lookup costs N hashes; results are cached per channel (the cache is
bounded and simply emptied when full).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Sequence


class Rendezvous:
    """Maps channel names to one of ``names`` (distinct strings that name
    the shards the same way on every node).  With one name every channel
    gets it: the bridge does not ask then."""

    CACHE = 100_000

    def __init__(self, names: Sequence[str]):
        if not names:
            raise ValueError("at least one shard")
        if len(set(names)) != len(names):
            raise ValueError("shard names must differ")
        self.names = list(names)
        self._seeds = [n.encode() + b"\0" for n in self.names]
        self._cache: dict[str, int] = {}

    def index(self, channel: str) -> int:
        """The position in ``names`` of the shard of ``channel``."""
        i = self._cache.get(channel)
        if i is None:
            key = channel.encode()
            best, i = -1, 0
            for n, seed in enumerate(self._seeds):
                score = int.from_bytes(blake2b(seed + key, digest_size=8).digest(), "big")
                if score > best:
                    best, i = score, n
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            self._cache[channel] = i
        return i

    def name(self, channel: str) -> str:
        return self.names[self.index(channel)]
