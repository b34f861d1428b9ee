"""Signed bearer tokens: HMAC-SHA256 over a small JSON payload.

Form: ``v1.PAYLOAD.SIGNATURE`` with both parts base64url without padding —
only letters, digits, ``-``, ``_`` and ``.``, so a token fits a query
parameter, a cookie, an ``Authorization: Bearer`` header and a WebSocket
subprotocol name alike.  The payload holds ``sub`` (name), ``roles``,
``iat``, ``exp`` (seconds on the node's clock).  Tokens are not encrypted:
put nothing secret in them.  They cannot be revoked before they expire other
than by changing the secret (which revokes all), so keep ``token_ttl`` short.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from msgd.core import errors
from msgd.security.principal import Principal

MAX_TOKEN = 4096


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class TokenError(errors.Unauthorized):
    """A token that is malformed, forged or expired (the reason is logged,
    the caller is told only that it was refused)."""


class Tokens:
    def __init__(self, secret: bytes, clock, ttl: float):
        if len(secret) < 16:
            raise ValueError("a token secret needs at least 16 bytes")
        self.secret = secret
        self.clock = clock
        self.ttl = ttl

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, b"v1." + payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, name: str, roles=(), ttl: float | None = None) -> tuple[str, float]:
        """(token, expiry time on the node's clock)."""
        now = self.clock.seconds()
        exp = now + (self.ttl if ttl is None else ttl)
        body = json.dumps({"sub": name, "roles": sorted(roles), "iat": int(now), "exp": exp},
                          separators=(",", ":")).encode()
        payload = _b64(body)
        return f"v1.{payload}.{self._sign(payload)}", exp

    def verify(self, token: str) -> Principal:
        """The principal the token names; raises TokenError."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN:
            raise TokenError("malformed token")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise TokenError("malformed token")
        try:
            expected = self._sign(parts[1])
        except UnicodeEncodeError:
            raise TokenError("malformed token") from None
        if not hmac.compare_digest(expected, parts[2]):
            raise TokenError("bad token signature")
        try:
            claims = json.loads(_unb64(parts[1]))
            name, roles, exp = claims["sub"], claims["roles"], float(claims["exp"])
            assert isinstance(name, str) and isinstance(roles, list)
        except Exception:
            raise TokenError("malformed token payload") from None
        if self.clock.seconds() >= exp:
            raise TokenError("token expired")
        return Principal(name, frozenset(map(str, roles)), "token")
