"""Public fakes for testing app modules without a running node.

::

    from twisted.trial import unittest
    from msgd.testing import AppHarness

    class OrdersTests(unittest.TestCase):
        def test_place(self):
            apps = AppHarness("apps")
            order = apps.result("orders.place", "book", 2)
            self.assertEqual(order["qty"], 2)

The harness loads the directory like a node does and calls through the same
dispatcher (argument checks, error taxonomy, deadlines on a
:class:`twisted.internet.task.Clock`).  Blocking functions run inline, in the
calling thread.  ``api.publish`` is recorded in ``harness.published``;
adapters and peers are whatever objects you put in ``harness.adapters`` /
``harness.peers``.

The harness provides :class:`msgd.services.Services`, as the node does
(``reactor`` is its clock, ``access`` has no rules, ``settings`` the
``[node]`` defaults with the harness's timeout and ``state_dir``, handled peer
message ids are kept in memory), so the parts of msgd built on those services
— an HTTP mount such as ``/RPC2``, an interface such as ``schedule``, an
adapter, the LDAP checker — run on it in tests too: ``cls(name, options,
harness)``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from msgd import services
from msgd.cluster.outbox import Received
from msgd.core.apps import AppRegistry
from msgd.core.dispatch import Dispatcher
from msgd.core.errors import NotFound
from msgd.core.metrics import Metrics
from msgd.config import NodeConfig
from msgd.core.request import Request
from msgd.security import Access


class RecordingPubSub:
    """Stands in for the node's broker: remembers what was published."""

    def __init__(self):
        self.published: list[tuple[str, Any]] = []

    def publish(self, channel: str, data: Any) -> defer.Deferred:
        return defer.succeed(self.publish_now(channel, data))

    def publish_now(self, channel: str, data: Any) -> int:
        """As the broker's: the offset at once (a Deferred only for a shared backend)."""
        self.published.append((channel, data))
        return len(self.published)


class AppHarness:
    def __init__(self, apps_dir: str, clock: Clock | None = None, timeout: float | None = 30.0,
                 principal: Any = None, interface: str = "test", state_dir: str = "state"):
        self.clock = self.reactor = clock if clock is not None else Clock()
        self.metrics = Metrics()
        self.apps = AppRegistry(apps_dir, self.clock, interval=0)
        self.apps.scan()
        self.dispatcher = Dispatcher(self.apps, self.clock, self.run_blocking)
        self.timeout = timeout
        self.principal = principal
        self.interface = interface
        self.pubsub = RecordingPubSub()
        self.interfaces: dict[str, Any] = {}     # none: no guard, no rate limits
        self.access = Access(self.metrics)       # no [access:*] rules: everything is allowed
        self.adapters: dict[str, Any] = {}
        self.peers: dict[str, Any] = {}
        self.state_dir = state_dir
        self.received = Received(":memory:", self.clock, self.run_blocking)

    @property
    def settings(self) -> NodeConfig:
        """The ``[node]`` defaults, with the harness's timeout and ``state_dir``."""
        return NodeConfig(name="harness", apps=self.apps.directory, request_timeout=self.timeout or 30.0,
                          state_dir=self.state_dir)

    def health(self) -> dict:
        return {"node": "harness", "status": "ok", "modules": sorted(self.apps.modules),
                "load_errors": self.apps.errors()}

    @property
    def published(self) -> list:
        return self.pubsub.published

    def run_blocking(self, fn, *args, **kwargs) -> defer.Deferred:
        """Blocking work runs inline, in the calling thread."""
        return defer.maybeDeferred(fn, *args, **kwargs)

    def new_request(self, interface: str | None = None, timeout: float | None = None, principal: Any = None,
                    **kw) -> Request:
        """A request as the node makes them for an interface (defaults: the
        harness's interface name, timeout and principal: a None ``principal``
        is the harness's; ``request(principal=None)`` is anonymous)."""
        if timeout is None:
            timeout = self.timeout
        values = dict(interface=interface or self.interface,
                      deadline=None if timeout is None else self.clock.seconds() + timeout, **kw)
        if principal is not None:
            values["principal"] = principal
        return self.request(**values)

    # what msgd.api reaches through request().services
    def issue_token(self, interface: str, name: str, roles=(), ttl: float | None = None) -> dict:
        """A login token of the interface named ``interface`` (its guard signs it)."""
        return services.issue_token(self.interfaces, interface, name, roles, ttl)

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

    def request(self, **kw) -> Request:
        """A request of the harness (its interface, clock, principal and a
        deadline its timeout away); ``kw`` sets any of its fields."""
        deadline = None if self.timeout is None else self.clock.seconds() + self.timeout
        values = dict(interface=self.interface, clock=self.clock, deadline=deadline,
                      principal=self.principal, services=self)
        values.update(kw)
        return Request(**values)

    def call(self, target: str, *args, **kwargs) -> defer.Deferred:
        """Call ``target``; a Deferred, as the node would answer."""
        return self.dispatcher.call(self.request(), target, args, kwargs)

    def result(self, target: str, *args, **kwargs) -> Any:
        """Call ``target`` and return its result now; raises its error, or
        AssertionError if it has not finished (advance ``clock`` first)."""
        outcome: list[Any] = []
        self.call(target, *args, **kwargs).addBoth(outcome.append)
        if not outcome:
            raise AssertionError(f"{target} has not finished; advance harness.clock")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]
