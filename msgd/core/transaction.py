"""Transactions across adapters, in the spirit of Pythomnic's.

::

    t = api.transaction()
    t.add("user", api.adapter("directory").get, dn)
    t.add("hits", api.adapter("cache").incr, "hits:" + uid)
    t.add("row", api.adapter("db").execute, "INSERT INTO visits (uid) VALUES (?)", (uid,))
    results = await t.execute()      # {"user": …, "hits": …, "row": 1}

The participants start together and run in parallel; ``execute`` fires with
all their results (by name, in the order added) or fails as a whole with
:class:`TransactionFailed` naming the first participant that failed, whose
error's code it keeps.  The others still running are then cancelled.  The
whole is bounded by the request's deadline (each adapter call inherits it
too).

This is **not** a two-phase commit: a participant that already succeeded
is not undone when another fails.  Make participants idempotent, or
compensate in the app (e.g. delete the row written when the mail failed).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgd.core import errors


class TransactionFailed(errors.MsgdError):
    """A participant failed: ``participant`` names it, ``cause`` is its
    error; code, name and ``retryable`` are the cause's."""

    def __init__(self, participant: str, cause: BaseException):
        self.participant, self.cause = participant, cause
        known = cause if isinstance(cause, errors.MsgdError) else None
        self.name = known.name if known is not None else errors.InternalError.name
        self.retryable = bool(getattr(cause, "retryable", False))
        data = {"participant": participant}
        if known is not None and isinstance(known.data, dict):
            data.update(known.data)
        text = known.message if known is not None else errors.InternalError.default_message
        super().__init__(f"transaction failed at {participant}: {text}", data,
                         known.code if known is not None else errors.InternalError.code)


class Transaction:
    """See the module docstring.  ``clock``/``deadline`` come from the
    request (no deadline outside one)."""

    log = Logger()

    def __init__(self, clock=None, deadline: float | None = None, request_id: str | None = None):
        self.clock, self.deadline, self.request_id = clock, deadline, request_id
        self.participants: list[tuple[str, Callable, tuple, dict]] = []

    def add(self, name: str, fn: Callable[..., Any], *args, **kwargs) -> "Transaction":
        """Add participant ``name``: ``fn(*args, **kwargs)`` (a value, a
        Deferred or a coroutine), started by :meth:`execute`."""
        if any(n == name for n, *_ in self.participants):
            raise ValueError(f"participant {name!r} added twice")
        self.participants.append((name, fn, args, kwargs))
        return self

    def execute(self) -> Deferred:
        if not self.participants:
            return defer.succeed({})
        names = [n for n, *_ in self.participants]
        running: dict[str, Deferred] = {}
        results: dict[str, Any] = {}

        def cancel_all(_: Deferred) -> None:
            for d in list(running.values()):
                d.cancel()

        outcome: Deferred[dict[str, Any]] = Deferred(cancel_all)

        def done(result, name):
            running.pop(name, None)
            if outcome.called:
                return None
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    return None
                if not result.check(errors.MsgdError):
                    self.log.failure("transaction participant {participant} failed (request {request_id})",
                                     result, participant=name, request_id=self.request_id)
                for d in list(running.values()):
                    d.cancel()
                outcome.errback(TransactionFailed(name, result.value))
            else:
                results[name] = result
                if len(results) == len(names):
                    outcome.callback({n: results[n] for n in names})
            return None

        for name, fn, args, kwargs in self.participants:
            running[name] = defer.ensureDeferred(_start(fn, args, kwargs))
        for name in names:
            if name in running:
                running[name].addBoth(done, name)
        if self.deadline is not None and not outcome.called:
            def timed_out(result, timeout):
                pending = [n for n in names if n not in results]
                return Failure(TransactionFailed(pending[0] if pending else names[0], errors.Timeout(
                    f"deadline passed with {', '.join(pending)} still running")))
            outcome.addTimeout(max(0.0, self.deadline - self.clock.seconds()), self.clock, onTimeoutCancel=timed_out)
        return outcome


async def _start(fn, args, kwargs):
    result = fn(*args, **kwargs)
    if isinstance(result, Deferred) or hasattr(result, "__await__"):
        return await result
    return result
