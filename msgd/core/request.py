"""A Request: one call of an app function, whatever protocol it came from.

The current request is kept in a :class:`contextvars.ContextVar`, so app code
reaches it through :func:`msgd.api.request` in plain functions, in ``async
def`` functions and in blocking functions run in the thread pool alike.
"""

from __future__ import annotations

import contextvars
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

current: contextvars.ContextVar["Request | None"] = contextvars.ContextVar("msgd_request", default=None)

_prefix = os.urandom(3).hex()
_counter = itertools.count(1)


def new_id() -> str:
    """A short id, unique within this process and unlikely to collide across
    nodes: 6 random hex digits fixed per process, then a counter."""
    return f"{_prefix}-{next(_counter):x}"


@dataclass(eq=False)
class Request:
    """One call.

    ``deadline`` is an absolute time on ``clock`` (``clock.seconds()``
    scale); ``None`` means no deadline.  ``services`` is what
    :mod:`msgd.api` uses to reach adapters, peers and pub/sub of the node
    that owns the request.
    """

    interface: str
    clock: IReactorTime
    deadline: float | None = None
    principal: Any = None
    target: str | None = None
    id: str = field(default_factory=new_id)
    services: Any = None
    meta: dict = field(default_factory=dict)
    cancelled: bool = False

    @classmethod
    def with_timeout(cls, interface: str, clock: IReactorTime, timeout: float | None, **kw) -> "Request":
        deadline = None if timeout is None else clock.seconds() + timeout
        return cls(interface=interface, clock=clock, deadline=deadline, **kw)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.clock.seconds())

    def expired(self) -> bool:
        return self.deadline is not None and self.clock.seconds() >= self.deadline

    def child(self, **changes) -> "Request":
        """A request for a nested call that shares this one's deadline."""
        values = dict(interface=self.interface, clock=self.clock, deadline=self.deadline,
                      principal=self.principal, services=self.services, meta=dict(self.meta))
        values.update(changes)
        return Request(**values)
