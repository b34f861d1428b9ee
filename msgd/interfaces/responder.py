"""How an HTTP mount answers a call, once for every mount: ``/rpc``
(JSON-RPC), ``/RPC2`` (XML-RPC) and ``/soap/`` (SOAP).

A mount decodes the request, starts the work (usually ``dispatcher.run``)
and hands the outcome to :func:`respond` with two renderers of its own
protocol: ``answer(result)`` and ``fault(error)``, each returning an
:class:`Answer`.  The responder does the rest, the same way everywhere:

* a result that is ready at once (a plain function) is answered at once,
  without a Deferred;
* a Deferred is answered when it fires; when the client goes away first the
  Deferred is **cancelled** (cancellation reaches whatever the app waits on)
  and nothing is written or logged;
* a failure that is a taxonomy error (:class:`~msgd.core.errors.MsgdError`)
  goes to ``fault`` as it is; any other is logged with its traceback (the
  mount's ``event`` and fields) and goes to ``fault`` as ``internal error
  (request ID)``;
* the answer is written with its status, content type and length, and the
  request finished.

A mount that answers calls is a ``CallResource`` (the interface's
requests and log, ``respond``); a JSON body of any other answer is
``json_reply``.  See docs/architecture.rst.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from msgd.core import errors
from msgd.core.jsonrpc import dumps


class Answer(NamedTuple):
    """What is written: the HTTP status, the content type (None: none) and
    the body (None: no body, e.g. 204)."""

    status: int
    content_type: bytes | None
    body: bytes | None


def respond(request, outcome: Any, answer: Callable[[Any], Answer], fault: Callable[[errors.MsgdError], Answer],
            *, log, event: str, request_id: str | None = None, **fields) -> int:
    """Answer the twisted.web ``request`` with ``outcome``: a result, a
    Deferred of one, or a :class:`~twisted.python.failure.Failure` (an error found before any work
    started, e.g. while decoding).  Returns ``NOT_DONE_YET`` for ``render``."""
    if isinstance(outcome, Deferred):
        gone: list[bool] = []

        def lost(_):
            gone.append(True)
            outcome.cancel()
        request.notifyFinish().addErrback(lost)

        def done(result):
            if not gone:
                write(request, answer(result))

        def failed(failure):
            if not gone:
                write(request, fault(_error(failure, log, event, request_id, fields)))
        outcome.addCallbacks(done, failed)
        return NOT_DONE_YET
    if isinstance(outcome, Failure):
        write(request, fault(_error(outcome, log, event, request_id, fields)))
    else:
        write(request, answer(outcome))
    return NOT_DONE_YET


def _error(failure: Failure, log, event: str, request_id: str | None, fields: dict) -> errors.MsgdError:
    """The taxonomy error a failure is answered with; one that is not a
    taxonomy error is a bug: logged with its traceback, answered without it."""
    if isinstance(failure.value, errors.MsgdError):
        return failure.value
    log.failure(event, failure, request_id=request_id, **fields)
    return errors.InternalError("internal error" + (f" (request {request_id})" if request_id else ""))


def write(request, a: Answer) -> None:
    """Write ``a`` and finish ``request``."""
    if a.status != 200:
        request.setResponseCode(a.status)
    if a.content_type is not None:
        request.setHeader(b"content-type", a.content_type)
    if a.body is not None:
        request.setHeader(b"content-length", b"%d" % len(a.body))
        request.write(a.body)
    request.finish()


def json_reply(request, status: int, obj, pretty: bool = False) -> bytes:
    """``obj`` (bytes: JSON already) as the JSON body of ``render``'s
    answer, with ``status`` and ``Cache-Control: no-store``; ``pretty``
    (indented, a last newline) for what people read (``/health``, ``/admin``)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if isinstance(obj, bytes):
        return obj
    return json.dumps(obj, indent=1).encode() + b"\n" if pretty else dumps(obj)


class CallResource(resource.Resource):
    """Base of the mounts that answer calls (``/rpc``, ``/RPC2``,
    ``/soap/``): it uses the interface's ``name``, ``options``,
    ``new_request()``, ``log`` and ``services``, nothing else."""

    isLeaf = True

    def __init__(self, interface):
        super().__init__()
        self.interface = interface
        self.services = interface.services

    def new_request(self, request):
        """A request of the interface (its deadline) for the principal the
        guard found for the HTTP ``request``."""
        return self.interface.new_request(getattr(request, "principal", None))

    def respond(self, request, outcome, answer, fault, event: str, **fields) -> int:
        """:func:`respond`, logging with the interface's log."""
        return respond(request, outcome, answer, fault, log=self.interface.log, event=event, **fields)
