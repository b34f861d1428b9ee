"""``type = redis``: Redis through txredisapi, under the adapter rules.

::

    cache = api.adapter("cache")
    n = await cache.incr("hits")
    value = await cache.get("k")                       # reads are retried when safe
    await cache.execute("SET", "k", "v", "EX", 60)     # any command
    a, b = await cache.pipeline(lambda p: [p.set("a", 1), p.get("a")])
    await cache.multi(lambda t: [t.incr("a"), t.incr("b")], watch=["a"])   # MULTI/EXEC
    sub = cache.subscribe(["news"], lambda channel, message: ...)          # reconnects by itself
    await sub.ready; ...; sub.stop()

Each pooled connection is one txredisapi protocol made through the ``url``'s
endpoint; the adapter's pool (not txredisapi's) decides how many exist, so
the deadline, breaker and metrics see every command.  A connection whose
command was cancelled is closed, since its reply would otherwise answer the
next command.  Subscriptions hold their own connection in a
:class:`ClientService`, which reconnects and subscribes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.protocol import Factory

from msgd.adapters.base import Adapter, AdapterOptions, AdapterRejected, AdapterUnavailable
from msgd.config import Invalid, boolean, option, optional_path
from msgd.security.tls import client_tls, trust_root
from msgd.services import Services

# commands that change nothing: safe to retry
READS = frozenset("""get mget exists hget hgetall hmget hkeys hvals hlen hexists lrange llen lindex
smembers sismember scard srandmember zrange zrangebyscore zrevrange zscore zcard zrank ttl pttl
keys scan type strlen ping dbsize info""".split())
WRITES = frozenset("""set setex setnx mset getset delete incr incrby decr decrby expire persist
hset hmset hdel hincrby lpush rpush lpop rpop ltrim lrem sadd srem zadd zrem zincrby publish
append rename""".split())


def parse_url(value: str, ctx=None) -> str:
    """``redis://[:password@]host[:port][/db]``, ``rediss://`` (TLS) or
    ``unix:///path?db=N``; checked here, split by :func:`endpoint_of`."""
    v = value.strip()
    u = urlsplit(v)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise Invalid(f"{v!r} is not a Redis URL (redis://[:password@]host:port/db, rediss://…, unix:///path)")
    try:
        endpoint_of(v)
    except ValueError as e:
        raise Invalid(f"{v!r}: {e}") from None
    return v


def endpoint_of(url: str, timeout: float = 10.0) -> tuple[str, str | None, int]:
    """(client endpoint string, password, db) of a Redis URL."""
    u = urlsplit(url)
    password = unquote(u.password) if u.password else None
    if u.scheme == "unix":
        query = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p)
        return f"unix:path={u.path}:timeout={int(max(1, timeout))}", password, int(query.get("db", "0"))
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    db = int(u.path.strip("/") or 0)
    return f"tcp:host={host}:port={port}:timeout={int(max(1, timeout))}", password, db   # rediss: TLS on top


class _Protocol(txredisapi.RedisProtocol):
    """txredisapi's protocol, whose waiting commands fail with why the
    connection was lost (a refused certificate, say), not just that it was."""

    def connectionLost(self, why):
        while self.replyQueue.waiting:
            self.replyReceived(txredisapi.ConnectionError(f"lost connection: {why.getErrorMessage()}"))
        super().connectionLost(why)


class _ConnFactory(Factory):
    """Builds one txredisapi protocol and reports when it is ready (after
    AUTH and SELECT) or why not.  Stands in for txredisapi's own pool
    factory, whose methods the protocol calls."""

    isLazy = False

    class _NoQueue:
        def put(self, conn):
            pass

    def __init__(self, password, db, protocol=_Protocol):
        self.password, self.db, self.protocol = password, db, protocol
        self.ready = defer.Deferred()
        self.connectionQueue = self._NoQueue()

    def buildProtocol(self, addr):
        p = self.protocol(password=self.password, dbid=self.db or None)
        p.factory = self
        p.whenConnected().addCallback(lambda conn: self.ready.called or self.ready.callback(conn))
        return p

    def stopTrying(self):
        pass

    def connectionError(self, why):
        if not self.ready.called:
            self.ready.errback(ConnectionRefusedError(why))


class RedisAdapter(Adapter):
    @dataclass(frozen=True, kw_only=True)
    class Options(AdapterOptions):
        url: str = option("redis://127.0.0.1:6379/0", parse=parse_url,
                          doc="redis://[:password@]host:port/db, rediss:// for TLS, unix:///path?db=N")
        tls_verify: bool = option(True, parse=boolean, doc="verify the server certificate (rediss://)")
        ca_file: str | None = option(None, parse=optional_path,
                                     doc="CA certificates (PEM) to verify against (default: the system's)")

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.endpoint, self.password, self.db = endpoint_of(options.url, options.timeout)
        u = urlsplit(options.url)
        self.tls = (client_tls(u.hostname or "127.0.0.1", trust_root(options.ca_file), options.tls_verify)
                    if u.scheme == "rediss" else None)
        self.subscriptions: set = set()

    @defer.inlineCallbacks
    def connect(self):
        factory = _ConnFactory(self.password, self.db)
        proto = yield self.client_endpoint().connect(factory)
        try:
            conn = yield factory.ready
        except Exception:
            proto.transport.abortConnection()
            raise
        return conn

    def client_endpoint(self):
        endpoint = clientFromString(self.reactor, self.endpoint)
        return endpoint if self.tls is None else wrapClientTLS(self.tls, endpoint)

    def disconnect(self, conn):
        if conn.transport is not None:
            conn.transport.loseConnection()

    def classify(self, e):
        if isinstance(e, txredisapi.WatchError):
            return AdapterRejected(self.name, "watched key changed; transaction not applied", retryable=True)
        if isinstance(e, txredisapi.ResponseError):
            return AdapterRejected(self.name, f"redis error: {e}")
        if isinstance(e, txredisapi.ConnectionError):
            return AdapterUnavailable(self.name, f"redis connection: {e}", retryable=True)
        return super().classify(e)

    def stopService(self):
        stopped = defer.gatherResults([sub.stop() for sub in list(self.subscriptions)], consumeErrors=True)
        super().stopService()
        return stopped

    # -- commands ------------------------------------------------------------

    def execute(self, command: str, *args) -> defer.Deferred:
        """Any Redis command; retried when it is a read."""
        name = command.lower()
        return self.call(name, lambda conn: conn.execute_command(command, *args), safe=name in READS)

    def pipeline(self, build: Callable) -> defer.Deferred:
        """``build(p)`` queues commands on ``p``; fires with the list of
        replies, in order, sent in one write."""
        @defer.inlineCallbacks
        def run(conn):
            p = yield conn.pipeline()
            build(p)
            return (yield p.execute_pipeline())
        return self.call("pipeline", run)

    def multi(self, build: Callable, watch=()) -> defer.Deferred:
        """MULTI/EXEC: ``build(t)`` queues commands on ``t``; fires with the
        replies, or fails with a retryable rejection when a ``watch``ed key
        changed meanwhile."""
        @defer.inlineCallbacks
        def run(conn):
            t = yield conn.multi(list(watch) if watch else None)
            try:
                build(t)
            except BaseException:
                yield t.discard()
                raise
            return (yield t.commit())
        return self.call("multi", run)

    def subscribe(self, channels, callback: Callable[[str, object], None], patterns: bool = False) -> "Subscription":
        """Call ``callback(channel, message)`` for every message on
        ``channels`` (glob patterns with ``patterns=True``) until
        ``.stop()``; ``.ready`` fires once subscribed."""
        sub = Subscription(self, list(channels), callback, patterns)
        self.subscriptions.add(sub)
        sub.start()
        return sub


def _command(method: str, safe: bool):
    def run(self, *args, **kwargs):
        return self.call(method, lambda conn: getattr(conn, method)(*args, **kwargs), safe=safe)
    run.__name__ = method
    run.__doc__ = f"Redis {method.upper()} (txredisapi's signature){'; retried when safe' if safe else ''}."
    return run


for _m in READS | WRITES:
    setattr(RedisAdapter, _m, _command(_m, _m in READS))


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.subscription.deliver(channel, message)


class Subscription:
    """A reconnecting subscription; see :meth:`RedisAdapter.subscribe`."""

    def __init__(self, adapter: RedisAdapter, channels: list, callback, patterns: bool):
        self.adapter, self.channels, self.callback, self.patterns = adapter, channels, callback, patterns
        self.ready: defer.Deferred[Any] = defer.Deferred()
        factory = Factory()
        factory.buildProtocol = self._build   # type: ignore[method-assign]   # one protocol per connection, built here
        self.service = ClientService(adapter.client_endpoint(), factory,
                                     retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
                                     clock=adapter.reactor)

    def _build(self, addr):
        f = _ConnFactory(self.adapter.password, self.adapter.db, protocol=_Subscriber)
        f.subscription = self
        p = f.buildProtocol(addr)
        f.ready.addCallback(self._subscribe).addErrback(
            lambda fail: self.adapter.log.warn("adapter {adapter}: subscribe failed: {why}",
                                               adapter=self.adapter.name, why=fail.getErrorMessage()))
        return p

    @defer.inlineCallbacks
    def _subscribe(self, conn):
        if self.patterns:
            yield conn.psubscribe(self.channels)
        else:
            yield conn.subscribe(self.channels)
        if not self.ready.called:
            self.ready.callback(self)

    def start(self):
        self.service.startService()

    def deliver(self, channel, message):
        try:
            self.callback(channel, message)
        except Exception:
            self.adapter.log.failure("adapter {adapter}: subscriber callback failed", adapter=self.adapter.name)

    def stop(self) -> defer.Deferred:
        self.adapter.subscriptions.discard(self)
        if not self.ready.called:
            self.ready.errback(AdapterUnavailable(self.adapter.name, "subscription stopped", sent=False))
            self.ready.addErrback(lambda f: None)
        return self.service.stopService()


__all__ = ["RedisAdapter", "Subscription"]
