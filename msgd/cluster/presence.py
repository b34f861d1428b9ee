"""Cluster-wide presence: who is subscribed to a channel on any node.

Each node keeps, per channel it has subscribers of, one entry in Redis: a
summary of its own subscriptions (how many per principal, and anonymous).
Per channel there are two keys, both under the channel's hash tag (so on the
channel's shard, and in one Redis Cluster slot)::

    PRESENCE      hash        node id -> [[principal|null, subscriptions], ...]
    PRESENCE:exp  sorted set  node id -> when its entry expires (ms, Redis' clock)

A node writes its entry when its subscribers of the channel change
(coalesced: once per reactor turn per channel) and again every third of
``[pubsub] presence_ttl``; each write sets the entry to expire ``presence_ttl``
later, by the Redis server's clock (``TIME``), so the nodes' clocks do not
matter.  Readers (``rpc.presence``) count only entries that have not
expired: a node that dies (SIGKILL, power loss) is gone from every answer
within ``presence_ttl`` of its last refresh.  A node that stops cleanly
removes its entries (and says ``rpc.leave`` for them) before it goes.

Writers also prune: the script that writes an entry removes the expired
ones and returns them, and the node whose write removed a dead node's entry
announces ``rpc.leave`` for it on channels with ``presence_events`` (each
expired entry is removed by exactly one write, so each leave is said once).

When the channel's shard is away, ``rpc.presence`` answers with this node's
subscribers only and ``"partial": true``.  Node ids are ``NAME:RANDOM`` (a
restarted node is a new id; its previous entries expire).
"""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.cluster.redis_pubsub import Script
from msgd.core.pubsub import new_epoch

# KEYS: presence hash, expiry zset; ARGV: node id, summary JSON ('' removes it), ttl ms.
# Returns the summaries of the entries that had expired (removed now).
UPDATE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
end
local gone = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, node in ipairs(stale) do
  local summary = redis.call('HGET', KEYS[1], node)
  if summary then gone[#gone + 1] = summary end
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[2], node)
end
if redis.call('ZCARD', KEYS[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return gone
""")

# KEYS: presence hash, expiry zset.  Returns {node ids, their summaries} of the entries not expired.
QUERY = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
if #live == 0 then return {{}, {}} end
return {live, redis.call('HMGET', KEYS[1], unpack(live))}
""")


def summary(local: dict) -> str:
    """A node's entry: ``[[principal|null, subscriptions], ...]``."""
    return json.dumps(sorted(local.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")),
                      separators=(",", ":"))


def merge(channel: str, local: dict, others) -> dict:
    """``rpc.presence``'s answer from this node's subscriptions (``local``,
    as :meth:`Broker.local_presence` gives them) and the other live nodes'
    summaries."""
    count, principals = sum(local.values()), {p for p in local if p is not None}
    for raw in others:
        if not raw:
            continue
        for principal, n in json.loads(raw):
            count += n
            if principal is not None:
                principals.add(principal)
    return {"channel": channel, "count": count, "principals": sorted(principals)}


class RedisPresence(Service):
    """Keeps this node's presence entries in Redis and answers
    ``rpc.presence`` for the cluster (see the module docstring).

    ``backend`` (the bridge) offers ``presence_keys(channel)`` (the two
    keys), ``available(channel)`` (is the channel's shard reachable),
    ``run(channel, script, keys, args)`` (run a script on its shard) and
    ``preload(*scripts)`` (load them on every connection)."""

    log = Logger()

    def __init__(self, broker, backend, clock, node_name: str, ttl: float = 30.0, stop_timeout: float = 2.0):
        self.setName("pubsub:presence")
        self.broker = broker
        self.backend = backend
        self.clock = clock
        self.id = f"{node_name}:{new_epoch()}"
        self.ttl = ttl
        self.stop_timeout = stop_timeout
        self._dirty: set[str] = set()
        self._flush = None
        self._written: set[str] = set()       # channels this node has an entry for in Redis
        self._refresher = LoopingCall(self.refresh)
        self._refresher.clock = clock
        self._leaving: list | bool | None = None     # leave(): its waiters, then True once done
        backend.preload(UPDATE, QUERY)
        broker.presence_store = self

    # -- lifecycle ------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._refresher.start(self.ttl / 3, now=False)

    def stopService(self):
        super().stopService()
        return self.leave()

    def leave(self) -> defer.Deferred:
        """Say ``rpc.leave`` for this node's subscribers of announcing
        channels and remove its entries; fires once they are written (or
        after ``stop_timeout``), never with an error.  Done once: the bridge
        calls it too, and stops its shards only once it fired, so that the
        removals' replies arrive before the connections close."""
        d: defer.Deferred = defer.Deferred()
        if self._leaving is None:
            self._leaving = [d]
            self._remove_all().addBoth(self._left)
        elif isinstance(self._leaving, list):
            self._leaving.append(d)
        else:
            d.callback(None)
        return d

    def _remove_all(self) -> defer.Deferred:
        if self._refresher.running:
            self._refresher.stop()
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        writes = []
        for name in list(self._written):
            if self.broker.announces(name):
                for principal, n in self.broker.local_presence(name).items():
                    self.broker.announce(name, "leave", principal, n)
            writes.append(self._write(name, remove=True))
        d = defer.DeferredList(writes)
        d.addTimeout(self.stop_timeout, self.clock)
        return d

    def _left(self, _) -> None:
        waiting, self._leaving = self._leaving, True
        if isinstance(waiting, list):
            for d in waiting:
                d.callback(None)

    # -- writing ------------------------------------------------------------------

    def changed(self, name: str) -> None:
        """The broker's subscribers of ``name`` changed: write on the next turn."""
        self._dirty.add(name)
        if self._flush is None and self.running and self._leaving is None:
            self._flush = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            self._write(name)

    def refresh(self) -> None:
        """Write again every channel this node has subscribers of (and retry
        removals that failed)."""
        names = {n for n, ch in self.broker.channels.items() if ch.subscribers} | self._written
        for name in names:
            self._write(name)

    def _write(self, name: str, remove: bool = False) -> defer.Deferred:
        local = {} if remove else self.broker.local_presence(name)
        if not local and name not in self._written:
            return defer.succeed(None)
        if not self.backend.available(name):
            return defer.succeed(None)          # written again by the next refresh
        keys = self.backend.presence_keys(name)
        d = self.backend.run(name, UPDATE, keys, [self.id, summary(local) if local else "",
                                                       int(self.ttl * 1000)])

        def done(gone):
            if local:
                self._written.add(name)
            else:
                self._written.discard(name)
            if gone and self.broker.announces(name):
                for raw in gone:
                    for principal, n in json.loads(raw):
                        self.broker.announce(name, "leave", principal, n)

        def failed(f):
            self.log.warn("presence of {channel} not written to Redis ({error}); retried within {seconds}s",
                          channel=name, error=f.getErrorMessage(), seconds=round(self.ttl / 3, 3))
        return d.addCallbacks(done, failed)

    # -- reading ----------------------------------------------------------------------

    def query(self, name: str) -> defer.Deferred:
        """``{"channel", "count", "principals"}`` over every node (this
        node's own subscribers as they are now, the others' from Redis);
        this node's alone, with ``"partial": true``, when the shard is away."""
        if self.backend.available(name):
            d = self.backend.run(name, QUERY, self.backend.presence_keys(name), [])

            def got(reply):
                ids, summaries = reply
                me = self.id.encode()
                others = [s for i, s in zip(ids, summaries) if i != me and i != self.id]
                return merge(name, self.broker.local_presence(name), others)
            return d.addCallbacks(got, lambda f: self._partial(name, f))
        return defer.succeed(self._partial(name, None))

    def _partial(self, name: str, failure) -> dict:
        if failure is not None:
            self.log.warn("presence of {channel} not read from Redis ({error}); answering for this node",
                          channel=name, error=failure.getErrorMessage())
        return dict(self.broker.presence(name), partial=True)

    def describe(self) -> dict:
        return {"id": self.id, "channels": len(self._written), "ttl": self.ttl}
