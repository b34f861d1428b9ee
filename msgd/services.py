"""The services a node offers its parts: one explicit interface.

A component (an interface, a mount of the HTTP Site, a PB perspective, a
peer) takes what it uses from a :class:`Services` rather than reaching
through the node into other components.  Two things provide it:

* :class:`msgd.node.NodeService`, the real node: its reactor, thread pool,
  dispatcher, broker and ``[access:*]`` rules;
* :class:`msgd.testing.AppHarness`, the public fake for app authors: a
  ``task.Clock``, blocking work run inline, a dispatcher over an apps
  directory, a broker that records what is published, no access rules.

So a component built on a ``Services`` runs on the harness in a unit test,
with Twisted's in-memory fakes and no listening socket (see
``tests/test_responder.py``, where ``/RPC2`` and ``/soap`` answer in-memory
requests on an :class:`~msgd.testing.AppHarness`).

The node's configuration is data, not a service: a component reads the keys
it needs from its own section (its ``options``) and the ``[node]`` defaults it
inherits (``request_timeout``, ``state_dir``) at construction.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from msgd.core.request import Request


@runtime_checkable
class Services(Protocol):
    """What a part of the node may use.

    ``reactor``
        The clock (``callLater``, ``seconds``) and, on a real node, the
        reactor listeners and clients use; a ``task.Clock`` in tests.
    ``metrics``
        The node's :class:`~msgd.core.metrics.Metrics` registry.
    ``dispatcher``
        The :class:`~msgd.core.dispatch.Dispatcher`: ``run``/``call`` an app
        target for a request.
    ``pubsub``
        The broker: ``publish(channel, data, principal)``, and on a node the
        :class:`~msgd.core.pubsub.Broker` that Sessions subscribe through.
    ``access``
        The ``[access:*]`` rules: ``authorize``, ``authorize_channel``,
        ``allows``, ``check_visible`` (:class:`msgd.security.Access`).
    ``apps``
        The :class:`~msgd.core.apps.AppRegistry`: modules, ``resolve``,
        ``targets``.
    ``run_blocking(fn, *args, **kwargs) -> Deferred``
        Runs blocking work off the reactor thread (the node's thread pool).
    ``new_request(interface, timeout=None, principal=None, **kw) -> Request``
        A request of ``interface`` with a deadline ``timeout`` seconds away
        (default: the node's ``request_timeout``).
    ``settings``
        The ``[node]`` section in force (``name``, ``request_timeout``,
        ``state_dir``, ...): read it when needed, a reload replaces it.
    ``adapter(name)``
        The ``[adapter:NAME]`` (``NotFound`` when there is none).
    ``health() -> dict``
        What ``/health`` and the status page show.
    """

    reactor: Any
    metrics: Any
    dispatcher: Any
    pubsub: Any
    access: Any
    apps: Any
    run_blocking: Callable[..., Deferred]

    def new_request(self, interface: str, timeout: float | None = None, principal: Any = None,
                    **kw: Any) -> Request: ...

    @property
    def settings(self) -> Any: ...

    def adapter(self, name: str) -> Any: ...

    def health(self) -> dict: ...


@runtime_checkable
class Control(Protocol):
    """The node's own controls, which only the operator's endpoints use
    (``/admin``, the status page: ``msgd.interfaces.admin``).  The node
    (:class:`msgd.node.NodeService`) provides them; a test passes a fake.

    ``reload() -> Deferred``
        Re-reads node.ini and applies it (as SIGHUP does); fires with what
        changed, fails when nothing was changed.
    ``logs``
        The ``msgd.logging.LogSetup`` (``levels()``, ``set_level``), or
        None when the process running the node manages logging.
    ``last_reload``
        How the last reload went (``{"at", "ok", "error", ...}``), or None.
    """

    logs: Any
    last_reload: dict | None

    def reload(self) -> Deferred: ...
