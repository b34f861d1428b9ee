"""``[pubsub] backend = redis``: channels shared by every node through Redis.

Per channel, Redis holds (keys under ``[pubsub] prefix``)::

    PREFIX:ch:NAME:epoch     the channel's epoch (set once, by whoever comes first)
    PREFIX:ch:NAME:offset    INCR'd for every event: the shared offset
    PREFIX:ch:NAME:history   a list of the last history_size events (JSON)

A publish on any node runs one Lua script: assign the next offset, append
the event to the history (trimmed), and PUBLISH it on ``PREFIX:events``.
Every node — the publishing one included — delivers what arrives on that
Redis channel to its local subscribers, so each subscriber sees every event
once and in offset order.  The keys expire when a channel has had no event
for ``history_age`` plus a day; a channel that comes back then gets a new
epoch (its resuming clients are told ``recovered: false``, as the contract
says).

Resuming: a node that has not followed a channel from its start asks Redis
for its epoch, offset and history before it answers a subscribe
(:meth:`RedisBridge.sync`), so a client that reconnects to another node with
``since``/``epoch`` gets exactly what it missed.

Outage: when either Redis connection is lost, the node goes on alone —
publishes are delivered locally under a fresh local epoch (so no offset
assigned meanwhile can pass for a shared one), ``/health`` says
``degraded`` with ``pubsub.connected: false``, and the ClientServices
reconnect with back-off.  Once both connections are back, sharing resumes;
events published elsewhere during the outage are not replayed, and clients
resuming across the outage are told ``recovered: false``.
"""

from __future__ import annotations

import json

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from msgd.core.jsonrpc import dumps
from msgd.core.pubsub import Event, new_epoch, presence_notice

PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local epoch = redis.call('GET', KEYS[1])
local offset = redis.call('INCR', KEYS[2])
local ev = '{"c":' .. ARGV[2] .. ',"o":' .. offset .. ',"e":"' .. epoch .. '","t":' .. ARGV[4] .. ',"d":' .. ARGV[3] .. '}'
local size = tonumber(ARGV[5])
if size > 0 then
  redis.call('RPUSH', KEYS[3], ev)
  redis.call('LTRIM', KEYS[3], -size, -1)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[7], ev)
return offset
"""

SYNC = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]) or '0', redis.call('LRANGE', KEYS[3], 0, -1)}
"""


class _Command(txredisapi.RedisProtocol):
    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.bridge.lost("command", why)


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.bridge.message(message)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.bridge.lost("subscriber", why)


class _Factory(Factory):
    """Builds txredisapi protocols outside txredisapi's own pools (whose
    methods the protocols call)."""

    isLazy = False

    class _NoQueue:
        def put(self, conn):
            pass

    def __init__(self, bridge, protocol, password, db):
        self.bridge, self.protocol, self.password, self.db = bridge, protocol, password, db
        self.connectionQueue = self._NoQueue()

    def buildProtocol(self, addr):
        p = self.protocol(password=self.password or None, dbid=self.db or None, convertNumbers=False)
        p.factory = self
        return p

    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.bridge.error = str(why)


class RedisBridge(MultiService):
    """Shares ``broker``'s channels through Redis (see the module docstring)."""

    log = Logger()

    def __init__(self, broker, config, reactor, metrics=None, retry_policy=None):
        super().__init__()
        self.setName("pubsub:redis")
        self.broker = broker
        self.config = config
        self.reactor = reactor
        self.events_channel = f"{config.prefix}:events"
        self.ttl = int(config.history_age) + 86400
        self.command = self.subscriber = None
        self.connected = False
        self.error: str | None = "not connected yet"
        self._synced: dict = {}
        policy = retry_policy or backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        endpoint = clientFromString(reactor, config.redis[0])
        for kind, protocol in (("command", _Command), ("subscriber", _Subscriber)):
            svc = ClientService(endpoint, _Factory(self, protocol, config.redis_password, config.redis_db),
                                retryPolicy=policy, clock=reactor,
                                prepareConnection=lambda p, kind=kind: self._ready(kind, p))
            svc.setServiceParent(self)
        self._m = None
        if metrics is not None:
            self._m = metrics.gauge("msgd_pubsub_redis_connected", "1 when channels are shared through Redis")
            self._m.set_function(lambda: 1 if self.connected else 0)
        broker.backend = self

    # -- connection state ------------------------------------------------------------

    @defer.inlineCallbacks
    def _ready(self, kind: str, proto):
        yield proto.whenConnected()
        if kind == "subscriber":
            yield proto.subscribe(self.events_channel)
        setattr(self, kind, proto)
        if self.command is not None and self.subscriber is not None and not self.connected:
            self.connected = True
            self.error = None
            self._synced.clear()
            self.log.info("pub/sub: sharing channels through Redis at {endpoint}", endpoint=self.config.redis[0])

    def lost(self, kind: str, why) -> None:
        if getattr(self, kind) is None:
            return
        setattr(self, kind, None)
        if self.connected:
            self.connected = False
            self.error = f"{kind} connection lost: {why.getErrorMessage()}"
            self._synced.clear()
            self.broker.unshare()
            if not self.running:
                return          # we are stopping: nothing to report
            self.log.error("pub/sub: Redis connection lost ({error}); delivering on this node only until it returns",
                           error=self.error)

    def describe(self) -> dict:
        return {"backend": "redis", "endpoint": self.config.redis[0], "connected": self.connected, "error": self.error}

    # -- what the broker calls ---------------------------------------------------------

    def _keys(self, name: str) -> list[str]:
        base = f"{self.config.prefix}:ch:{name}"
        return [f"{base}:epoch", f"{base}:offset", f"{base}:history"]

    def publish(self, name: str, data) -> defer.Deferred:
        """Fires with the shared offset; delivery comes through :meth:`message`."""
        size, _ = self.broker._limits(name)
        return self.command.eval(PUBLISH, self._keys(name), [
            new_epoch(), json.dumps(name), dumps(data), repr(self.reactor.seconds()), size, self.ttl,
            self.events_channel]).addCallback(int)

    def synced(self, name: str) -> bool:
        ch = self.broker.channels.get(name)
        if ch is not None and self._synced.get(name) is ch:
            return True
        self._synced.pop(name, None)     # the channel was collected (or never synced)
        return False

    def unsync(self, name: str) -> None:
        self._synced.pop(name, None)

    def sync(self, name: str) -> defer.Deferred:
        """Take the channel's shared epoch, offset and history from Redis."""
        def got(reply):
            epoch, offset, history = reply
            events = [_event(json.loads(raw)) for raw in history]
            self._synced[name] = self.broker.adopt(name, epoch, int(offset), events)

        def failed(f):
            self.log.warn("pub/sub: could not read channel {channel} from Redis ({error}); using local state",
                          channel=name, error=f.getErrorMessage())
        return self.command.eval(SYNC, self._keys(name), [new_epoch(), self.ttl]).addCallbacks(got, failed)

    # -- what cluster-wide presence (msgd.cluster.presence) uses -------------------------

    def presence_keys(self, name: str) -> list[str]:
        base = f"{self.config.prefix}:ch:{name}"
        return [f"{base}:presence", f"{base}:presence:exp"]

    def channel_connected(self, name: str) -> bool:
        return self.connected

    def evalsha(self, name: str, script: str, keys: list, args: list) -> defer.Deferred:
        if self.command is None:
            return defer.fail(txredisapi.ConnectionError("not connected to Redis"))
        return self.command.eval(script, keys, args)     # EVALSHA once the connection has loaded it

    def announce(self, name: str, action: str, principal, count: int) -> defer.Deferred:
        """Tell every node's subscribers of ``name`` that ``count``
        subscriptions of ``principal`` joined or left (an ``rpc.join`` /
        ``rpc.leave`` notice, not an event)."""
        if self.command is None:
            return defer.fail(txredisapi.ConnectionError("not connected to Redis"))
        return self.command.publish(self.events_channel, json.dumps({"c": name, "k": action, "p": principal,
                                                                     "n": count}))

    def message(self, raw) -> None:
        """An event (or a presence notice) from ``PREFIX:events``: deliver it here."""
        try:
            e = json.loads(raw)
            if "k" in e:
                self.broker.notify(presence_notice(e["c"], e["k"], e["p"], int(e["n"])))
                return
            self.broker.receive(e["c"], int(e["o"]), e["e"], e["d"], float(e["t"]))
        except Exception:
            self.log.failure("pub/sub: bad event from Redis: {raw!r}", raw=str(raw)[:200])


def _event(e: dict) -> Event:
    return Event(e["c"], int(e["o"]), e["e"], e["d"], float(e["t"]))
