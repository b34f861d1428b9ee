"""What application modules import.

::

    from msgd import api

    @api.blocking
    def report(day: str) -> dict:       # runs in the node's thread pool
        ...

    async def place(item: str, qty: int = 1) -> dict:
        req = api.request()              # id, interface, principal, deadline
        if qty < 1:
            raise api.AppError("qty must be positive", code=-32010)
        ...

Everything here works the same in plain, ``async def`` and blocking
functions, because the current request travels in a contextvar.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from msgd.core import errors
from msgd.core.dispatch import BLOCKING_ATTR
from msgd.core.request import Request, current
from msgd.core.transaction import Transaction, TransactionFailed

AppError = errors.ApplicationError
Unauthorized = errors.Unauthorized
InvalidParams = errors.InvalidParams
NotFound = errors.NotFound
Timeout = errors.Timeout
Unavailable = errors.Unavailable
MsgdError = errors.MsgdError

__all__ = [
    "request", "blocking", "adapter", "peer", "publish", "call", "services", "sleep", "transaction", "issue_token",
    "AppError", "Unauthorized", "InvalidParams", "NotFound", "Timeout", "Unavailable", "MsgdError",
    "TransactionFailed",
]


def request() -> Request:
    """The request being served.  Raises RuntimeError outside a request."""
    req = current.get()
    if req is None:
        raise RuntimeError("msgd.api.request() called outside a request")
    return req


def blocking(fn: Callable) -> Callable:
    """Mark ``fn`` as blocking: the node runs it in its thread pool, never on
    the reactor.  It may check ``api.request().cancelled`` to stop early
    once its deadline has passed."""
    setattr(fn, BLOCKING_ATTR, True)
    return fn


def services():
    """The node serving the current request."""
    return request().services


def adapter(name: str):
    """The adapter declared as ``[adapter:NAME]``."""
    return services().adapter(name)


def transaction() -> Transaction:
    """A :class:`~msgd.core.transaction.Transaction`: add adapter calls with
    ``.add(name, fn, *args)``, then ``await .execute()`` runs them in
    parallel and gives all results by name, or fails as a whole naming the
    participant that failed, within the request's deadline.  Not a
    two-phase commit: what succeeded is not undone (see docs/adapters.rst)."""
    req = current.get()
    if req is None:
        return Transaction()
    return Transaction(req.clock, req.deadline, req.id)


def peer(name: str):
    """The peer node declared as ``[peer:NAME]``:
    ``peer("b").module.function(*args)`` or ``peer("b").call("module.function",
    *args)`` call it within this request's remaining deadline (a Deferred;
    ``Unavailable`` at once when it is not connected), and
    ``peer("b").send("module.function", *args)`` queues a durable async
    message (fires with its id once it is on disk);
    ``peer("b").send_with_id(message_id, "module.function", *args)`` does so
    under the caller's id, so that sending it again is harmless.  See
    docs/cluster.rst."""
    return services().peer(name)


def publish(channel: str, data: Any) -> Deferred:
    """Publish ``data`` on ``channel``; fires with the event's offset."""
    node = services()
    if node.pubsub is None:
        raise errors.Unavailable("this node has no pub/sub broker")
    return node.pubsub.publish(channel, data)


def call(target: str, *args, **kwargs) -> Deferred:
    """Call another app function as part of this request (same deadline,
    same principal)."""
    req = request()
    # internal: the [access:*] rules and rate limits checked the outer call already
    return req.services.dispatcher.call(req.child(meta=dict(req.meta, internal=True)), target, args, kwargs)


def issue_token(name: str | None = None, roles=(), ttl: float | None = None, interface: str | None = None) -> dict:
    """A signed token ``{"token", "expires"}`` that the interface named
    ``interface`` (default: the current request's) accepts as a login, e.g.
    for a browser's WebSocket.  ``name`` defaults to the current principal
    (with its roles); an app that checked a login its own way passes the
    name and roles it vouches for."""
    req = request()
    if name is None:
        p = req.principal
        if p is None:
            raise errors.Unauthorized("no principal to issue a token for")
        name, roles = p.name, getattr(p, "roles", ())
    return req.services.issue_token(interface or req.interface, name, roles, ttl)


def sleep(seconds: float) -> Deferred:
    """A Deferred that fires after ``seconds`` on the node's clock; cancelled
    with the request when its deadline passes."""
    from twisted.internet.task import deferLater
    return deferLater(request().clock, seconds, lambda: None)
