"""What travels between nodes over Perspective Broker, shared by the PB
interface (:mod:`msgd.interfaces.pb`, the callee) and the peers
(:mod:`msgd.cluster.peers`, the caller): a taxonomy error as a PB error, and
back.

Errors are the core taxonomy: the remote failure's type is
``msgd.interfaces.pb.PBError`` (``WIRE_NAME``) and its value a JSON object
``{"code", "name", "message", "data"}``; :func:`rebuild` turns a failure
back into the :class:`~msgd.core.errors.MsgdError` subclass.
"""

from __future__ import annotations

import json

from twisted.python.failure import Failure
from twisted.spread import pb

from msgd.core import errors


class PBError(pb.Error):
    """A taxonomy error on the wire: ``str()`` is the JSON object
    ``{"code", "name", "message", "data"}`` that PB copies to the client.

    Its qualified name is part of the wire (PB sends it as the failure's
    type, clients compare it): it stays ``WIRE_NAME``, where the class
    was first defined and is still importable, whichever module defines it."""

    __module__ = "msgd.interfaces.pb"

    def __init__(self, error: errors.MsgdError):
        self.error = error
        super().__init__(json.dumps({"code": error.code, "name": error.name, "message": error.message,
                                     "data": error.data}, default=str))


WIRE_NAME = "msgd.interfaces.pb.PBError"


def rebuild(failure) -> errors.MsgdError:
    """The :class:`~msgd.core.errors.MsgdError` that a PB failure stands for.  Accepts the
    failure of a ``callRemote`` Deferred, or the :class:`twisted.spread.pb.RemoteError`
    that ``await``/``inlineCallbacks`` raise for it.  Other remote errors
    become ``internal_error``, a lost connection ``unavailable``."""
    if isinstance(failure, BaseException):
        failure = Failure(failure)
    if failure.check(pb.PBConnectionLost, ConnectionError, pb.DeadReferenceError):
        return errors.Unavailable(f"peer connection lost: {failure.getErrorMessage()}")
    value = failure.value
    if isinstance(value, PBError):
        return value.error
    if isinstance(value, errors.MsgdError):
        return value
    if isinstance(value, pb.RemoteError):
        is_ours, value = _text(value.remoteType) == WIRE_NAME, value.args[0]
    else:
        is_ours = bool(failure.check(PBError))
    if is_ours:
        try:
            e = json.loads(value)
            return errors.from_code(int(e["code"]), str(e["message"]), e.get("data"))
        except (ValueError, KeyError, TypeError):
            pass
    return errors.InternalError(f"remote error: {failure.getErrorMessage()}")


def _text(b) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)
