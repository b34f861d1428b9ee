"""A Redis Cluster as one pub/sub shard: a slot router over the connections
of :class:`msgd.cluster.redis_pubsub.Shard`.

txredisapi speaks to one Redis server (or shards keys itself over several);
it knows nothing of Redis Cluster, and no maintained Twisted client does.
This module adds what a cluster client needs, and no more than msgd uses:

- **Key slots**: CRC16 (XMODEM) of the key modulo 16384, of only the part
  between the first ``{`` and the next ``}`` when that part is not empty (a
  *hash tag*: ``msgd:{chat.lobby}:offset`` and ``msgd:{chat.lobby}:history``
  share a slot, so one Lua script may touch both).
- **Discovery**: ``CLUSTER SLOTS`` asked of any reachable node (the seeds at
  first) gives each slot range's master; every master is a :class:`Node`
  (a :class:`~msgd.cluster.redis_pubsub.Shard`: a command and a sharded
  pub/sub connection, each kept up by a ClientService).  The map is asked again when a node answers
  ``MOVED``, when a connection is lost, when a shard channel is unsubscribed
  by the server (its slot moved) and every ``refresh_interval`` seconds.
- **Routing**: a command goes to the master of its key's slot.  ``MOVED``
  refreshes the map and retries on the node named; ``ASK`` (a slot being
  migrated) retries once on the node named, preceded by ``ASKING``, without
  touching the map; ``TRYAGAIN`` and ``CLUSTERDOWN`` retry after a short
  pause.  At most ``max_redirects`` retries, then the error is the caller's.
  A command whose connection is lost is not retried (it may have run).
- **Scripts**: :meth:`RedisCluster.run` routes by the script's first key
  and sends ``EVALSHA``; on ``NOSCRIPT`` it sends ``SCRIPT LOAD`` to that node
  and retries, so a script's text crosses the network once per node.
- **Sharded pub/sub** (Redis 7): :meth:`RedisCluster.subscribe` subscribes
  with ``SSUBSCRIBE`` on the master of each channel's slot (scripts publish
  with ``SPUBLISH``).  The cluster keeps the set of channels it wants and
  subscribes them again where they belong after a node's connection came
  back or their slot moved (the server tells subscribers with an
  unsolicited ``sunsubscribe``), then tells its bridge
  (``bridge.resubscribed``) so that it can check what was missed meanwhile.
  There is no sharded ``PSUBSCRIBE``: pattern subscriptions are refused.

To the pub/sub bridge the whole cluster is one shard
(:class:`RedisCluster` offers what a ``Shard`` offers), up while the slot
map is known and every master is connected: with Redis' default
``cluster-require-full-coverage yes`` a cluster that lost a master without a
replica refuses every command anyway.

Only masters are used (no reads from replicas).  Node addresses from the
cluster are turned into endpoint strings by putting their host and port in
the first seed's endpoint string, so ``tls:``/``ssl:`` options carry over.
"""

from __future__ import annotations

from typing import Iterable

import txredisapi
from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.cluster.endpoints import address_of, endpoint_for
from msgd.cluster.redis_pubsub import Shard, observed

SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), as Redis Cluster uses it."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that decides its slot (see the module docstring)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: str | bytes) -> int:
    if isinstance(key, str):
        key = key.encode()
    return crc16(hash_tag(key)) % SLOTS


# -- replies -----------------------------------------------------------------------

def redirect(error: Exception) -> tuple[str, int, str, int] | None:
    """``("MOVED"|"ASK", slot, host, port)`` of a redirection error, else None.
    An empty host (the node does not know its clients' view of it) is
    returned as ``""``: the same host as the node that answered."""
    text = str(error.args[0]) if error.args else ""
    kind, _, rest = text.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, addr = rest.strip().partition(" ")
    host, _, port = addr.rpartition(":")
    try:
        return kind, int(slot), host, int(port)
    except ValueError:
        return None


def parse_slots(reply, default_host: str) -> list[tuple[int, int, str, int]]:
    """``CLUSTER SLOTS`` → ``[(first, last, host, port), ...]`` of the masters.
    A master whose host is empty or ``?`` is taken at ``default_host`` (the
    node that answered)."""
    out = []
    for entry in reply:
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0]
        if isinstance(host, bytes):
            host = host.decode()
        if not host or host == "?":
            host = default_host
        out.append((first, last, host, int(master[1])))
    return out


def error_kind(error: Exception) -> str:
    text = str(error.args[0]) if error.args else ""
    return text.partition(" ")[0]


# -- the cluster ------------------------------------------------------------------------------

class Node(Shard):
    """One master of the cluster: a Shard whose bridge is the cluster and
    whose subscriptions are shard channels (``SSUBSCRIBE``, grouped by slot
    as the server wants them)."""

    def __init__(self, cluster: "RedisCluster", host: str, port: int):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.placed: set[str] = set()        # shard channels that belong on this node
        self._waiting: list[defer.Deferred] = []
        super().__init__(cluster, self.address, endpoint_for(cluster.template, host, port), cluster.password, 0,
                         cluster.reactor, cluster.retry_policy)

    def ready(self, timeout: float) -> defer.Deferred:
        """Fires with the command connection once the node is connected,
        waiting up to ``timeout``."""
        if self.connected:
            return defer.succeed(self.command)
        d: defer.Deferred = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        d.addTimeout(timeout, self.reactor)
        return d

    def ssubscribe(self, channels) -> list[tuple[list, defer.Deferred]]:
        """SSUBSCRIBE ``channels``: ``[(channels of one slot, Deferred)]``
        (the cluster decides what goes where: see :meth:`RedisCluster.subscribe`)."""
        out = []
        for group in _by_slot(channels):
            self.channels.update(group)
            assert self.subscriber is not None
            out.append((group, self.subscriber.send("SSUBSCRIBE", group, True)))
        return out

    def unsubscribe(self, channels=(), patterns=()) -> None:
        if self.subscriber is None:
            return
        for group in _by_slot(channels):
            self.channels.difference_update(group)
            self.subscriber.send("SUNSUBSCRIBE", group, False)

    def dropped(self, channel: str) -> None:
        super().dropped(channel)
        self.bridge.dropped(self, channel)

    def describe(self) -> dict:
        return dict(super().describe(), channels=len(self.placed))


class ClusterError(txredisapi.RedisError):
    """The cluster could not be reached, or kept redirecting."""


class RedisCluster(MultiService):
    """A Redis Cluster, as one shard of the pub/sub bridge (see the module
    docstring).

    What the bridge uses: ``connected``, ``publish_command``, ``run``,
    ``subscribe``, ``unsubscribe``, ``subscriptions``, ``describe`` — as for
    a :class:`~msgd.cluster.redis_pubsub.Shard`.  What it calls on the
    bridge: ``shard_up(self)`` / ``shard_down(self)`` when ``connected``
    changes, ``pushed(self, channel, payload)`` for each shard-channel
    message, and ``resubscribed(self, channels)`` when channels were
    subscribed again after their node's connection came back or their slot
    moved (what was published meanwhile was not received here).

    ``seeds``: client endpoint strings of some of the cluster's nodes."""

    log = Logger()
    publish_command = "SPUBLISH"

    def __init__(self, bridge, name: str, seeds: Iterable[str], password: str, reactor, retry_policy=None,
                 latency=None, max_redirects: int = 5, timeout: float = 5.0, refresh_interval: float = 30.0,
                 retry_delay: float = 0.05):
        super().__init__()
        self.setName(name)
        self.bridge = bridge
        self.seeds = [s.strip() for s in seeds if s.strip()]
        if not self.seeds:
            raise ValueError("a Redis Cluster needs at least one seed endpoint")
        self.template = self.seeds[0]
        self.reactor = reactor
        self.password = password
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self.max_redirects = max_redirects
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._latency = latency
        self.slots: list[Node | None] = [None] * SLOTS
        self.masters: set[Node] = set()
        self.nodes: dict[tuple[str, int], Node] = {}
        self.channels: dict[str, Node | None] = {}    # wanted shard channels -> the node they are placed on
        self.confirmed: set[str] = set()               # ... whose subscription the node confirmed
        self._seen: set[str] = set()                   # ... confirmed at least once
        self._waiters: dict[str, list[defer.Deferred]] = {}
        self._refreshing: defer.Deferred | None = None
        self._again = False
        self._refresher = LoopingCall(self.refresh)
        self._refresher.clock = reactor
        self.refresh_interval = refresh_interval
        self.discovered = False
        self.was_connected = False
        self.redirections = {"MOVED": 0, "ASK": 0}

    # -- lifecycle ----------------------------------------------------------------

    def startService(self):
        super().startService()
        for seed in self.seeds:
            self._node(*address_of(seed))
        if self.refresh_interval:
            self._refresher.start(self.refresh_interval, now=False)

    def stopService(self):
        if self._refresher.running:
            self._refresher.stop()
        return super().stopService()

    def _node(self, host: str, port: int) -> Node:
        node = self.nodes.get((host, port))
        if node is None:
            node = self.nodes[(host, port)] = Node(self, host, port)
            node.setServiceParent(self)
        return node

    def _drop(self, node: Node) -> None:
        del self.nodes[(node.host, node.port)]
        self.unconfirm(node.placed)
        for channel in node.placed:
            self.channels[channel] = None
        node.placed = set()
        node.disownServiceParent()

    # -- what the nodes call (the cluster is their bridge) -----------------------------

    def shard_up(self, node: Node) -> None:
        waiting, node._waiting = node._waiting, []
        for d in waiting:
            d.callback(node.command)
        if node.placed:
            self.subscribe_on(node, sorted(node.placed))
        if not self.discovered:
            self.refresh()
        self._state()

    def shard_down(self, node: Node) -> None:
        self.unconfirm(node.placed, txredisapi.ConnectionError(f"lost connection to {node.address}"))
        if self.running:
            self.refresh()
        self._state()

    def pushed(self, node: Node, channel, payload) -> None:
        self.bridge.pushed(self, channel, payload)

    def dropped(self, node: Node, channel: str) -> None:
        """The server unsubscribed ``channel`` by itself: its slot moved."""
        self._unplace(node, [channel])

    def _unplace(self, node: Node, channels: list) -> None:
        """Take those of ``channels`` that are placed on ``node`` off it
        (their slot moved, or the node refused them) and place them again
        once the slot map is fresh."""
        mine = [c for c in channels if self.channels.get(c) is node]
        if not mine:
            return
        for c in mine:
            node.placed.discard(c)
            node.channels.discard(c)
            self.channels[c] = None
            self.confirmed.discard(c)
        self.refresh().addCallback(lambda _: self._place(mine))

    def _state(self) -> None:
        now = self.connected
        if now != self.was_connected:
            self.was_connected = now
            if now:
                self.bridge.shard_up(self)
            else:
                self.bridge.shard_down(self)

    # -- state ------------------------------------------------------------------

    def node_for_slot(self, slot: int) -> Node | None:
        return self.slots[slot]

    def node_for_key(self, key: str | bytes) -> Node | None:
        return self.slots[key_slot(key)]

    @property
    def connected(self) -> bool:
        """The slot map is known and every master is connected."""
        return self.discovered and all(n.connected for n in self.masters)

    @property
    def scripts(self) -> list:
        """What its nodes load on connecting: what the bridge preloads."""
        return self.bridge.scripts

    @property
    def keepalive(self) -> float:
        """Its nodes' connections PING as the bridge's shards do."""
        return self.bridge.keepalive

    @property
    def error(self) -> str | None:
        if not self.discovered:
            return "the cluster's slot map is not known yet"
        return next((f"{n.address}: {n.error}" for n in self.masters if n.error), None)

    @property
    def subscriptions(self) -> int:
        return len(self.channels)

    def describe(self) -> dict:
        return {"cluster": True, "connected": self.connected, "error": self.error,
                "nodes": {n.address: dict(n.describe(), master=n in self.masters) for n in self.nodes.values()}}

    # -- the slot map ----------------------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """Ask a connected node for the slot map (one question at a time;
        asked again at once when asked meanwhile)."""
        if self._refreshing is not None:
            self._again = True
            return self._refreshing
        self._again = False
        self._refreshing = d = self._ask_slots()

        def done(_):
            self._refreshing = None
            if self._again:
                self.refresh()
        d.addBoth(done)
        return d

    @defer.inlineCallbacks
    def _ask_slots(self):
        nodes = sorted((n for n in self.nodes.values() if n.command is not None),
                       key=lambda n: n not in self.masters)
        for node in nodes:
            try:
                reply = yield node.command.execute_command("CLUSTER", "SLOTS")
            except Exception as e:
                self.log.debug("CLUSTER SLOTS on {node} failed: {error}", node=node.address, error=e)
                continue
            self._apply(parse_slots(reply, node.host))
            return
        for seed in self.seeds:
            self._node(*address_of(seed))     # the seeds again, in case every known node went

    def _apply(self, ranges) -> None:
        if not ranges:
            self.log.warn("the Redis Cluster has no slots assigned yet")
            return
        slots: list[Node | None] = [None] * SLOTS
        for first, last, host, port in ranges:
            node = self._node(host, port)
            slots[first:last + 1] = [node] * (last - first + 1)
        self.slots = slots
        self.discovered = True
        self.masters = masters = {n for n in slots if n is not None}
        for node in list(self.nodes.values()):
            if node not in masters:
                self._drop(node)
        self._place(list(self.channels))
        self._state()

    # -- commands ---------------------------------------------------------------------

    def execute(self, key: str | bytes, *args) -> defer.Deferred:
        """Run the command ``args`` on the master of ``key``'s slot."""
        return self._run(key_slot(key), args)

    def run(self, script, keys: list, args: list, fixed=()) -> defer.Deferred:
        """Run ``script`` (a :class:`~msgd.cluster.redis_pubsub.Script`: by its
        SHA1, loading it where missing) on the master of its first key's slot
        (``fixed``: arguments before ``args``, as for a Shard)."""
        start = self.reactor.seconds()
        d = self._run(key_slot(keys[0]), ("EVALSHA", script.sha, len(keys), *keys, *fixed, *args), script=script)
        return d.addCallback(observed, self._latency, self.reactor, start)

    @defer.inlineCallbacks
    def _run(self, slot: int, args: tuple, script=None):
        node, asking = self.slots[slot], False
        for attempt in range(self.max_redirects + 1):
            if node is None:
                raise ClusterError(f"no known master for slot {slot}" if self.discovered
                                   else "the cluster's slot map is not known yet")
            if not node.connected and attempt == 0:
                raise ClusterError(f"no connection to {node.address} (master of slot {slot}): {node.error}")
            try:
                conn = yield node.ready(self.timeout)
            except defer.TimeoutError:
                raise ClusterError(f"could not connect to {node.address} (master of slot {slot})") from None
            try:
                if asking:
                    conn.execute_command("ASKING").addErrback(lambda f: None)
                return (yield conn.execute_command(*args))
            except txredisapi.ResponseError as e:
                kind = error_kind(e)
                if kind in ("MOVED", "ASK"):
                    self.redirections[kind] += 1
                    _, _, host, port = redirect(e)  # type: ignore[misc]   # kind says it is one
                    target = self._node(host or node.host, port)
                    if kind == "MOVED":
                        self.slots[slot] = target
                        self.masters.add(target)
                        self.refresh()
                    node, asking = target, kind == "ASK"
                elif kind == "NOSCRIPT" and script is not None:
                    yield conn.execute_command("SCRIPT", "LOAD", script.text)
                elif kind in ("TRYAGAIN", "CLUSTERDOWN"):
                    pause: defer.Deferred = defer.Deferred()
                    self.reactor.callLater(self.retry_delay * (attempt + 1), pause.callback, None)
                    yield pause
                    node = self.slots[slot]
                else:
                    raise
                last = e
        raise ClusterError(f"gave up on slot {slot} after {self.max_redirects} redirections: {last}")

    # -- sharded pub/sub ------------------------------------------------------------------

    def subscribe(self, channels=(), patterns=()) -> defer.Deferred:
        """Want ``channels``: subscribed now where connected, and kept
        subscribed where they belong from then on.  Fires once each is
        confirmed by its node; fails when a node's connection is lost
        first (the channels stay wanted, subscribed when it is back)."""
        if patterns:
            return defer.fail(ClusterError("Redis Cluster has no sharded PSUBSCRIBE"))
        channels = list(channels)
        waits = []
        for c in channels:
            if c not in self.confirmed:
                d: defer.Deferred = defer.Deferred()
                self._waiters.setdefault(c, []).append(d)
                waits.append(d)
        new = [c for c in channels if c not in self.channels]
        for c in new:
            self.channels[c] = None
        self._place(new)
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure if f.check(defer.FirstError) else f)

    def unsubscribe(self, channels=(), patterns=()) -> None:
        by_node: dict[Node, list] = {}
        for c in channels:
            self.confirmed.discard(c)
            self._seen.discard(c)
            for d in self._waiters.pop(c, ()):
                d.callback(None)
            node = self.channels.pop(c, None)
            if node is not None:
                node.placed.discard(c)
                by_node.setdefault(node, []).append(c)
        for node, names in by_node.items():
            node.unsubscribe(names)

    def _place(self, channels: Iterable[str]) -> None:
        """Subscribe each channel on the master of its slot (moving it
        there from where it was)."""
        moves: dict[Node, list] = {}
        leaves: dict[Node, list] = {}
        for c in channels:
            if c not in self.channels:
                continue
            target, current = self.slots[key_slot(c)], self.channels[c]
            if target is current and target is not None:
                continue
            if current is not None:
                current.placed.discard(c)
                self.confirmed.discard(c)
                leaves.setdefault(current, []).append(c)
            self.channels[c] = target
            if target is not None:
                target.placed.add(c)
                moves.setdefault(target, []).append(c)
        for node, names in leaves.items():
            node.unsubscribe(names)
        for node, names in moves.items():
            if node.subscriber is not None:
                self.subscribe_on(node, names)

    def subscribe_on(self, node: Node, channels: list) -> None:
        for group, d in node.ssubscribe(channels):
            d.addCallbacks(lambda _, group=group: self._confirm(node, group),
                           lambda f, group=group: self._refused(node, group, f))

    def _confirm(self, node: Node, channels: list) -> None:
        again = []
        for c in channels:
            if self.channels.get(c) is not node:
                continue        # unsubscribed or moved meanwhile
            self.confirmed.add(c)
            if c in self._seen:
                again.append(c)
            self._seen.add(c)
            for d in self._waiters.pop(c, ()):
                d.callback(None)
        if again:
            self.bridge.resubscribed(self, again)

    def unconfirm(self, channels: Iterable[str], error: Exception | None = None) -> None:
        """``channels`` are no longer subscribed where they were; their
        waiters fail with ``error`` when given."""
        for c in channels:
            self.confirmed.discard(c)
            if error is not None:
                for d in self._waiters.pop(c, ()):
                    d.errback(error)

    def _refused(self, node: Node, channels: list, failure) -> None:
        if failure.check(txredisapi.ResponseError) and error_kind(failure.value) in ("MOVED", "ASK", "TRYAGAIN",
                                                                                     "CLUSTERDOWN"):
            self._unplace(node, channels)       # not (or no longer) this node's slot
        elif not failure.check(txredisapi.ConnectionError, ConnectionError):
            self.log.warn("SSUBSCRIBE on {node} failed: {error}", node=node.address, error=failure.getErrorMessage())


def _by_slot(channels) -> list[list]:
    groups: dict[int, list] = {}
    for c in channels:
        groups.setdefault(key_slot(c), []).append(c)
    return list(groups.values())
