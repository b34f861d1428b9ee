"""``[pubsub] backend = redis``: channels shared by every node through Redis.

Keys and events
---------------

Every key and the pub/sub channel of one msgd channel ``NAME`` sit under
one Redis Cluster hash tag, so that they live on one shard (a Lua script
may touch them all, and ``SPUBLISH`` from that script is allowed)::

    PREFIX:{TAG}:epoch     the channel's epoch (set once, by whoever comes first)
    PREFIX:{TAG}:offset    INCR'd for every event: the shared offset
    PREFIX:{TAG}:history   a list of the last history_size events (JSON)
    PREFIX:{TAG}:ev        the Redis pub/sub channel carrying its events

``TAG`` is ``NAME`` with ``%``, ``{`` and ``}`` written ``%25``, ``%7B`` and
``%7D`` (:func:`tag`), so that the tag is the whole name, never empty and
never cut short.  (The key names of msgd before interest routing —
``PREFIX:ch:NAME:*`` and ``PREFIX:events`` — are not read: channels start
afresh, resuming clients are told ``recovered: false`` once.)

A publish on any node runs one Lua script (``EVALSHA``; its text is loaded
with ``SCRIPT LOAD`` when a connection is made, and again on ``NOSCRIPT``):
assign the next offset, append the event to the history (trimmed), and
publish it on the channel's ``:ev`` channel (five Redis commands; the keys'
expiry, ``history_age`` plus a day, is moved on a node's first publish on
the channel, then at most every ``REFRESH`` seconds, and on any key the
publish creates).  Publishes are not waited for one by one: every command
of a reactor turn leaves in one write.

Interest routing
----------------

A node receives only the events of channels and patterns it has local
subscribers for: it ``SUBSCRIBE``\\ s to ``PREFIX:{TAG}:ev`` when the first
local subscriber of ``NAME`` arrives and ``UNSUBSCRIBE``\\ s when the last
one leaves (both batched: one command per reactor turn and shard).  It keeps
no state for a channel without local subscribers: a node that only
publishes keeps nothing, the offset comes from Redis.

A pattern subscription (``news.*``, fnmatch semantics) ``PSUBSCRIBE``\\ s
every shard to the Redis glob :func:`redis_pattern` makes of it: the
pattern's literal characters escaped (and ``%{}`` written as in tags), every
wildcard (``*``, ``?``, ``[...]``) made ``*``.  That glob matches the
``:ev`` channel of every name the pattern matches, and possibly a few more
(``?`` may match ``%7B``); the broker then delivers an event only to the
patterns that match its channel by fnmatch — so what a pattern subscriber
gets is exact.  One publish reaching a node both as ``message`` and as
``pmessage`` (the node follows the channel and a matching pattern) arrives
as consecutive identical pushes on one connection, and is taken once.

A pattern's resume (``since``/``epoch`` objects by channel) needs the
state of channels the node may keep nothing of: the broker asks for the
names of the channels in Redis that the pattern matches
(:meth:`RedisBridge.channels`: ``SCAN`` of the shards' ``PREFIX:{...}:offset``
keys matching the pattern's glob, then fnmatch) and reads each one once
(:meth:`RedisBridge.read`: the channel-join script, without following the
channel), after the pattern's ``PSUBSCRIBE`` is confirmed; what arrives
meanwhile is held and taken once after the replay.

Joining a channel: a subscribe waits until Redis confirmed the ``SUBSCRIBE``
and the node has read the channel's epoch, offset and history (events that
arrive meanwhile are held and applied after), so resuming with
``since``/``epoch`` on any node gets exactly what was missed, or
``recovered: false``.  Events arrive in offset order; one that does not
follow the last one (a push lost with a connection, an epoch changed in
Redis) makes the node read the channel again: subscribers get the missed
events from the history, or a gap notification (:mod:`msgd.core.pubsub`).

Outage
------

When a shard's connection is lost — closed, reset, or dropped by the node
because a ``PING`` sent every ``[pubsub] keepalive`` was still unanswered
when the next was due (a frozen Redis, a partition without a reset) — the
node goes on alone for the channels on that shard: publishes are delivered locally, under a fresh local epoch
announced to the channel's subscribers by a gap notification first (events
published elsewhere no longer reach them).  ``/health`` says ``degraded``
with ``pubsub.connected: false``; the ClientServices reconnect with back-off.
When the shard is back, the node subscribes again and resynchronises each
channel it serves: subscribers still connected get the events they missed
when the shard's history covers them, else a gap notification; pattern
subscribers get a gap notification for their pattern.  For each channel it
published on alone, it publishes a *gap marker* through the shard, so that
subscribers on every other node learn that events were published that they
never got (and resuming clients meet it in the history).

Shards
------

Everything per channel goes through the shard that
:meth:`RedisBridge.shard_for` picks for its name: the one :class:`Shard`
of a single ``redis`` endpoint, one of several standalone shards by
rendezvous hashing (:mod:`msgd.cluster.hashing`), or with ``cluster = yes``
a Redis Cluster acting as one shard (:mod:`msgd.cluster.rediscluster`).
See :class:`Shard` for what the bridge needs of one.
"""

from __future__ import annotations

import fnmatch
import hashlib
from functools import partial
import json
import re
from collections import deque

import orjson
import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from msgd.cluster.endpoints import endpoint_name
from msgd.cluster.hashing import Rendezvous
from msgd.core.pubsub import Event, new_epoch, presence_notice
from msgd.net import write_now


class Script:
    """A Lua script run by its SHA1 (``EVALSHA``)."""

    def __init__(self, text: str):
        self.text = text.strip().encode()
        self.sha = hashlib.sha1(self.text).hexdigest()


# KEYS: epoch, offset, history.  ARGV: first what is the same for every publish on the channel
# (encoded once: RedisProtocol.evalsha's ``fixed``): channel (JSON), history size, ttl, pub/sub
# channel, publish command (PUBLISH or SPUBLISH); then new epoch, data (JSON), time, extra JSON
# fields ('' or ',"g":1' for a gap marker), '1' to move the keys' expiry to ttl from now (''
# leaves it: a key this publish creates gets it all the same).  Five commands when the channel
# exists and the expiry is left; scripts run atomically, so GET then SET is SET NX.
PUBLISH = Script("""
local ttl, refresh = ARGV[3], ARGV[10] == '1'
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[1], epoch, 'EX', ttl)
elseif refresh then
  redis.call('EXPIRE', KEYS[1], ttl)
end
local offset = redis.call('INCR', KEYS[2])
if refresh or offset == 1 then
  redis.call('EXPIRE', KEYS[2], ttl)
end
local ev = '{"c":' .. ARGV[1] .. ',"o":' .. offset .. ',"e":"' .. epoch .. '","t":' .. ARGV[8] .. ARGV[9]
  .. ',"d":' .. ARGV[7] .. '}'
local size = tonumber(ARGV[2])
if size > 0 then
  if redis.call('RPUSH', KEYS[3], ev) == 1 or refresh then
    redis.call('EXPIRE', KEYS[3], ttl)
  end
  redis.call('LTRIM', KEYS[3], -size, -1)
end
redis.call(ARGV[5], ARGV[4], ev)
return offset
""")

# KEYS: epoch, offset, history.  ARGV: new epoch, ttl
SYNC = Script("""
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]) or '0', redis.call('LRANGE', KEYS[3], 0, -1)}
""")

# KEYS: a key of the channel (for a Redis Cluster to route by).  ARGV: pub/sub channel, message,
# publish command (PUBLISH or SPUBLISH)
ANNOUNCE = Script("""
return redis.call(ARGV[3], ARGV[1], ARGV[2])
""")

# ARGV: cursor, glob, count.  One SCAN step (the bridge goes on until the cursor is 0)
SCAN = Script("""
return redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
""")

SCRIPTS = (PUBLISH, SYNC, ANNOUNCE, SCAN)      # loaded on every connection (RedisBridge.preload adds more)

# A publish moves its channel's keys' expiry to ttl from now only if this node has not done so in
# the last REFRESH seconds (ttl is history_age plus a day: the keys outlive the last publish by that,
# less up to REFRESH)
REFRESH = 60.0


# -- names ------------------------------------------------------------------------------

def tag(name: str) -> str:
    """``name`` as the hash tag of its keys: ``%``, ``{``, ``}`` escaped."""
    if "%" in name or "{" in name or "}" in name:
        return name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return name


def untag(text: str) -> str:
    """The inverse of :func:`tag`."""
    return _ESCAPED.sub(lambda m: _UNESCAPE[m.group(1)], text) if "%" in text else text


_ESCAPED = re.compile(r"%(25|7B|7D)")
_UNESCAPE = {"25": "%", "7B": "{", "7D": "}"}


def redis_pattern(prefix: str, pattern: str) -> str:
    """The Redis glob matching the ``:ev`` channel of every name that the
    fnmatch ``pattern`` matches (and maybe more: see the module docstring)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c in "*?[":
            if c == "[":       # a class as fnmatch reads it: [!...] / []...] up to the next ]
                j = i + 1
                if j < n and pattern[j] == "!":
                    j += 1
                if j < n and pattern[j] == "]":
                    j += 1
                while j < n and pattern[j] != "]":
                    j += 1
                if j < n:
                    i = j      # skip the class; with no closing ] the [ alone is covered by *
            if not out or out[-1] != "*":
                out.append("*")
        else:
            t = tag(c)
            out.append("\\" + t if t in ("\\", "]") else t)
        i += 1
    return f"{prefix}:{{{''.join(out)}}}:ev"


# -- Redis protocol --------------------------------------------------------------------

_INCOMPLETE = object()


def _reply(buf: bytes, pos: int):
    """One RESP2 reply at ``pos``: ``(value, next position)``, or
    ``(_INCOMPLETE, pos)``.  Bulk strings stay bytes."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    if kind == 36:                                  # $ bulk string
        size = int(buf[pos + 1:end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            return _INCOMPLETE, pos
        return buf[end + 2:stop], stop + 2
    if kind == 42:                                  # * array
        count = int(buf[pos + 1:end])
        if count < 0:
            return None, end + 2
        items, p = [], end + 2
        for _ in range(count):
            item, p = _reply(buf, p)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, p
    if kind == 58:                                  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:                                  # + status
        return buf[pos + 1:end].decode(), end + 2
    if kind == 45:                                  # - error
        text = buf[pos + 1:end].decode(errors="replace")
        return txredisapi.ResponseError(text[4:] if text.startswith("ERR ") else text), end + 2
    raise txredisapi.InvalidResponse(f"unexpected reply type {chr(kind)!r}")


def _bulks(args) -> bytes:
    """Command arguments as RESP bulk strings (without the count)."""
    out: list[bytes] = []
    append = out.append
    for a in args:
        t = type(a)
        if t is str:
            a = a.encode()
        elif t is not bytes:
            a = _encode(a)
        append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _encode(a) -> bytes:
    """A command argument other than ``str`` or ``bytes``, as bytes."""
    if type(a) is int:
        return b"%d" % a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, float):
        return format(a, "f").encode()
    if isinstance(a, (bytes, bytearray)):
        return bytes(a)
    return str(a).encode()


class RedisProtocol(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol (its commands, its AUTH/SELECT on connect)
    reading every complete reply of a read at once — its own reader hands
    over one bulk string per reactor turn, so events from Redis would each
    cost a turn — with a lean command path: a command is written at once
    (those of one reactor turn leave in one write) and its reply fires one
    Deferred (an error reply errbacks it).  Bulk strings are bytes.

    Scripts (:meth:`evalsha`: every publish) are pipelined in bursts: those
    of a reactor turn leave together at its end, and every ``BURST``-th
    sends what has gathered at once, so that Redis — and the nodes its
    events go to — start on the first publishes of a burst while this node
    is still reading the rest.  Other commands send what is gathered first:
    replies come back in the order the commands were written."""

    BURST = 16

    def __init__(self, password=None, dbid=None):
        super().__init__(charset=None, password=password, dbid=dbid, convertNumbers=False)
        self._buf = b""
        self._replies: deque = deque()
        self._heads: dict[tuple, bytes] = {}
        self._keepalive: LoopingCall | None = None
        self._pinged = False        # a PING is waiting for its reply
        self._burst: list[bytes] = []     # scripts not written yet
        self._burst_end: IDelayedCall | None = None

    def connectionMade(self):
        # Twisted leaves Nagle on for client connections: a command written while the
        # previous write is not acknowledged yet would wait for that ACK
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        shard = self.factory.shard
        if shard.keepalive:
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = shard.reactor
            self._keepalive.start(shard.keepalive, now=False)
        return super().connectionMade()

    def _ping(self) -> None:
        """Every ``[pubsub] keepalive``: a Redis that left the last PING
        unanswered (frozen, or cut off without a reset) is taken as gone —
        the connection is aborted, and its loss handled as any other."""
        if not self.connected:
            return
        if self._pinged:
            self.factory.shard.log.error(
                "pub/sub: Redis at {endpoint} left a PING unanswered for {seconds}s; dropping the connection",
                endpoint=self.factory.shard.endpoint, seconds=self._keepalive.interval if self._keepalive else 0)
            self.transport.abortConnection()
            return
        self._pinged = True
        self.execute_command("PING").addBoth(self._pong)

    def _pong(self, _) -> None:
        self._pinged = False

    def execute_command(self, *args, **kwargs) -> defer.Deferred:
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        if self._burst:
            self._send_burst()
        self.transport.write(self._build_command(*args))
        d: defer.Deferred = defer.Deferred()
        self._replies.append(d)
        return d

    def replyReceived(self, reply):
        if not self._replies:
            raise txredisapi.InvalidResponse("a reply to no command")
        d = self._replies.popleft()
        if isinstance(reply, Exception):
            d.errback(reply)
        else:
            d.callback(reply)

    def evalsha(self, sha: str, keys, args, fixed=()) -> defer.Deferred:
        """``EVALSHA sha len(keys) *keys *fixed *args``, the part up to
        ``args`` encoded once per script, keys and ``fixed`` (the arguments
        that do not change from one call to the next, e.g. a channel's)."""
        head = self._heads.get((sha, *keys, *fixed))
        if head is None:
            if len(self._heads) > 4096:
                self._heads.clear()
            head = self._heads[(sha, *keys, *fixed)] = _bulks(("EVALSHA", sha, len(keys), *keys, *fixed))
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        burst = self._burst
        burst.append(b"*%d\r\n%s%s" % (3 + len(keys) + len(fixed) + len(args), head, _bulks(args)))
        if len(burst) >= self.BURST:
            self._send_burst()
        elif self._burst_end is None:
            self._burst_end = self.factory.shard.reactor.callLater(0, self._turn_ended)
        d: defer.Deferred = defer.Deferred()
        self._replies.append(d)
        return d

    def _turn_ended(self) -> None:
        self._burst_end = None
        self._send_burst()

    def _send_burst(self) -> None:
        """Write the scripts gathered (at the end of the turn, or once
        ``BURST`` of them are waiting, or before another command); the one
        end-of-turn call of a turn stays, whatever was sent before it."""
        burst, self._burst = self._burst, []
        if burst and self.connected:
            write_now(self.transport, b"".join(burst))

    def _build_command(self, *args, **kwargs) -> bytes:
        return b"*%d\r\n%s" % (len(args), _bulks(args))

    def dataReceived(self, data, unpause=False):
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        try:
            while pos < n:
                value, pos = _reply(buf, pos)
                if value is _INCOMPLETE:
                    break
                self.replyReceived(value)
        except (ValueError, IndexError, txredisapi.InvalidResponse) as e:   # not Redis speaking
            self._buf = b""
            self.factory.shard.log.error("pub/sub: bad reply from Redis ({error}); reconnecting", error=str(e))
            self.transport.loseConnection()
            return
        self._buf = buf[pos:] if pos < n else b""

    def connectionLost(self, why):
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._burst_end is not None and self._burst_end.active():
            self._burst_end.cancel()
        self._burst_end, self._burst = None, []     # their Deferreds fail below, with the others
        # the shard hears of it before the pending commands fail, so that a publish
        # falling back to local delivery finds the shard down
        self.factory.shard.lost(self.factory.kind, why)
        replies, self._replies = self._replies, deque()
        super().connectionLost(why)
        for d in replies:
            d.errback(txredisapi.ConnectionError("Redis connection lost"))


_CONFIRMS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
                       b"sunsubscribe"))


class SubscriberProtocol(RedisProtocol):
    """The pub/sub side: pushes go to the shard; (un)subscribe confirmations
    (one per channel or pattern) complete the command that named them.  A
    Redis Cluster node also ends shard-channel subscriptions by itself when
    their slot moves: an ``sunsubscribe`` no command asked for, which goes to
    ``shard.dropped``."""

    def __init__(self, password=None, dbid=None):
        super().__init__(password, dbid)
        self._expected: deque = deque()    # [kind, names not confirmed yet, Deferred], in command order
        self._last = None

    def replyReceived(self, reply):
        if type(reply) is list and reply:
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                self._push(reply[1], reply[2])
                return
            if kind == b"pmessage":
                self._push(reply[2], reply[3])
                return
            if type(kind) is bytes and kind in _CONFIRMS:
                name = reply[1]
                for entry in self._expected:
                    if entry[0] == kind and name in entry[1]:
                        entry[1].discard(name)
                        if not entry[1]:
                            self._expected.remove(entry)
                            if entry[2] is not None:
                                entry[2].callback(None)
                        return
                if kind == b"sunsubscribe" and name is not None:
                    self.factory.shard.dropped(name.decode())
                return
        elif isinstance(reply, Exception) and self._expected:
            head = self._expected.popleft()       # the whole command failed
            if head[2] is not None:
                head[2].errback(reply)
            return
        super().replyReceived(reply)

    def _push(self, channel, payload):
        # one publish seen through a channel and patterns: identical consecutive pushes
        if payload == self._last:
            return
        self._last = payload
        self.factory.shard.pushed(channel, payload)

    def send(self, command: str, names, wait: bool):
        """``command`` with ``names``; a Deferred firing once every name is
        confirmed when ``wait``, else None."""
        d: defer.Deferred | None = defer.Deferred() if wait else None
        self._expected.append([command.lower().encode(), {n.encode() for n in names}, d])
        self.transport.write(self._build_command(command, *names))
        return d

    def connectionLost(self, why):
        expected, self._expected = self._expected, deque()
        super().connectionLost(why)
        for _, _, d in expected:
            if d is not None:
                d.errback(ConnectionError("Redis connection lost"))


class _Factory(Factory):
    """Builds the protocols outside txredisapi's own pools (whose methods
    the protocols call)."""

    isLazy = False

    class _NoQueue:
        def put(self, conn):
            pass

    def __init__(self, shard, kind, protocol):
        self.shard, self.kind, self.protocol = shard, kind, protocol
        self.connectionQueue = self._NoQueue()

    def buildProtocol(self, addr):
        p = self.protocol(password=self.shard.password or None, dbid=self.shard.db or None)
        p.factory = self
        return p

    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.shard.error = str(why)


# -- shards ----------------------------------------------------------------------------------

def observed(result, latency, clock, start: float):
    """A callback: observe the round trip started at ``start`` in the
    ``latency`` histogram, when there is one; passes ``result`` on."""
    if latency is not None:
        latency.observe(clock.seconds() - start)
    return result


class Shard(MultiService):
    """One Redis server holding the keys and the events of some channels:
    a command connection and a subscriber connection, each kept up by a
    ClientService.

    What the bridge uses (another kind of shard — a Redis Cluster node, say
    — offers the same):

    ``connected``
        True while both connections are up and the scripts are loaded.
    ``publish_command``
        ``"PUBLISH"`` (``"SPUBLISH"`` for sharded pub/sub): what the publish
        script sends the event with.
    ``run(script, keys, args) -> Deferred``
        ``EVALSHA``; on ``NOSCRIPT`` loads the script and runs it again.
        Commands are written at once (pipelined): replies come in order.
    ``subscribe(channels, patterns) -> Deferred``
        One ``SUBSCRIBE`` and/or ``PSUBSCRIBE`` of Redis channel names and
        globs; fires once Redis confirmed all of them (errback: the
        connection was lost meanwhile).  The bridge sends patterns to every
        shard.  (Sharded pub/sub has no pattern form: a shard that
        ``SPUBLISH``\\ es needs another way to serve patterns.)
    ``unsubscribe(channels, patterns)``
        ``UNSUBSCRIBE``/``PUNSUBSCRIBE``; nothing to wait for.
    ``subscriptions``
        How many channels and patterns it holds in Redis.
    ``describe() -> dict``
        For ``/health``.

    What it calls on the bridge:

    ``bridge.scripts``
        The scripts to load (``SCRIPT LOAD``) on every command connection.
    ``bridge.keepalive``
        Seconds between PINGs on each connection (0: none): a PING still
        unanswered when the next is due aborts the connection.
    ``bridge.shard_up(shard)``
        Both connections ready (the first time and after every outage):
        the bridge subscribes again to what it needs and resynchronises.
    ``bridge.shard_down(shard)``
        A connection was lost; called before the commands waiting on it
        fail.  Redis subscriptions are gone with it.
    ``bridge.pushed(shard, channel, payload)``
        An event (``message``, ``pmessage`` or ``smessage``; payload bytes).
    """

    log = Logger()
    publish_command = "PUBLISH"

    def __init__(self, bridge, name: str, endpoint: str, password: str, db: int, reactor,
                 retry_policy=None, latency=None):
        super().__init__()
        self.setName(name)
        self.bridge = bridge
        self.endpoint = endpoint
        self.password, self.db = password, db
        self.reactor = reactor
        self.command: RedisProtocol | None = None
        self.subscriber: SubscriberProtocol | None = None
        self.connected = False
        self.error: str | None = "not connected yet"
        self.channels: set[str] = set()     # held in Redis (confirmed or on their way)
        self.patterns: set[str] = set()
        self._latency = latency
        policy = retry_policy or backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        ep = clientFromString(reactor, endpoint)
        for kind, protocol in (("command", RedisProtocol), ("subscriber", SubscriberProtocol)):
            ClientService(ep, _Factory(self, kind, protocol), retryPolicy=policy, clock=reactor,
                          prepareConnection=partial(self._ready, kind)).setServiceParent(self)

    @property
    def subscriptions(self) -> int:
        return len(self.channels) + len(self.patterns)

    @property
    def keepalive(self) -> float:
        return self.bridge.keepalive

    # -- connections -------------------------------------------------------------------

    @defer.inlineCallbacks
    def _ready(self, kind: str, proto):
        yield proto.whenConnected()
        if kind == "command":
            for script in self.bridge.scripts:
                yield proto.execute_command("SCRIPT", "LOAD", script.text)
        if not proto.connected:
            return
        setattr(self, kind, proto)
        if self.command is not None and self.subscriber is not None and not self.connected:
            self.connected = True
            self.error = None
            self.log.info("pub/sub: sharing channels through Redis at {endpoint}", endpoint=self.endpoint)
            self.bridge.shard_up(self)

    def lost(self, kind: str, why) -> None:
        if getattr(self, kind) is None:
            return
        setattr(self, kind, None)
        self.channels.clear()
        self.patterns.clear()
        if self.connected:
            self.connected = False
            self.error = f"{kind} connection lost: {why.getErrorMessage()}"
            if self.running:
                self.log.error("pub/sub: Redis connection lost ({error}); delivering on this node only "
                               "until it returns", error=self.error)
            self.bridge.shard_down(self)

    def describe(self) -> dict:
        return {"endpoint": self.endpoint, "connected": self.connected, "error": self.error}

    # -- what the bridge calls --------------------------------------------------------------

    def run(self, script: Script, keys, args, fixed=()) -> defer.Deferred:
        if self.command is None:
            return defer.fail(ConnectionError("Redis is not connected"))
        d = self.command.evalsha(script.sha, keys, args, fixed)
        return d.addCallbacks(observed, self._noscript,
                              callbackArgs=(self._latency, self.reactor, self.reactor.seconds()),
                              errbackArgs=(script, keys, args, fixed))

    def _noscript(self, f, script, keys, args, fixed):
        f.trap(txredisapi.ResponseError)
        if not str(f.value).startswith("NOSCRIPT") or self.command is None:
            return f
        self.log.info("pub/sub: Redis lost its scripts; loading them again")
        self.command.execute_command("SCRIPT", "LOAD", script.text)
        return self.command.evalsha(script.sha, keys, args, fixed)

    def subscribe(self, channels=(), patterns=()) -> defer.Deferred:
        if self.subscriber is None:
            return defer.fail(ConnectionError("Redis is not connected"))
        ds = []
        if channels:
            self.channels.update(channels)
            ds.append(self.subscriber.send("SUBSCRIBE", list(channels), True))
        if patterns:
            self.patterns.update(patterns)
            ds.append(self.subscriber.send("PSUBSCRIBE", list(patterns), True))
        return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)

    def unsubscribe(self, channels=(), patterns=()) -> None:
        if self.subscriber is None:
            return
        if channels:
            self.channels.difference_update(channels)
            self.subscriber.send("UNSUBSCRIBE", list(channels), False)
        if patterns:
            self.patterns.difference_update(patterns)
            self.subscriber.send("PUNSUBSCRIBE", list(patterns), False)

    def pushed(self, channel, payload) -> None:
        self.bridge.pushed(self, channel, payload)

    def dropped(self, channel: str) -> None:
        """The server ended the subscription to ``channel`` by itself (only
        Redis Cluster nodes do: :mod:`msgd.cluster.rediscluster`)."""
        self.channels.discard(channel)


# -- the bridge ---------------------------------------------------------------------------------

class _Follow:
    """A channel this node follows (it has local subscribers)."""

    __slots__ = ("name", "shard", "state", "held", "waiters")

    def __init__(self, name: str, shard: Shard):
        self.name = name
        self.shard = shard
        self.state = "away"         # away → joining (SUBSCRIBE) → reading (SYNC) → live
        self.held: list[Event] | None = None      # events arriving while joining/reading
        self.waiters: list[defer.Deferred] = []


class RedisBridge(MultiService):
    """Shares ``broker``'s channels through Redis (see the module docstring).

    What the broker calls: ``available(name)``, ``publish(name, data_json)``,
    ``follow(name)``, ``unfollow(name)``, ``watch(pattern)``,
    ``unwatch(pattern)``, ``forked(name)``, and for a pattern's resume
    ``channels(pattern)`` and ``read(name)``."""

    log = Logger()

    def __init__(self, broker, config, reactor, metrics=None, retry_policy=None, shards=None):
        super().__init__()
        self.setName("pubsub:redis")
        self.broker = broker
        self.config = config
        self.reactor = reactor
        self.prefix = config.prefix
        self.ttl = int(config.history_age) + 86400
        self.following: dict[str, _Follow] = {}
        self.patterns: set[str] = set()         # msgd patterns with local subscribers
        self._forked: set[str] = set()          # channels published on alone during an outage
        self._away: set[Shard] = set()          # shards that were lost (not merely not connected yet)
        # this turn's work per shard: [subscribe, unsubscribe, psubscribe, punsubscribe, follows joining,
        # Deferred fired once the (p)subscriptions are confirmed]
        self._batches: dict[Shard, list] = {}
        self._flush_call = None
        self.retry_delay = 1.0                  # before joining again a channel whose join failed
        self._name_cache: dict[str, tuple] = {}
        self.scripts: list[Script] = list(SCRIPTS)      # loaded on every connection of the shards
        self.keepalive = config.keepalive               # seconds between PINGs on each connection
        self._refreshed: dict[str, float] = {}      # channel -> when this node last moved its keys' expiry
        self._m = None
        latency = None
        if metrics is not None:
            latency = metrics.histogram("msgd_pubsub_redis_latency_seconds",
                                        "Round trip of a pub/sub script (publish, channel read) to Redis")
            self._m = metrics.counter("msgd_pubsub_redis_received_total", "Events received from Redis")
            metrics.gauge("msgd_pubsub_redis_connected", "1 when channels are shared through Redis") \
                .set_function(lambda: 1 if self.connected else 0)
            metrics.gauge("msgd_pubsub_redis_subscriptions", "Channels and patterns subscribed to in Redis") \
                .set_function(lambda: sum(s.subscriptions for s in self.shards))
        # shards: objects offering what Shard offers (tests pass their own), or a callable
        # making them for this bridge: shards(bridge, latency) (the node's makes a RedisCluster
        # with cluster = yes: msgd.cluster.rediscluster imports this module, not the reverse)
        if shards is None or callable(shards):
            if shards is not None:
                shards = shards(self, latency)
            elif config.cluster:
                raise ValueError("cluster = yes: pass shards making a RedisCluster (msgd.cluster.rediscluster)")
            else:
                shards = [Shard(self, endpoint_name(ep), ep, config.redis_password, config.redis_db, reactor,
                                retry_policy, latency) for ep in config.redis]
            for s in shards:
                s.setServiceParent(self)
        self.shards = shards
        self.ring = Rendezvous([s.name for s in shards])
        # Redis Cluster has no sharded PSUBSCRIBE: the reason pattern subscriptions are refused
        self.no_patterns = ("pattern subscriptions are not available with [pubsub] cluster = yes "
                            "(Redis Cluster has no sharded PSUBSCRIBE)") if config.cluster else None
        broker.backend = self

    def preload(self, *scripts: Script) -> None:
        """Load ``scripts`` too on every connection of the shards (before
        they connect; a script missing from Redis is loaded on ``NOSCRIPT``
        all the same)."""
        self.scripts.extend(s for s in scripts if s not in self.scripts)

    def stopService(self):
        """Stop the shards once the cluster-wide presence store (when there
        is one) has removed this node's entries through them: its removals'
        replies must arrive before the connections close (it waits at most
        its ``stop_timeout``)."""
        store = self.broker.presence_store
        leaving = store.leave() if store is not None else defer.succeed(None)
        return leaving.addCallback(lambda _: MultiService.stopService(self))

    def shard_for(self, name: str) -> Shard:
        """The shard holding channel ``name``: with several, the one the
        rendezvous hash of :mod:`msgd.cluster.hashing` picks (with one, no
        hashing)."""
        shards = self.shards
        return shards[self.ring.index(name)] if len(shards) > 1 else shards[0]

    # -- names --------------------------------------------------------------------------

    def keys(self, name: str) -> list[str]:
        return self._names(name)[0]

    def events_channel(self, name: str) -> str:
        return self._names(name)[1]

    def _names(self, name: str) -> tuple:
        """(keys, pub/sub channel, name as JSON) of a channel, computed once."""
        n = self._name_cache.get(name)
        if n is None:
            if len(self._name_cache) > 4096:
                self._name_cache.clear()
            base = f"{self.prefix}:{{{tag(name)}}}"
            n = self._name_cache[name] = ([f"{base}:epoch", f"{base}:offset", f"{base}:history"], f"{base}:ev",
                                          json.dumps(name))
        return n

    # -- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return all(s.connected for s in self.shards)

    def available(self, name: str) -> bool:
        return self.shard_for(name).connected

    def describe(self) -> dict:
        out = {"backend": "redis", "endpoint": ", ".join(self.config.redis), "connected": self.connected,
               "error": next((s.error for s in self.shards if s.error), None)}
        if len(self.shards) > 1 or self.config.cluster:
            out["shards"] = {s.name: s.describe() for s in self.shards}
        return out

    def shard_up(self, shard: Shard) -> None:
        for f in self.following.values():
            if f.shard is shard:
                self._join(f)
        if shard in self._away:
            self._away.discard(shard)
            self.broker.pattern_gap()      # their events of the shard's channels are not replayed
        for p in self.patterns:
            self._batch(shard)[2].add(redis_pattern(self.prefix, p))
        for name in [n for n in self._forked if self.shard_for(n) is shard]:
            self.broker.forget(name)        # what it kept of a channel it has no subscribers for
            self._mark_gap(shard, name)

    def shard_down(self, shard: Shard) -> None:
        """Channels of ``shard`` go on locally: a local publish forks them
        (:meth:`Broker._publish_alone`); :meth:`shard_up` resynchronises."""
        batch = self._batches.pop(shard, None)
        if batch is not None:
            batch[5].callback(None)         # pattern subscribers waiting for it: answered
        self._away.add(shard)
        for f in self.following.values():
            if f.shard is shard:
                f.state, f.held = "away", None
                self._release(f)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, name: str, data_json: bytes) -> defer.Deferred:
        """Publish the event whose data is ``data_json`` (encoded once, by the
        broker); fires with the shared offset; delivery comes back through Redis."""
        return self._publish(self.shard_for(name), name, data_json, "")

    def _publish(self, shard: Shard, name: str, data_json, extra: str) -> defer.Deferred:
        size, _ = self.broker._limits(name)
        keys, channel, name_json = self._names(name)
        now = self.reactor.seconds()
        last = self._refreshed.get(name)
        refresh = last is None or now - last >= REFRESH
        if refresh:
            if len(self._refreshed) > 4096:
                self._refreshed.clear()
            self._refreshed[name] = now
        return shard.run(PUBLISH, keys, [new_epoch(), data_json if data_json is not None else "null", repr(now), extra,
                                         "1" if refresh else ""],
                         (name_json, size, self.ttl, channel, shard.publish_command))

    # -- what cluster-wide presence (msgd.cluster.presence) uses -----------------------------

    def presence_keys(self, name: str) -> list[str]:
        base = f"{self.prefix}:{{{tag(name)}}}"
        return [f"{base}:presence", f"{base}:presence:exp"]

    def run(self, name: str, script: Script, keys, args) -> defer.Deferred:
        """Run ``script`` on the shard of channel ``name``."""
        return self.shard_for(name).run(script, keys, args)

    def announce(self, name: str, action: str, principal, count: int) -> defer.Deferred:
        """Tell every node's subscribers of ``name`` that ``count``
        subscriptions of ``principal`` joined or left: a notice on the
        channel's Redis channel (``{"c", "k": "join"|"leave", "p", "n", "i"}``;
        ``i``, a random id, keeps two alike from passing for one publish seen
        twice), not an event."""
        shard = self.shard_for(name)
        notice = json.dumps({"c": name, "k": action, "p": principal, "n": count, "i": new_epoch()})
        return shard.run(ANNOUNCE, self.presence_keys(name)[:1],
                         [self.events_channel(name), notice, shard.publish_command])

    def forked(self, name: str) -> None:
        """An event of ``name`` was published on this node alone (its shard was
        away, or the publish failed): mark the gap in the shared channel, now
        or once the shard is back."""
        self._forked.add(name)
        shard = self.shard_for(name)
        if shard.connected:
            self._mark_gap(shard, name)

    def _mark_gap(self, shard: Shard, name: str) -> None:
        """Publish a gap marker on ``name``: every node's subscribers get a
        gap there, and resuming clients meet it in the history."""
        def failed(f):
            self._forked.add(name)          # tried again when the shard comes back
            self.log.warn("pub/sub: could not mark the gap on {channel} ({error})",
                          channel=name, error=f.getErrorMessage())
        self._forked.discard(name)
        self._publish(shard, name, None, ',"g":1').addErrback(failed)

    # -- following channels ---------------------------------------------------------------------

    def follow(self, name: str) -> defer.Deferred | None:
        """Receive ``name``'s events from now on.  None when the channel is
        live already, else a Deferred firing once the node has its shared
        state (:meth:`Broker.resync` was called) or gave up for now."""
        f = self.following.get(name)
        if f is None:
            f = self.following[name] = _Follow(name, self.shard_for(name))
            if f.shard.connected:
                self._join(f)
        if f.state == "live" or f.state == "away":
            return None
        d: defer.Deferred = defer.Deferred()
        f.waiters.append(d)
        return d

    def unfollow(self, name: str) -> None:
        f = self.following.pop(name, None)
        if f is None:
            return
        self._release(f)
        # also while the shard is down: a Redis Cluster keeps its wanted channels
        b = self._batch(f.shard)
        ev = self.events_channel(name)
        b[0].discard(ev)
        b[1].add(ev)

    def watch(self, pattern: str) -> defer.Deferred | None:
        """Receive the events of the channels ``pattern`` matches."""
        self.patterns.add(pattern)
        glob = redis_pattern(self.prefix, pattern)
        waits = []
        for shard in self.shards:
            if shard.connected:
                b = self._batch(shard)
                b[3].discard(glob)
                b[2].add(glob)
                waits.append(b[5])
        return defer.gatherResults(waits, consumeErrors=True).addBoth(lambda _: None) if waits else None

    def unwatch(self, pattern: str) -> None:
        self.patterns.discard(pattern)
        glob = redis_pattern(self.prefix, pattern)
        if any(redis_pattern(self.prefix, p) == glob for p in self.patterns):
            return      # another pattern needs the same glob
        for shard in self.shards:
            if shard.connected:
                b = self._batch(shard)
                b[2].discard(glob)
                b[3].add(glob)

    def _join(self, f: _Follow) -> None:
        f.state, f.held = "joining", []
        b = self._batch(f.shard)
        ev = self.events_channel(f.name)
        b[1].discard(ev)
        b[0].add(ev)
        b[4].append(f)

    def _batch(self, shard: Shard) -> list:
        """This turn's (un)subscriptions for ``shard``, sent at the end of the turn."""
        b = self._batches.get(shard)
        if b is None:
            b = self._batches[shard] = [set(), set(), set(), set(), [], defer.Deferred()]
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(0, self._flush)
        return b

    def _flush(self) -> None:
        self._flush_call = None
        batches, self._batches = self._batches, {}
        for shard, (sub, unsub, psub, punsub, follows, done) in batches.items():
            if unsub or punsub:
                shard.unsubscribe(unsub, punsub)
            d: defer.Deferred = shard.subscribe(sub, psub) if sub or psub else defer.succeed(None)
            d.addCallbacks(self._joined, self._join_failed, callbackArgs=(follows,), errbackArgs=(follows,))
            d.addBoth(_fire, done)

    def _joined(self, _, follows: list[_Follow]) -> None:
        for f in follows:
            if f.state == "joining" and self.following.get(f.name) is f:
                self._read(f)

    def _join_failed(self, failure, follows: list[_Follow]) -> None:
        self.log.warn("pub/sub: could not subscribe in Redis ({error})", error=failure.getErrorMessage())
        for f in follows:
            if f.state == "joining" and self.following.get(f.name) is f:
                self._failed(f)

    def _read(self, f: _Follow, held: list | None = None) -> None:
        """Read the channel's shared state; events arriving meanwhile are held."""
        f.state = "reading"
        if held is not None:
            f.held = held
        f.shard.run(SYNC, self.keys(f.name), [new_epoch(), self.ttl]).addCallbacks(
            self._got, self._read_failed, callbackArgs=(f,), errbackArgs=(f,))

    def _got(self, reply, f: _Follow) -> None:
        if self.following.get(f.name) is not f or f.state != "reading":
            return
        self.broker.resync(f.name, *self._state(reply, f.name))
        held, f.held = f.held or [], None
        f.state = "live"
        for ev in held:
            # what was published between the SUBSCRIBE and the read is in both: taken once;
            # anything else that does not follow is a gap (no second read: that could loop)
            self.broker.receive(ev, force=True)
        self._release(f)

    def _state(self, reply, name: str) -> tuple[str, int, list[Event]]:
        """``(epoch, offset, events)`` from the SYNC script's reply."""
        epoch, offset, history = reply
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        events = []
        for raw in history:
            try:
                events.append(_event(_loads(raw)))
            except (ValueError, KeyError, TypeError):
                self.log.warn("pub/sub: bad event in the history of {channel}", channel=name)
        return epoch, int(offset), events

    # -- one-shot reads (a pattern's resume) ---------------------------------------------------

    def read(self, name: str) -> defer.Deferred:
        """Channel ``name``'s shared state, read once without following the
        channel: fires with ``(epoch, offset, events)``."""
        return self.shard_for(name).run(SYNC, self.keys(name), [new_epoch(), self.ttl]).addCallback(
            self._state, name)

    def channels(self, pattern: str) -> defer.Deferred:
        """The names of the channels kept in Redis (on every shard) that
        ``pattern`` matches, found with ``SCAN`` over their offset keys:
        fires with a list; fails when a shard is away."""
        glob = redis_pattern(self.prefix, pattern)[:-len(":ev")] + ":offset"
        start, end = len(self.prefix) + 2, -len("}:offset")
        match = re.compile(fnmatch.translate(pattern)).match
        found: list[str] = []

        def step(reply, shard):
            cursor, keys = reply
            for key in keys:
                name = untag((key.decode() if isinstance(key, bytes) else key)[start:end])
                if match(name):
                    found.append(name)
            if int(cursor):
                return shard.run(SCAN, [], [cursor, glob, 1000]).addCallback(step, shard)
            return None
        return defer.gatherResults([shard.run(SCAN, [], [0, glob, 1000]).addCallback(step, shard)
                                    for shard in self.shards], consumeErrors=True).addCallback(lambda _: found)

    def _read_failed(self, failure, f: _Follow) -> None:
        if self.following.get(f.name) is not f:
            return
        self.log.warn("pub/sub: could not read channel {channel} from Redis ({error}); using local state",
                      channel=f.name, error=failure.getErrorMessage())
        self._failed(f)

    def _failed(self, f: _Follow) -> None:
        """Joining ``f`` failed: its subscribers go on with local state, and
        it is joined again in a while if its shard is still up (else when
        the shard comes back)."""
        f.state, f.held = "away", None
        self._release(f)
        self.reactor.callLater(self.retry_delay, self._retry, f)

    def _retry(self, f: _Follow) -> None:
        if self.following.get(f.name) is f and f.state == "away" and f.shard.connected:
            self._join(f)

    def _release(self, f: _Follow) -> None:
        waiters, f.waiters = f.waiters, []
        for d in waiters:
            d.callback(None)

    # -- events ------------------------------------------------------------------------------------

    def resubscribed(self, shard, channels) -> None:
        """``shard`` (a Redis Cluster) subscribed ``channels`` again, after a
        node came back or a slot moved: read what may have been missed."""
        channels = set(channels)
        for f in list(self.following.values()):
            if f.shard is shard and f.state == "live" and self.events_channel(f.name) in channels:
                self._read(f, [])

    def pushed(self, shard: Shard, channel, payload) -> None:
        """An event (or a presence notice) from Redis: deliver it here."""
        try:
            e = _loads(payload)
            if "k" in e:
                self.broker.notify(presence_notice(e["c"], e["k"], e["p"], int(e["n"])))
                return
            ev = _event(e)
        except (ValueError, KeyError, TypeError):
            self.log.warn("pub/sub: bad event from Redis: {raw!r}", raw=bytes(payload[:200]))
            return
        if self._m is not None:
            self._m.inc()
        f = self.following.get(ev.channel)
        if f is None:
            self.broker.receive(ev)         # for pattern subscribers only
        elif f.state == "live":
            self._take(f, ev)
        elif f.held is not None:
            f.held.append(ev)

    def _take(self, f: _Follow, ev: Event) -> None:
        if not self.broker.receive(ev):
            # not the next one: read the channel again (replay or gap), holding what follows
            self._read(f, [ev])


def _fire(_, d: defer.Deferred) -> None:
    d.callback(None)


def _loads(raw: bytes):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)      # what orjson refuses (integers past 64 bits)


def _event(e: dict) -> Event:
    return Event(e["c"], int(e["o"]), e["e"], e["d"], float(e["t"]), gap=bool(e.get("g")))
