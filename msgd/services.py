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
inherits (``request_timeout``, ``state_dir``) from ``settings``, when it needs
them (a reload replaces the section).

Every part the node builds from a section — an interface, an adapter, the
LDAP credential checker (given ``adapter``) — takes this object, never the
node: ``cls(name, options, services)``.  A part that needs something the
node has and this interface lacks gets it added here (and to the
:class:`~msgd.testing.AppHarness`), not by reaching through the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from msgd.core.errors import NotFound
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
        The broker: ``publish(channel, data)``, and on a node the
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
    ``peer(name)``
        The proxy of ``[peer:NAME]`` that app code calls and sends to
        (``NotFound`` when there is none).
    ``received``
        The store of the ids of peer messages handled here
        (``msgd.cluster.outbox.Received``): a PB interface answers a
        message delivered again as a duplicate.
    ``health() -> dict``
        What ``/health`` and the status page show.
    ``issue_token(interface, name, roles=(), ttl=None) -> dict``
        A signed login token that the interface named ``interface`` accepts
        (``NotFound`` when it takes no tokens): what ``msgd.api.issue_token``
        gives app code.
    """

    reactor: Any
    metrics: Any
    dispatcher: Any
    pubsub: Any
    access: Any
    apps: Any
    run_blocking: Callable[..., Deferred]
    received: Any

    def new_request(self, interface: str, timeout: float | None = None, principal: Any = None,
                    **kw: Any) -> Request: ...

    @property
    def settings(self) -> Any: ...

    def adapter(self, name: str) -> Any: ...

    def peer(self, name: str) -> Any: ...

    def health(self) -> dict: ...

    def issue_token(self, interface: str, name: str, roles: Any = (), ttl: float | None = None) -> dict: ...


def issue_token(interfaces: Mapping[str, Any], interface: str, name: str, roles: Any = (),
                ttl: float | None = None) -> dict:
    """``Services.issue_token`` of a node or harness whose interfaces by name
    are ``interfaces``: a login token that the guard of the interface named
    ``interface`` signs (``NotFound`` when there is no such guard)."""
    guard = getattr(interfaces.get(interface), "guard", None)
    if guard is None:
        raise NotFound(f"interface {interface!r} accepts no tokens")
    return guard.issue_token(name, roles, ttl)


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
