"""The error taxonomy every interface renders in its own form.

Each error has a stable numeric ``code`` (the JSON-RPC code; XML-RPC faults,
SOAP faults and STOMP ERROR frames carry the same number) and a stable
``name``.  Interfaces never invent their own errors for app failures: they map
one of these.

=========================  ======  =============================================
name                       code    meaning
=========================  ======  =============================================
``parse_error``            -32700  the request could not be decoded
``invalid_request``        -32600  decoded, but not a valid request
``not_found``              -32601  no such target (module.function)
``invalid_params``         -32602  arguments do not fit the function signature
``internal_error``         -32603  a bug; the traceback is logged, never sent
``application_error``      -32000  raised by app code (codes -32000..-32099,
                                   or any code outside the reserved range)
``unauthorized``           -32001  the caller may not do this
``timeout``                -32002  the request's deadline passed; work cancelled
``unavailable``            -32003  an external system or peer is down
``too_large``              -32004  a body, frame or queue bound was exceeded
``overloaded``             -32005  a rate or connection limit was hit
=========================  ======  =============================================
"""

from __future__ import annotations

from typing import Any


class MsgdError(Exception):
    """Base of the taxonomy.  ``code``, ``name`` and ``message`` are sent to
    the client; ``data`` too when it is not None (it must be serialisable)."""

    code = -32603
    name = "internal_error"
    default_message = "internal error"

    def __init__(self, message: str | None = None, data: Any = None, code: int | None = None):
        self.message = message if message is not None else self.default_message
        self.data = data
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def to_dict(self) -> dict:
        """The JSON-RPC ``error`` member."""
        err = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r})"


class ParseError(MsgdError):
    code = -32700
    name = "parse_error"
    default_message = "parse error"


class InvalidRequest(MsgdError):
    code = -32600
    name = "invalid_request"
    default_message = "invalid request"


class NotFound(MsgdError):
    code = -32601
    name = "not_found"
    default_message = "method not found"


class InvalidParams(MsgdError):
    code = -32602
    name = "invalid_params"
    default_message = "invalid params"


class InternalError(MsgdError):
    code = -32603
    name = "internal_error"
    default_message = "internal error"


class ApplicationError(MsgdError):
    """Raised by app code to answer with an error of its own.

    ``code`` defaults to -32000; an app may pick any code in -32000..-32099 or
    outside the reserved range -32768..-32000."""

    code = -32000
    name = "application_error"
    default_message = "application error"

    def __init__(self, message: str | None = None, data: Any = None, code: int | None = None):
        if code is not None and not isinstance(code, int):
            raise TypeError("ApplicationError code must be an int")
        if code is not None and -32768 <= code < -32099:
            raise ValueError(f"code {code} is reserved by JSON-RPC; use -32000..-32099 or a code outside -32768..-32000")
        super().__init__(message, data, code)


class Unauthorized(MsgdError):
    code = -32001
    name = "unauthorized"
    default_message = "unauthorized"


class Timeout(MsgdError):
    code = -32002
    name = "timeout"
    default_message = "deadline exceeded"


class Unavailable(MsgdError):
    code = -32003
    name = "unavailable"
    default_message = "service unavailable"


class TooLarge(MsgdError):
    code = -32004
    name = "too_large"
    default_message = "too large"


class Overloaded(MsgdError):
    code = -32005
    name = "overloaded"
    default_message = "overloaded"


TAXONOMY: tuple[type[MsgdError], ...] = (
    ParseError, InvalidRequest, NotFound, InvalidParams, InternalError,
    ApplicationError, Unauthorized, Timeout, Unavailable, TooLarge, Overloaded,
)


def from_code(code: int, message: str, data: Any = None) -> MsgdError:
    """Rebuild an error from its code (used by clients of peer nodes)."""
    for cls in TAXONOMY:
        if cls.code == code and cls is not ApplicationError:
            return cls(message, data)
    return ApplicationError(message, data, code if not (-32768 <= code < -32099) else None)
