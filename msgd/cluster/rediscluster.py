"""A Redis Cluster client for Twisted: a slot router over txredisapi connections.

txredisapi speaks to one Redis server (or shards keys itself over several);
it knows nothing of Redis Cluster, and no maintained Twisted client does.
This module adds what a cluster client needs, and no more than msgd uses:

- **Key slots**: CRC16 (XMODEM) of the key modulo 16384, of only the part
  between the first ``{`` and the next ``}`` when that part is not empty (a
  *hash tag*: ``msgd:{chat.lobby}:offset`` and ``msgd:{chat.lobby}:history``
  share a slot, so one Lua script may touch both).
- **Discovery**: ``CLUSTER SLOTS`` asked of any reachable node (the seeds at
  first) gives each slot range's master; a connection pair (commands, and
  sharded pub/sub) is kept to every master by a :class:`ClientService`
  (reconnecting with back-off).  The map is asked again when a node answers
  ``MOVED``, when a connection is lost, when a shard channel is unsubscribed
  by the server (its slot moved) and every ``refresh_interval`` seconds.
- **Routing**: a command goes to the master of its key's slot.  ``MOVED``
  refreshes the map and retries on the node named; ``ASK`` (a slot being
  migrated) retries once on the node named, preceded by ``ASKING``, without
  touching the map; ``TRYAGAIN`` and ``CLUSTERDOWN`` retry after a short
  pause.  At most ``max_redirects`` retries, then the error is the caller's.
  A command whose connection is lost is not retried (it may have run).
- **Scripts**: :meth:`RedisCluster.evalsha` routes by the script's first key
  and sends ``EVALSHA``; on ``NOSCRIPT`` it sends ``SCRIPT LOAD`` to that node
  and retries, so a script's text crosses the network once per node.
- **Sharded pub/sub** (Redis 7): :meth:`RedisCluster.ssubscribe` subscribes
  with ``SSUBSCRIBE`` on the master of the channel's slot,
  :meth:`RedisCluster.spublish` sends ``SPUBLISH`` there.  The client keeps the
  set of channels it wants and re-subscribes them where they belong after a
  node's connection comes back or their slot moved (the server tells
  subscribers with an unsolicited ``sunsubscribe``); ``on_subscribed`` is
  called with the channels each time they are subscribed again, so that a
  user can check what it may have missed meanwhile.

Only masters are used (no reads from replicas).  Node addresses from the
cluster are turned into endpoint strings by putting their host and port in
the first seed's endpoint string, so ``tls:``/``ssl:`` options carry over.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

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


# -- endpoints ---------------------------------------------------------------------------

def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on unescaped colons (escapes kept)."""
    parts, cur, i = [], "", 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur += description[i:i + 2]
            i += 2
            continue
        if c == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def endpoint_for(template: str, host: str, port: int) -> str:
    """``template`` (a client endpoint string) aimed at ``host``:``port``:
    its ``host=``/``port=`` (or first two positional) arguments replaced,
    every other option kept."""
    parts = _split_endpoint(template)
    kind, args = parts[0], parts[1:]
    positional = [i for i, a in enumerate(args) if "=" not in a]
    keyword = {a.partition("=")[0]: i for i, a in enumerate(args) if "=" in a}
    out = list(args)
    for name, value, pos in (("host", _escape(host), 0), ("port", str(port), 1)):
        if name in keyword:
            out[keyword[name]] = f"{name}={value}"
        elif len(positional) > pos:
            out[positional[pos]] = value
        else:
            out.append(f"{name}={value}")
    return ":".join([kind, *out])


def address_of(template: str) -> tuple[str, int]:
    """The ``(host, port)`` a client endpoint string connects to."""
    args = _split_endpoint(template)[1:]
    positional = [a for a in args if "=" not in a]
    keyword = dict(a.partition("=")[::2] for a in args if "=" in a)
    host = keyword.get("host", positional[0] if positional else "127.0.0.1")
    port = keyword.get("port", positional[1] if len(positional) > 1 else "6379")
    return host.replace("\\:", ":").replace("\\\\", "\\"), int(port)


def endpoint_name(description: str) -> str:
    """What names a Redis server reached through a client endpoint string:
    ``host:port``, or ``unix:PATH`` for a Unix socket."""
    parts = _split_endpoint(description.strip())
    if parts[0] == "unix":
        args = parts[1:]
        keyword = dict(a.partition("=")[::2] for a in args if "=" in a)
        path = keyword.get("path", next((a for a in args if "=" not in a), ""))
        return "unix:" + path.replace("\\:", ":")
    return "%s:%d" % address_of(description)


# -- protocols -----------------------------------------------------------------------------

class CommandProtocol(txredisapi.RedisProtocol):
    """A command connection; tells its node when it is ready and lost."""

    def connectionMade(self):
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.factory.node.up(self))
        return d

    def connectionLost(self, why):
        while self.replyQueue.waiting:
            self.replyReceived(txredisapi.ConnectionError(f"lost connection: {why.getErrorMessage()}"))
        super().connectionLost(why)
        self.factory.node.down(self, why)


class ShardSubscriber(CommandProtocol):
    """A connection in sharded pub/sub mode.

    txredisapi's subscriber protocol neither knows ``smessage`` nor can
    match the one-reply-per-channel answers of several commands in flight,
    nor tell them from the server's own ``sunsubscribe`` when a slot moves.
    Here every (un)subscribe waits for one confirmation per channel it
    named; a confirmation no command asked for is an unsolicited one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list[list] = []     # [kind, set(channels), Deferred], oldest first

    def _send(self, kind: str, channels: Iterable[str]) -> defer.Deferred:
        channels = list(channels)
        d = defer.Deferred()
        self.pending.append([kind, set(channels), d])
        self.transport.write(self._build_command(kind.upper(), *channels))
        return d

    def ssubscribe(self, channels: Iterable[str]) -> defer.Deferred:
        return self._send("ssubscribe", channels)

    def sunsubscribe(self, channels: Iterable[str]) -> defer.Deferred:
        return self._send("sunsubscribe", channels)

    def replyReceived(self, reply):
        if not self._ready:
            # AUTH / SELECT while connecting
            return super().replyReceived(reply)
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            channel = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
            if kind == "smessage":
                self.factory.node.cluster.message(channel, reply[2])
                return
            if kind in ("ssubscribe", "sunsubscribe"):
                for entry in self.pending:
                    if entry[0] == kind and channel in entry[1]:
                        entry[1].discard(channel)
                        if not entry[1]:
                            self.pending.remove(entry)
                            entry[2].callback(kind)
                        return
                if kind == "sunsubscribe":
                    self.factory.node.cluster.dropped(self.factory.node, channel)
                return
        if isinstance(reply, Exception) and self.pending:
            entry = self.pending.pop(0)
            entry[2].errback(reply)
            return
        super().replyReceived(reply)

    def connectionLost(self, why):
        pending, self.pending = self.pending, []
        for entry in pending:
            entry[2].errback(txredisapi.ConnectionError(f"lost connection: {why.getErrorMessage()}"))
        super().connectionLost(why)


class _Factory(Factory):
    """Builds one kind of protocol for one node (standing in for
    txredisapi's pool factory, whose methods its protocols call)."""

    isLazy = False

    class _NoQueue:
        def put(self, conn):
            pass

    def __init__(self, node: "Node", protocol):
        self.node, self.protocol = node, protocol
        self.connectionQueue = self._NoQueue()

    def buildProtocol(self, addr):
        p = self.protocol(password=self.node.cluster.password or None, convertNumbers=False)
        p.factory = self
        p.callLater = self.node.cluster.reactor.callLater
        return p

    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.node.error = str(why)


# -- the cluster ------------------------------------------------------------------------------

class Node(MultiService):
    """One master: a command connection and a sharded-pub/sub connection,
    each kept up by a ClientService."""

    def __init__(self, cluster: "RedisCluster", host: str, port: int):
        super().__init__()
        self.cluster = cluster
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.command: CommandProtocol | None = None
        self.subscriber: ShardSubscriber | None = None
        self.channels: set[str] = set()      # shard channels that belong on this node
        self.error: str | None = "not connected yet"
        self._waiting: list[defer.Deferred] = []
        endpoint = clientFromString(cluster.reactor, endpoint_for(cluster.template, host, port))
        for protocol in (CommandProtocol, ShardSubscriber):
            ClientService(endpoint, _Factory(self, protocol), retryPolicy=cluster.retry_policy,
                          clock=cluster.reactor).setServiceParent(self)

    @property
    def connected(self) -> bool:
        return self.command is not None and self.subscriber is not None

    def up(self, proto) -> None:
        if isinstance(proto, ShardSubscriber):
            self.subscriber = proto
            if self.channels:
                self.cluster.subscribe_on(self, sorted(self.channels))
        else:
            self.command = proto
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(proto)
        if self.connected:
            self.error = None
        self.cluster.node_up(self)

    def down(self, proto, why) -> None:
        if proto is self.command:
            self.command = None
        elif proto is self.subscriber:
            self.subscriber = None
            self.cluster.unconfirm(self.channels, txredisapi.ConnectionError(f"lost connection to {self.address}"))
        else:
            return
        self.error = f"connection lost: {why.getErrorMessage()}"
        self.cluster.node_down(self)

    def ready(self, timeout: float) -> defer.Deferred:
        """Fires with the command connection, waiting up to ``timeout``."""
        if self.command is not None:
            return defer.succeed(self.command)
        d = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        d.addTimeout(timeout, self.cluster.reactor)
        return d

    def describe(self) -> dict:
        return {"connected": self.connected, "error": self.error, "channels": len(self.channels)}


class ClusterError(txredisapi.RedisError):
    """The cluster could not be reached, or kept redirecting."""


class Script:
    """A Lua script and its SHA1, for :meth:`RedisCluster.evalsha`."""

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class RedisCluster(MultiService):
    """A Redis Cluster client (see the module docstring).

    ``seeds``: client endpoint strings of some of the cluster's nodes.
    ``on_message(channel, message)`` is called for every shard-channel
    message; ``on_subscribed(channels)`` when ``channels`` were subscribed
    again after their node's connection came back or their slot moved
    (what was published meanwhile was not received; the first subscription
    is the Deferred of :meth:`ssubscribe`); ``on_state()`` when a node's
    connection came or went or the slot map changed."""

    log = Logger()

    def __init__(self, seeds: Iterable[str], reactor, password: str = "", retry_policy=None,
                 on_message: Callable[[str, object], None] | None = None,
                 on_subscribed: Callable[[list], None] | None = None,
                 on_state: Callable[[], None] | None = None,
                 max_redirects: int = 5, timeout: float = 5.0, refresh_interval: float = 30.0,
                 retry_delay: float = 0.05):
        super().__init__()
        self.seeds = [s.strip() for s in seeds if s.strip()]
        if not self.seeds:
            raise ValueError("a Redis Cluster needs at least one seed endpoint")
        self.template = self.seeds[0]
        self.reactor = reactor
        self.password = password
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self.on_message = on_message or (lambda channel, message: None)
        self.on_subscribed = on_subscribed or (lambda channels: None)
        self.on_state = on_state or (lambda: None)
        self.max_redirects = max_redirects
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.slots: list[Node | None] = [None] * SLOTS
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
        self.unconfirm(node.channels)
        for channel in node.channels:
            self.channels[channel] = None
        node.channels = set()
        node.disownServiceParent()

    # -- state ------------------------------------------------------------------

    def node_up(self, node: Node) -> None:
        if not self.discovered and node.command is not None:
            self.refresh()
        self.on_state()

    def node_down(self, node: Node) -> None:
        if self.running:
            self.refresh()
        self.on_state()

    def node_for_slot(self, slot: int) -> Node | None:
        return self.slots[slot]

    def node_for_key(self, key: str | bytes) -> Node | None:
        return self.slots[key_slot(key)]

    def connected_for(self, key: str | bytes) -> bool:
        node = self.node_for_key(key)
        return node is not None and node.connected

    @property
    def connected(self) -> bool:
        """The slot map is known and every master's connections are up."""
        masters = {n for n in self.slots if n is not None}
        return self.discovered and all(n.connected for n in masters)

    def describe(self) -> dict:
        masters = {id(n) for n in self.slots if n is not None}
        return {n.address: dict(n.describe(), master=id(n) in masters) for n in self.nodes.values()}

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
                       key=lambda n: n not in self.slots)
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
        masters = set(slots) - {None}
        for node in list(self.nodes.values()):
            if node not in masters:
                self._drop(node)
        self._place(list(self.channels))
        self.on_state()

    # -- commands ---------------------------------------------------------------------

    def execute(self, key: str | bytes, *args) -> defer.Deferred:
        """Run the command ``args`` on the master of ``key``'s slot."""
        return self._run(key_slot(key), args)

    def evalsha(self, script: Script, keys: list, args: list) -> defer.Deferred:
        """Run ``script`` (by its SHA1, loading it where missing) on the
        master of its first key's slot."""
        return self._run(key_slot(keys[0]), ("EVALSHA", script.sha, len(keys), *keys, *args), script=script)

    def spublish(self, channel: str, message) -> defer.Deferred:
        return self._run(key_slot(channel), ("SPUBLISH", channel, message))

    @defer.inlineCallbacks
    def _run(self, slot: int, args: tuple, script: Script | None = None):
        node, asking = self.slots[slot], False
        for attempt in range(self.max_redirects + 1):
            if node is None:
                raise ClusterError(f"no known master for slot {slot}" if self.discovered
                                   else "the cluster's slot map is not known yet")
            if node.command is None and attempt == 0:
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
                    _, _, host, port = redirect(e)
                    target = self._node(host or node.host, port)
                    if kind == "MOVED":
                        self.slots[slot] = target
                        self.refresh()
                    node, asking = target, kind == "ASK"
                elif kind == "NOSCRIPT" and script is not None:
                    yield conn.execute_command("SCRIPT", "LOAD", script.text)
                elif kind in ("TRYAGAIN", "CLUSTERDOWN"):
                    pause = defer.Deferred()
                    self.reactor.callLater(self.retry_delay * (attempt + 1), pause.callback, None)
                    yield pause
                    node = self.slots[slot]
                else:
                    raise
                last = e
        raise ClusterError(f"gave up on slot {slot} after {self.max_redirects} redirections: {last}")

    # -- sharded pub/sub ------------------------------------------------------------------

    def ssubscribe(self, channels: Iterable[str]) -> defer.Deferred:
        """Want ``channels``: subscribed now where connected, and kept
        subscribed where they belong from then on.  Fires once each is
        confirmed by its node; fails when a node's connection is lost
        first (the channels stay wanted, subscribed when it is back)."""
        channels = list(channels)
        waits = []
        for c in channels:
            if c not in self.confirmed:
                d = defer.Deferred()
                self._waiters.setdefault(c, []).append(d)
                waits.append(d)
        new = [c for c in channels if c not in self.channels]
        for c in new:
            self.channels[c] = None
        self._place(new)
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure if f.check(defer.FirstError) else f)

    def sunsubscribe(self, channels: Iterable[str]) -> None:
        by_node: dict[Node, list] = {}
        for c in channels:
            self.confirmed.discard(c)
            self._seen.discard(c)
            for d in self._waiters.pop(c, ()):
                d.callback(None)
            node = self.channels.pop(c, None)
            if node is not None:
                node.channels.discard(c)
                by_node.setdefault(node, []).append(c)
        for node, names in by_node.items():
            if node.subscriber is not None:
                self._unsubscribe_on(node, names)

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
                current.channels.discard(c)
                self.confirmed.discard(c)
                leaves.setdefault(current, []).append(c)
            self.channels[c] = target
            if target is not None:
                target.channels.add(c)
                moves.setdefault(target, []).append(c)
        for node, names in leaves.items():
            if node.subscriber is not None:
                self._unsubscribe_on(node, names)
        for node, names in moves.items():
            if node.subscriber is not None:
                self.subscribe_on(node, names)

    def _unsubscribe_on(self, node: Node, channels: list) -> None:
        for group in _by_slot(channels):
            node.subscriber.sunsubscribe(group).addErrback(lambda f: None)

    def subscribe_on(self, node: Node, channels: list) -> None:
        """Send SSUBSCRIBE for ``channels`` (grouped by slot, as the server
        wants) on ``node``'s subscriber connection."""
        for group in _by_slot(channels):
            node.subscriber.ssubscribe(group).addCallbacks(
                lambda _, group=group: self._confirm(node, group),
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
            self.on_subscribed(again)

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
            # not (or no longer) this node's slot: place them again once the map is fresh
            for c in channels:
                if self.channels.get(c) is node:
                    node.channels.discard(c)
                    self.channels[c] = None
                    self.confirmed.discard(c)
            self.refresh().addCallback(lambda _: self._place(channels))
        elif not failure.check(txredisapi.ConnectionError):
            self.log.warn("SSUBSCRIBE on {node} failed: {error}", node=node.address, error=failure.getErrorMessage())

    def dropped(self, node: Node, channel: str) -> None:
        """The server unsubscribed ``channel`` by itself: its slot moved."""
        if self.channels.get(channel) is node:
            node.channels.discard(channel)
            self.channels[channel] = None
            self.confirmed.discard(channel)
            self.refresh().addCallback(lambda _: self._place([channel]))

    def message(self, channel: str, message) -> None:
        self.on_message(channel, message)


def _by_slot(channels: list) -> list[list]:
    groups: dict[int, list] = {}
    for c in channels:
        groups.setdefault(key_slot(c), []).append(c)
    return list(groups.values())
