"""The dispatcher: every interface turns its input into
``dispatcher.call(request, target, args, kwargs)`` and renders what comes back.

It resolves ``module.function``, checks the arguments against the signature
(and against simple type hints), runs the function — plainly, as a coroutine,
or in the thread pool when marked blocking — with the request as the current
one, cancels the work when the deadline passes, and maps every exception to
the taxonomy of :mod:`msgd.core.errors`.
"""

from __future__ import annotations

import contextvars
import inspect
import types
import typing
import weakref
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgd.core import errors, typehints
from msgd.core.metrics import CallStats
from msgd.core.request import Request, current

BLOCKING_ATTR = "__msgd_blocking__"


def is_blocking(fn: Callable) -> bool:
    return bool(getattr(fn, BLOCKING_ATTR, False))


_SIMPLE = (int, float, str, bool, list, dict, bytes, tuple)


def _simple_types(hint) -> tuple | None:
    """The plain classes a value of type ``hint`` may be, or None when the
    hint is not one we check (Any, dataclasses, TypeVars, ...)."""
    if hint is type(None):
        return (type(None),)
    if hint in _SIMPLE:
        return (int, float) if hint is float else (hint,)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(hint):
            t = _simple_types(arg)
            if t is None:
                return None
            out.extend(t)
        return tuple(out)
    if origin in _SIMPLE:
        return (origin,)
    return None


class _Signature:
    """How to check arguments against a function's signature.  Calls with
    positional arguments only, to a function with plain parameters, take a
    fast path that does not build a BoundArguments."""

    __slots__ = ("sig", "checks", "positional", "required", "by_index", "coercions")

    def __init__(self, fn: Callable):
        self.sig = inspect.signature(fn)
        self.checks = {}
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        params = list(self.sig.parameters.values())
        for param in params:
            if param.name in hints and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                allowed = _simple_types(hints[param.name])
                if allowed is not None:
                    self.checks[param.name] = allowed
        plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        self.positional = len(params) if plain else None
        self.required = sum(1 for p in params if p.default is p.empty)
        self.by_index = [(i, p.name, self.checks[p.name]) for i, p in enumerate(params) if p.name in self.checks]
        # parameters whose decoded JSON/XML value must be built into what the hint says
        # (a dataclass or TypedDict from an object, Decimal, date)
        try:
            model = typehints.signature(fn)
        except Exception:
            model = None
        self.coercions = {f.name: f.type for f in model.params if _builds(f.type)} if model else {}

    def check(self, target: str, args, kwargs) -> tuple:
        """The arguments, checked (and built, see ``coercions``); raises
        InvalidParams."""
        if not kwargs and not self.coercions and self.positional is not None \
                and self.required <= len(args) <= self.positional:
            for i, name, allowed in self.by_index:
                if i < len(args):
                    value = _check_type(target, name, allowed, args[i])
                    if value is not args[i]:
                        args = [*args[:i], value, *args[i + 1:]]
            return args, kwargs
        try:
            bound = self.sig.bind(*args, **kwargs)
        except TypeError as e:
            raise errors.InvalidParams(f"invalid params for {target}: {e}") from None
        changed = bool(self.coercions)
        for name, t in self.coercions.items():
            if name in bound.arguments:
                bound.arguments[name] = typehints.coerce(bound.arguments[name], t, f"{target}: {name}")
        for name, allowed in self.checks.items():
            if name in bound.arguments:
                value = _check_type(target, name, allowed, bound.arguments[name])
                if value is not bound.arguments[name]:
                    bound.arguments[name], changed = value, True
        return (bound.args, bound.kwargs) if changed else (args, kwargs)


def _builds(t) -> bool:
    return t.kind in ("struct", "decimal", "date") or (t.kind == "list" and _builds(t.item))


def _check_type(target: str, name: str, allowed: tuple, value):
    """``value`` if it is of an ``allowed`` type; a list or tuple where the
    other is wanted (PB carries tuples, JSON only lists) as the one wanted;
    else InvalidParams."""
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    if type(value) in (list, tuple):
        for sequence in (list, tuple):
            if sequence in allowed:
                return sequence(value)
    want = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))
    raise errors.InvalidParams(f"invalid params for {target}: {name} must be {want}, not {type(value).__name__}")


class Dispatcher:
    """Runs app calls.

    ``run_blocking(fn, *args, **kwargs) -> Deferred`` runs a blocking
    function off the reactor (the node passes ``deferToThreadPool`` bound to
    its pool).  ``authorize(request, target)`` raises
    ``errors.Unauthorized`` to refuse a call (the default allows all).
    """

    log = Logger()

    def __init__(self, apps, clock, run_blocking: Callable[..., Deferred], metrics=None,
                 authorize: Callable[[Request, str], None] | None = None):
        self.apps = apps
        self.clock = clock
        self.run_blocking = run_blocking
        self.authorize = authorize
        self._signatures: "weakref.WeakKeyDictionary[Callable, _Signature]" = weakref.WeakKeyDictionary()
        self.in_flight = 0
        self._drained: list[Deferred] = []
        self._in_flight_gauge: typing.Any = None      # a prometheus Gauge when metrics are on
        self._in_flight_children: dict = {}     # interface -> gauge child, looked up once
        self.stats = None
        if metrics is not None:
            self.stats = CallStats()            # msgd_requests_total, msgd_request_duration_seconds
            metrics.register(self.stats)
            self._in_flight_gauge = metrics.gauge("msgd_requests_in_flight", "App calls running now", ["interface"])

    def signature(self, fn: Callable) -> _Signature:
        sig = self._signatures.get(fn)
        if sig is None:
            sig = self._signatures[fn] = _Signature(fn)
        return sig

    def call(self, request: Request, target: str, args=(), kwargs=None) -> Deferred:
        """Run ``target`` for ``request``; the Deferred fires with the result
        or fails with a :class:`errors.MsgdError`.  Cancelling it cancels the
        work (the caller went away)."""
        try:
            result = self.run(request, target, args, kwargs)
        except errors.MsgdError as e:
            return defer.fail(e)
        return result if isinstance(result, Deferred) else defer.succeed(result)

    def run(self, request: Request, target: str, args=(), kwargs=None):
        """Like :meth:`call`, but what is known at once is answered at once: a
        plain function's result is returned as is and an error is raised (a
        :class:`errors.MsgdError`); only work still going returns a Deferred.
        Transports use this to answer synchronous calls without Deferreds."""
        kwargs = kwargs or {}
        request.target = target
        started = self.clock.seconds()
        label = target
        try:
            if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                raise errors.InvalidParams("params must be an array or an object")
            if self.authorize is not None:
                self.authorize(request, target)
            fn = self.apps.resolve(target)
            args, kwargs = self.signature(fn).check(target, args, kwargs)
            if request.expired():
                raise errors.Timeout(f"deadline passed before {target} started")
        except errors.MsgdError as e:
            if isinstance(e, (errors.NotFound, errors.Unauthorized)):
                label = "unknown"
            self._count(request, label, e.name, started)
            raise

        ctx = contextvars.copy_context()
        ctx.run(current.set, request)
        if is_blocking(fn):
            d = self.run_blocking(ctx.run, fn, *args, **kwargs)
        else:
            try:
                result = ctx.run(fn, *args, **kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException:   # an app may raise anything, even SystemExit
                error = self._map_failure(request, target, Failure()).value
                if not isinstance(error, errors.MsgdError):    # e.g. CancelledError raised by the app
                    error = errors.InternalError(f"internal error (request {request.id})")
                self._count(request, label, error.name, started)
                raise error from None
            if inspect.iscoroutine(result):
                d = ctx.run(Deferred.fromCoroutine, result)
            elif isinstance(result, Deferred):
                d = result
            else:
                self._count(request, label, "ok", started)
                return result

        remaining = request.remaining()
        if remaining is not None and not d.called:
            def on_timeout(result, timeout):
                request.cancelled = True
                return Failure(errors.Timeout(f"{target} did not finish within its deadline"))
            d.addTimeout(remaining, self.clock, onTimeoutCancel=on_timeout)
        self._enter(request)

        def done(result):
            self._leave(request)
            if isinstance(result, Failure):
                result = self._map_failure(request, target, result)
                self._count(request, label, result.value.name if result.check(errors.MsgdError) else "cancelled",
                            started)
            else:
                self._count(request, label, "ok", started)
            return result
        d.addBoth(done)
        return d

    def _map_failure(self, request: Request, target: str, failure: Failure) -> Failure:
        if failure.check(errors.MsgdError):
            return failure
        if failure.check(CancelledError):
            return failure           # the caller cancelled (went away); nobody reads this
        self.log.failure("internal error in {target} (request {request_id})", failure,
                         target=target, request_id=request.id, interface=request.interface)
        return Failure(errors.InternalError(f"internal error (request {request.id})"))

    # -- accounting ----------------------------------------------------------

    def _gauge(self, interface: str):
        child = self._in_flight_children.get(interface)
        if child is None:
            child = self._in_flight_children[interface] = self._in_flight_gauge.labels(interface)
        return child

    def _count(self, request: Request, target: str, outcome: str, started: float) -> None:
        if self.stats is not None:
            self.stats.record(request.interface, target, outcome, self.clock.seconds() - started)

    def _enter(self, request: Request) -> None:
        self.in_flight += 1
        if self._in_flight_gauge is not None:
            self._gauge(request.interface).inc()

    def _leave(self, request: Request) -> None:
        self.in_flight -= 1
        if self._in_flight_gauge is not None:
            self._gauge(request.interface).dec()
        if self.in_flight == 0:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def drained(self) -> Deferred:
        """Fires when no call is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

