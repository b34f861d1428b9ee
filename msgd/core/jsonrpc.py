"""JSON-RPC 2.0, transport-free: bytes in, bytes (or nothing) out.

Used by HTTP ``/rpc``, WebSocket ``/ws`` and any other stream that carries
JSON-RPC.  App calls go to the dispatcher; methods under the reserved
``rpc.`` prefix go to *builtins* that the transport supplies (``rpc.subscribe``
needs a connection, so HTTP offers only ``rpc.publish``).

Answers follow the specification exactly: parse errors and invalid requests
answer with ``"id": null``; notifications are never answered, not even with
an error; a batch answers with an array of the answers to its calls, in order,
or with nothing when it held only notifications; an empty batch is one
invalid-request error.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any, Callable, Protocol

import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgd.core import errors
from msgd.core.request import Request

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _stdlib_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return _default(obj)


def dumps(obj: Any) -> bytes:
    """JSON bytes; orjson, falling back to the stdlib for what orjson refuses
    (integers past 64 bits)."""
    try:
        return orjson.dumps(obj, default=_default, option=_OPTS)
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=_stdlib_default, separators=(",", ":"), ensure_ascii=False).encode()


def kept(data: bytes) -> bytes:
    """A copy of ``dumps``' bytes for keeping (a queue, a cache): orjson 3.12+
    returns bytes whose buffer keeps its initial capacity (4 KB, and more for
    larger documents), whatever their length; the copy is exactly as long as
    it needs to be (about 0.2 us for a small document)."""
    return bytes(memoryview(data))


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ParseError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise errors.ParseError(f"parse error: {e}") from None


def error_response(err: errors.MsgdError, id: Any = None) -> dict:
    return {"jsonrpc": "2.0", "error": err.to_dict(), "id": id}


def _valid_id(msg: dict) -> bool:
    id = msg["id"]
    return id is None or (isinstance(id, (str, int, float)) and not isinstance(id, bool))


Builtin = Callable[[Request, Any], Any]   # (request, params) -> value | Deferred


class Builtins(Protocol):
    """The ``rpc.*`` methods a transport supplies: a dict, or an object with
    ``get`` (a connection, without a per-connection table)."""

    def get(self, method: str, default=None, /) -> Any: ...


class JSONRPC:
    """Answers JSON-RPC messages.

    ``make_request()`` returns a fresh :class:`~msgd.core.request.Request` for each call in a
    message (so each call of a batch has its own id but the transport's
    interface, principal and default deadline).
    """

    log = Logger()

    def __init__(self, dispatcher, max_batch: int = 100):
        self.dispatcher = dispatcher
        self.max_batch = max_batch

    def handle(self, data: bytes | str, make_request: Callable[[], Request],
               builtins: Builtins | None = None) -> Deferred:
        """Fires with the answer's bytes, or None when nothing is to be sent."""
        answer = self.answer(data, make_request, builtins)
        return answer if isinstance(answer, Deferred) else defer.succeed(answer)

    def answer(self, data: bytes | str, make_request: Callable[[], Request],
               builtins: Builtins | None = None):
        """Like :meth:`handle`, but an answer that is ready at once (every
        call in the message was synchronous) is returned as bytes (or None)
        instead of a Deferred: the fast path of transports."""
        try:
            msg = loads(data)
        except errors.ParseError as e:
            return dumps(error_response(e))
        answer = self._message(msg, make_request, builtins)
        if isinstance(answer, Deferred):
            return answer.addCallback(lambda a: None if a is None else self.encode(a))
        return None if answer is None else self.encode(answer)

    def encode(self, answer: Any) -> bytes:
        try:
            return dumps(answer)
        except (TypeError, ValueError) as e:
            self.log.error("cannot encode a JSON-RPC answer: {error}", error=str(e))
            if isinstance(answer, list):
                return dumps([self._encodable(a) for a in answer])
            return dumps(self._encodable(answer))

    def _encodable(self, answer: dict) -> dict:
        try:
            dumps(answer)
            return answer
        except (TypeError, ValueError) as e:
            return error_response(errors.InternalError(f"result is not JSON serializable: {e}"), answer.get("id"))

    def handle_message(self, msg: Any, make_request, builtins=None) -> Deferred:
        """Fires with the answer object (dict or list), or None."""
        answer = self._message(msg, make_request, builtins)
        return answer if isinstance(answer, Deferred) else defer.succeed(answer)

    def _message(self, msg: Any, make_request, builtins):
        """The answer object (dict, list or None), or a Deferred of it."""
        if isinstance(msg, list):
            if not msg:
                return error_response(errors.InvalidRequest("invalid request: empty batch"))
            if len(msg) > self.max_batch:
                return error_response(errors.TooLarge(
                    f"batch of {len(msg)} calls is larger than the limit of {self.max_batch}"))
            answers = [self._one(m, make_request, builtins) for m in msg]
            if any(isinstance(a, Deferred) for a in answers):
                d = defer.gatherResults([a if isinstance(a, Deferred) else defer.succeed(a) for a in answers],
                                        consumeErrors=True)
                return d.addCallback(lambda done: [a for a in done if a is not None] or None)
            return [a for a in answers if a is not None] or None
        return self._one(msg, make_request, builtins)

    def _one(self, msg: Any, make_request, builtins):
        if not isinstance(msg, dict):
            return error_response(errors.InvalidRequest("invalid request: not an object"))
        id_ok = "id" not in msg or _valid_id(msg)
        reply_id = msg.get("id") if id_ok else None
        problem = None
        if msg.get("jsonrpc") != "2.0":
            problem = 'invalid request: "jsonrpc" must be "2.0"'
        elif not isinstance(msg.get("method"), str):
            problem = 'invalid request: "method" must be a string'
        elif "params" in msg and not isinstance(msg["params"], (list, dict)):
            problem = 'invalid request: "params" must be an array or an object'
        elif not id_ok:
            problem = 'invalid request: "id" must be a string, a number or null'
        if problem is not None:
            return error_response(errors.InvalidRequest(problem), reply_id)
        notification = "id" not in msg
        method = msg["method"]
        params = msg.get("params", [])
        request = make_request()

        def ok(result):
            return None if notification else {"jsonrpc": "2.0", "result": result, "id": reply_id}

        def failed(f: Failure):
            if notification or f.check(defer.CancelledError):
                return None     # nobody to answer: a notification, or the caller went away
            if f.check(errors.MsgdError):
                return error_response(f.value, reply_id)
            self.log.failure("unexpected failure answering {method}", f, method=method)
            return error_response(errors.InternalError(f"internal error (request {request.id})"), reply_id)

        try:
            if method.startswith("rpc."):
                result = self._builtin(method, request, params, builtins)
            elif isinstance(params, list):
                result = self.dispatcher.run(request, method, params, {})
            else:
                result = self.dispatcher.run(request, method, (), params)
        except Exception:
            return failed(Failure())
        if isinstance(result, Deferred):
            return result.addCallbacks(ok, failed)
        return ok(result)

    def _builtin(self, method: str, request: Request, params: Any, builtins):
        fn = (builtins or {}).get(method)
        if fn is None:
            raise errors.NotFound(f"method not found: {method}")
        request.target = method
        return fn(request, params)


def param(params: Any, name: str, position: int, kind=None, required: bool = True, default: Any = None):
    """Read a builtin's parameter given by name (object) or position (array)."""
    if isinstance(params, dict):
        present = name in params
        value = params.get(name)
    else:
        present = position < len(params)
        value = params[position] if present else None
    if not present:
        if required:
            raise errors.InvalidParams(f"missing parameter {name!r}")
        return default
    if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind in (int, (int, float)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise errors.InvalidParams(f"parameter {name!r} must be {names}")
    return value
