"""The node: one MultiService that owns everything a config describes.

Children are built from the config and kept by section name in
``node.interfaces`` and ``node.adapters``, so a reconfiguration can add,
remove or restart them by name.  Stopping drains: listeners stop accepting,
in-flight calls get ``[node] drain_timeout`` to finish, then connections are
closed and adapters and the thread pool stop.
"""

from __future__ import annotations

import dataclasses
import os
import time

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from msgd import registry, services
from msgd.config import Config, ConfigError, load
from msgd.core.apps import AppRegistry
from msgd.core.dispatch import Dispatcher
from msgd.core.errors import NotFound
from msgd.core.metrics import Metrics
from msgd.core.pubsub import Broker
from msgd.core.request import Request
from msgd.security import Access


def _by_name(components) -> dict:
    return {c.name: c for c in components}


class NodeService(MultiService):
    """``reactor`` is passed in (only ``msgd.tap`` uses the global one).

    The node provides :class:`msgd.services.Services` (reactor, metrics,
    dispatcher, pubsub, access, apps, run_blocking, new_request, settings,
    adapter, peer, received, health) to the interfaces and adapters it
    builds — ``cls(name, options, self)``: they take it as their services and
    never reach further into the node — and to app code as ``api.services()``.

    ``run_blocking(fn, *args, **kwargs) -> Deferred`` runs blocking work off
    the reactor thread: by default in the node's thread pool
    (``deferToThreadPool``); a node on a ``task.Clock`` (which has no
    threads) is given one that runs the work inline or queues it."""

    log = Logger()

    def __init__(self, config: Config, reactor, run_blocking=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.name_ = config.node.name
        self.metrics = Metrics()
        self.threadpool = ThreadPool(minthreads=0, maxthreads=config.node.threads, name=f"msgd-{self.name_}")
        if run_blocking is not None:
            self.run_blocking = run_blocking  # type: ignore[method-assign]   # injected (tests run work at once)
        self.apps = AppRegistry(config.node.apps, reactor, interval=config.node.reload_interval,
                                metrics=self.metrics)
        self.dispatcher = Dispatcher(self.apps, reactor, self.run_blocking, metrics=self.metrics)
        # [access:*] rules and per-principal rates; built before the interfaces, whose guards it consults
        self.access = Access(self.metrics, config.access,
                             guard_of=lambda name: getattr(self.interfaces.get(name), "guard", None))
        self.dispatcher.authorize = self.access.authorize
        self.interfaces: dict = {}
        self.adapters: dict = {}
        self.peers: dict = {}
        self.pubsub = Broker(reactor, config.pubsub.history_size, config.pubsub.history_age,
                             overrides=[(p, c.history_size, c.history_age) for p, c in config.channels],
                             presence_events=[(p, c.presence_events) for p, c in config.channels
                                              if c.presence_events is not None],
                             metrics=self.metrics, history_memory=config.pubsub.history_memory)
        self.started_at = None
        self._apps_loaded = False
        self._ready: tuple | None = None     # (the start-up outcome or its Deferred, who waits for it)
        self.reconfigured: list = [lambda new: self.access.update(new.access)]   # listener(config) after each reconfiguration
        self.logs = None                 # the msgd.logging.LogSetup, when twistd runs the node
        self.last_reload: dict | None = None
        self._reconfiguring = defer.DeferredLock()
        self._reloads = self.metrics.counter("msgd_config_reloads_total",
                                             "Reconfigurations (SIGHUP, admin) by outcome", ["outcome"])
        # the ids of handled peer messages (PB interfaces use it): made before the interfaces
        from msgd.cluster.outbox import Received
        self.received = Received(os.path.join(config.node.state_dir, "received.sqlite"), reactor, self.run_blocking,
                                 retention=config.node.dedup_retention)
        for comp in config.interfaces:
            self._add(self.interfaces, "interface", registry.INTERFACES, comp)
        for comp in config.adapters:
            self._add(self.adapters, "adapter", registry.ADAPTERS, comp)
        self._build_cluster(config)

    def _build_cluster(self, config: Config) -> None:
        """Peers, the outbox of async messages and the Redis pub/sub bridge
        (msgd/cluster)."""
        from msgd.cluster.outbox import Outbox
        state = config.node.state_dir
        n = config.node
        self.outbox = self.pubsub_bridge = self.presence = None
        if config.peers:
            self.outbox = Outbox(os.path.join(state, "outbox.sqlite"), self.reactor, self.run_blocking,
                                 self.peers, metrics=self.metrics, base_delay=n.outbox_retry_min,
                                 max_delay=n.outbox_retry_max, window=n.outbox_window)
            for name, peer_config in config.peers:
                self.peers[name] = self._new_peer(name, peer_config)
                self.peers[name].setServiceParent(self)
        if config.pubsub.backend == "redis":
            from msgd.cluster.redis_pubsub import RedisBridge
            shards = None
            if config.pubsub.cluster:
                from msgd.cluster.rediscluster import RedisCluster
                p = config.pubsub

                def shards(bridge, latency):
                    return [RedisCluster(bridge, "cluster", p.redis, p.redis_password, self.reactor, None, latency)]
            self.pubsub_bridge = RedisBridge(self.pubsub, config.pubsub, self.reactor, metrics=self.metrics,
                                             shards=shards)
            self.pubsub_bridge.setServiceParent(self)
            from msgd.cluster.presence import RedisPresence
            # added after the bridge, so stopped before it: it removes this node's entries on the way out
            self.presence = RedisPresence(self.pubsub, self.pubsub_bridge, self.reactor, self.name_,
                                          ttl=config.pubsub.presence_ttl)
            self.presence.setServiceParent(self)

    def _add(self, table: dict, kind: str, types: dict, comp):
        cls = registry.load(types, comp.type)
        svc = cls(comp.name, comp.options, self)
        svc.type_name = comp.type
        svc.setServiceParent(self)
        table[comp.name] = svc
        return svc

    # -- start ---------------------------------------------------------------

    def load_apps(self) -> None:
        """Load the app modules and check every handler target of the config
        (raises ConfigError).  Called by tap before anything listens."""
        if not self._apps_loaded:
            self.apps.scan()
            self._apps_loaded = True
        self.config.check_targets(self.apps.exists)

    def privilegedStartService(self):
        os.makedirs(self.config.node.state_dir, exist_ok=True)
        self.load_apps()
        super().privilegedStartService()

    def startService(self):
        self.started_at = self.reactor.seconds()
        self.threadpool.start()
        if self.outbox is not None:
            self.outbox.start().addErrback(lambda f: self.log.failure("outbox could not start", f))
        self.load_apps()
        self.apps.start()
        self.pubsub.start()
        super().startService()
        self.log.info("node {node} started: {interfaces} interface(s), {modules} app module(s)",
                      node=self.name_, interfaces=len(self.interfaces), modules=len(self.apps.modules))

    def ready(self) -> defer.Deferred:
        """Fires when every interface accepts work and every adapter that
        has a ``ready`` Deferred is connected; fails if one cannot.  Each
        call gets its own Deferred with the same outcome (the parts' own
        Deferreds are waited on once: a second wait on them would see the
        failure already consumed by the first, and report success)."""
        if self._ready is None:
            waits = [i.ready for i in self.interfaces.values()]
            waits += [a.ready for a in self.adapters.values()
                      if isinstance(getattr(a, "ready", None), defer.Deferred)]
            self._ready = (defer.gatherResults(waits, consumeErrors=True), [])
            self._ready[0].addBoth(self._ready_outcome)
        outcome, waiting = self._ready
        d: defer.Deferred = defer.Deferred()
        if isinstance(outcome, defer.Deferred):
            waiting.append(d)
        else:
            _fire(d, outcome)
        return d

    def _ready_outcome(self, outcome):
        assert self._ready is not None
        waiting = self._ready[1]
        self._ready = (outcome, [])
        for d in waiting:
            _fire(d, outcome)
        return None     # every waiter has the outcome

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        listening = sum(1 for i in self.interfaces.values() if i.describe().get("listening"))
        return (f"{listening} listener(s), {len(self.interfaces)} interface(s), {len(self.adapters)} adapter(s), "
                f"{len(self.apps.modules)} app module(s), {self.dispatcher.in_flight} call(s) in flight")

    # -- reconfigure -----------------------------------------------------------

    # [node] keys that only a restart can change; a reload keeps their old values
    RESTART_KEYS = ("name", "apps", "state_dir")

    def reload(self) -> defer.Deferred:
        """Re-read the node's ini file and apply it (SIGHUP, ``/admin/reload``)."""
        try:
            config = load(self.config.path)
        except ConfigError as e:
            self._reload_failed(e)
            return defer.fail(e)
        return self.reconfigure(config)

    def reconfigure(self, new: Config) -> defer.Deferred:
        """Apply ``new`` without a restart.  It is validated whole first (a
        bad config changes nothing and fails with ConfigError); then only the
        interfaces and adapters whose sections changed are removed, added or
        restarted, by name, so untouched listeners keep their connections.
        If a new listener cannot start, the previous set is put back.
        Reconfigurations run one at a time."""
        return self._reconfiguring.run(self._reconfigure, new)

    @defer.inlineCallbacks
    def _reconfigure(self, new: Config):
        old = self.config
        try:
            new.check_targets(self.apps.exists)
            kept = {k: getattr(old.node, k) for k in self.RESTART_KEYS if getattr(old.node, k) != getattr(new.node, k)}
            for key in kept:
                self.log.warn("[node] {key} changes only at restart; keeping {value!r}", key=key, value=kept[key])
            if (new.pubsub, new.channels) != (old.pubsub, old.channels):
                self.log.warn("[pubsub] and [channel:*] changes take effect at restart")
            peers = new.peers
            if self.outbox is None and new.peers:
                self.log.warn("the first [peer:*] of a node takes effect at restart")
                peers = old.peers
            new = dataclasses.replace(new, node=dataclasses.replace(new.node, **kept), pubsub=old.pubsub,
                                      channels=old.channels, peers=peers)
            plans = [self._plan(self.interfaces, _by_name(old.interfaces), _by_name(new.interfaces),
                                self._component_builder(registry.INTERFACES)),
                     self._plan(self.adapters, _by_name(old.adapters), _by_name(new.adapters),
                                self._component_builder(registry.ADAPTERS)),
                     self._plan(self.peers, dict(old.peers), dict(new.peers), self._new_peer)]
        except Exception as e:
            self._reload_failed(e)
            raise
        begun = []
        try:
            for plan in plans:
                begun.append(plan)
                yield self._swap(plan["table"], plan["stop"], plan["start"])
        except Exception as e:
            self.log.error("reconfiguration failed, restoring the previous interfaces and adapters: {error}",
                           error=e)
            for plan in reversed(begun):
                restore = [(name, plan["build"](name, spec)) for name, spec in plan["restore"]]
                yield self._swap(plan["table"], plan["start"], restore)
            self._reload_failed(e)
            raise
        self.config = new
        self._apply_node(old.node, new.node)
        changes = {k: sorted(set().union(*(p[k] for p in plans))) for k in ("added", "removed", "restarted")}
        self._reloads.labels("ok").inc()
        self.last_reload = dict(at=time.time(), ok=True, error=None, **changes)
        self.log.info("configuration reloaded: added {added}, removed {removed}, restarted {restarted}", **changes)
        for listener in self.reconfigured:
            listener(new)
        return changes

    def _plan(self, table: dict, before: dict, after: dict, build) -> dict:
        """What to stop and what to build for one kind of section, by name
        (sections compare by value); every new service is built, and so
        checked, before anything stops.  ``build(name, spec) -> service``."""
        changed = [n for n in after if n in before and after[n] != before[n]]
        removed = [n for n in before if n not in after]
        added = [n for n in after if n not in before]
        return {"table": table, "build": build, "added": added, "removed": removed, "restarted": changed,
                "stop": [(n, table[n]) for n in removed + changed],
                "start": [(n, build(n, after[n])) for n in added + changed],
                "restore": [(n, before[n]) for n in removed + changed]}

    def _component_builder(self, types: dict):
        def build(name, comp):
            svc = registry.load(types, comp.type)(name, comp.options, self)
            svc.type_name = comp.type
            return svc
        return build

    def _new_peer(self, name, peer_config):
        from msgd.cluster.peers import Peer
        peer = Peer(name, peer_config, self.reactor, self.outbox)
        peer.listeners.append(self.outbox.kick)
        return peer

    @defer.inlineCallbacks
    def _swap(self, table: dict, stop: list, start: list):
        """Stop the services ``stop`` (closing their connections), then start
        ``start`` in their places and wait until they are ready; both are
        ``[(name, service)]``."""
        for name, svc in stop:
            if table.get(name) is svc:
                del table[name]
            if svc.parent is self:
                yield defer.maybeDeferred(svc.disownServiceParent)
        for name, svc in start:
            table[name] = svc
            svc.setServiceParent(self)    # starts it: a listener listens now
            ready = getattr(svc, "ready", None)
            if isinstance(ready, defer.Deferred):
                yield ready

    def _apply_node(self, old, new) -> None:
        self.received.retention = new.dedup_retention
        if self.outbox is not None:     # from the next delivery on; retries already planned keep their times
            self.outbox.base_delay, self.outbox.max_delay = new.outbox_retry_min, new.outbox_retry_max
            self.outbox.window = new.outbox_window
        if new.threads != old.threads:
            self.threadpool.adjustPoolsize(maxthreads=new.threads)
        if new.reload_interval != old.reload_interval and self.running:
            self.apps.stop()
            self.apps.interval = new.reload_interval
            self.apps.start()

    def _reload_failed(self, error: Exception) -> None:
        self._reloads.labels("failed").inc()
        self.last_reload = {"at": time.time(), "ok": False, "error": str(error)}
        self.log.error("configuration not reloaded, nothing changed: {error}", error=error)

    # -- stop ----------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        self.log.info("node {node} stopping: draining {n} in-flight call(s)", node=self.name_,
                      n=self.dispatcher.in_flight)
        yield defer.gatherResults([defer.maybeDeferred(i.stop_accepting) for i in self.interfaces.values()],
                                  consumeErrors=True).addErrback(self._log_stop_error)
        drained = self.dispatcher.drained()
        drained.addTimeout(self.config.node.drain_timeout, self.reactor)
        try:
            yield drained
        except defer.TimeoutError:
            self.log.warn("drain timeout ({timeout}s) passed with {n} call(s) still running",
                          timeout=self.config.node.drain_timeout, n=self.dispatcher.in_flight)
        # interfaces (connections), then adapters and peers: reverse of start order
        yield super().stopService()
        self.apps.stop()
        self.pubsub.stop()
        if self.outbox is not None:
            yield self.outbox.stop()
        yield self.received.close()
        if self.threadpool.started:
            self.threadpool.stop()   # waits for blocking calls still running past the drain
        self.log.info("node {node} stopped", node=self.name_)

    def _log_stop_error(self, f):
        self.log.failure("error while stopping", f)

    # -- what interfaces and app code use ------------------------------------

    def run_blocking(self, fn, *args, **kwargs) -> defer.Deferred:
        """Run ``fn`` in the node's thread pool (unless another runner was passed in)."""
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args, **kwargs)

    def new_request(self, interface: str, timeout: float | None = None, principal=None, **kw) -> Request:
        if timeout is None:
            timeout = self.config.node.request_timeout
        return Request(interface=interface, clock=self.reactor, deadline=self.reactor.seconds() + timeout,
                       principal=principal, services=self, **kw)

    def adapter(self, name: str):
        try:
            return self.adapters[name]
        except KeyError:
            raise NotFound(f"no adapter named {name!r}") from None

    def peer(self, name: str):
        try:
            return self.peers[name].proxy
        except KeyError:
            raise NotFound(f"no peer named {name!r}") from None

    @property
    def settings(self):
        """The ``[node]`` section in force (a reload replaces it)."""
        return self.config.node

    def issue_token(self, interface: str, name: str, roles=(), ttl: float | None = None) -> dict:
        """A login token of the interface named ``interface`` (its guard signs it)."""
        return services.issue_token(self.interfaces, interface, name, roles, ttl)

    def health(self) -> dict:
        up = self.reactor.seconds() - self.started_at if self.started_at is not None else 0.0
        errors = self.apps.errors()
        return {
            "node": self.name_,
            "status": "ok" if not errors and (self.pubsub_bridge is None or self.pubsub_bridge.connected)
                      else "degraded",
            "uptime": round(up, 3),
            "in_flight": self.dispatcher.in_flight,
            "interfaces": {n: i.describe() for n, i in self.interfaces.items()},
            "adapters": {n: a.describe() for n, a in self.adapters.items()},
            "peers": {n: p.describe() for n, p in self.peers.items()},
            "outbox": self.outbox.describe() if self.outbox is not None else {},
            "pubsub": dict(self.pubsub_bridge.describe(), presence=self.presence.describe())
                      if self.pubsub_bridge is not None and self.presence is not None else {"backend": "memory"},
            "modules": {n: {"version": m.version, "file": m.path, "exports": sorted(m.exports)}
                        for n, m in self.apps.modules.items()},
            "load_errors": errors,
        }


def _fire(d: defer.Deferred, outcome) -> None:
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)
