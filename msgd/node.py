"""The node: one MultiService that owns everything a config describes.

Children are built from the config and kept by section name in
``node.interfaces`` and ``node.adapters``, so a reconfiguration can add,
remove or restart them by name.  Stopping drains: listeners stop accepting,
in-flight calls get ``[node] drain_timeout`` to finish, then connections are
closed and adapters and the thread pool stop.
"""

from __future__ import annotations

import os
import time

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from msgd import registry
from msgd.config import Config
from msgd.core.apps import AppRegistry
from msgd.core.dispatch import Dispatcher
from msgd.core.errors import NotFound
from msgd.core.jsonrpc import JSONRPC
from msgd.core.metrics import Metrics
from msgd.core.pubsub import Broker
from msgd.core.request import Request


class NodeService(MultiService):
    """``reactor`` is passed in (only :mod:`msgd.tap` uses the global one)."""

    log = Logger()

    def __init__(self, config: Config, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.name_ = config.node.name
        self.metrics = Metrics()
        self.threadpool = ThreadPool(minthreads=0, maxthreads=config.node.threads, name=f"msgd-{self.name_}")
        self.apps = AppRegistry(config.node.apps, reactor, interval=config.node.reload_interval,
                                metrics=self.metrics)
        self.dispatcher = Dispatcher(self.apps, reactor, self.run_blocking, metrics=self.metrics)
        self.jsonrpc = JSONRPC(self.dispatcher)
        self.interfaces: dict = {}
        self.adapters: dict = {}
        self.peers: dict = {}
        self.pubsub = Broker(reactor, config.pubsub.history_size, config.pubsub.history_age,
                             overrides=[(p, c.history_size, c.history_age) for p, c in config.channels],
                             metrics=self.metrics)
        self.started_at = None
        self._apps_loaded = False
        for comp in config.interfaces:
            self._add(self.interfaces, "interface", registry.INTERFACES, comp)
        for comp in config.adapters:
            self._add(self.adapters, "adapter", registry.ADAPTERS, comp)

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
        self._wall_started = time.time()
        self.threadpool.start()
        self.load_apps()
        self.apps.start()
        self.pubsub.start()
        super().startService()
        self.log.info("node {node} started: {interfaces} interface(s), {modules} app module(s)",
                      node=self.name_, interfaces=len(self.interfaces), modules=len(self.apps.modules))

    def ready(self) -> defer.Deferred:
        """Fires when every interface accepts work; fails if one cannot."""
        return defer.gatherResults([i.ready for i in self.interfaces.values()], consumeErrors=True)

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
        if self.threadpool.started:
            self.threadpool.stop()   # waits for blocking calls still running past the drain
        self.log.info("node {node} stopped", node=self.name_)

    def _log_stop_error(self, f):
        self.log.failure("error while stopping", f)

    # -- what interfaces and app code use ------------------------------------

    def run_blocking(self, fn, *args, **kwargs) -> defer.Deferred:
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
            return self.peers[name]
        except KeyError:
            raise NotFound(f"no peer named {name!r}") from None

    def health(self) -> dict:
        up = self.reactor.seconds() - self.started_at if self.started_at is not None else 0.0
        errors = self.apps.errors()
        return {
            "node": self.name_,
            "status": "ok" if not errors else "degraded",
            "uptime": round(up, 3),
            "in_flight": self.dispatcher.in_flight,
            "interfaces": {n: i.describe() for n, i in self.interfaces.items()},
            "adapters": {n: a.describe() for n, a in self.adapters.items()},
            "modules": {n: {"version": m.version, "file": m.path, "exports": sorted(m.exports)}
                        for n, m in self.apps.modules.items()},
            "load_errors": errors,
        }

