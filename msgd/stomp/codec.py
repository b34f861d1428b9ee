"""STOMP framing, without any transport.

A frame is ``COMMAND EOL *(header EOL) EOL body NUL``.  Versions differ in
header escaping: 1.0 has none; 1.1 escapes ``\\`` ``\n`` ``:`` as ``\\\\``
``\\n`` ``\\c``; 1.2 adds ``\\r``, and CONNECT/CONNECTED are never escaped.
EOL is ``\n`` or ``\r\n`` (both accepted from any peer, ``\n`` sent).  A body
holding NULs needs ``content-length``, which :func:`encode` always adds to a
non-empty body.  Between frames, bare EOLs are heart-beats and are skipped.

Every malformed or oversized input raises :class:`ProtocolError` (and
nothing else), so a session answers it with one ERROR frame and closes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

VERSIONS = ("1.0", "1.1", "1.2")
UNESCAPED = frozenset({"CONNECT", "CONNECTED"})
_COMMAND = re.compile(rb"^[A-Z]{1,32}$")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")

_ESCAPE = {"1.1": (("\\", "\\\\"), ("\n", "\\n"), (":", "\\c")),
           "1.2": (("\\", "\\\\"), ("\r", "\\r"), ("\n", "\\n"), (":", "\\c"))}
_UNESCAPE = {"1.1": {"\\\\": "\\", "\\n": "\n", "\\c": ":"},
             "1.2": {"\\\\": "\\", "\\n": "\n", "\\c": ":", "\\r": "\r"}}
_ESCAPE_SEQ = re.compile(r"\\.?", re.S)


class ProtocolError(Exception):
    """The peer sent something that is not (acceptable) STOMP."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may send: anything larger is a ProtocolError
    before it is buffered whole."""
    max_frame: int = 1024 * 1024 + 65536   # head and body together
    max_headers: int = 64
    max_header_length: int = 8192          # one header line
    max_body: int = 1024 * 1024


@dataclass
class Frame:
    command: str
    headers: list = field(default_factory=list)    # [(name, value)] in order, repeats allowed
    body: bytes = b""

    def get(self, name: str, default=None):
        """The first value of header ``name`` (repeated headers: the first
        one counts, as STOMP 1.2 says)."""
        for k, v in self.headers:
            if k == name:
                return v
        return default


def escape(text: str, version: str) -> str:
    for a, b in _ESCAPE.get(version, ()):
        text = text.replace(a, b)
    return text


def unescape(text: str, version: str) -> str:
    table = _UNESCAPE.get(version)
    if table is None or "\\" not in text:
        return text

    def one(m):
        try:
            return table[m.group(0)]
        except KeyError:
            raise ProtocolError(f"undefined escape sequence {m.group(0)!r} in a header") from None
    return _ESCAPE_SEQ.sub(one, text)


def encode(frame: Frame, version: str = "1.2") -> bytes:
    """The bytes of ``frame`` in ``version``; ``content-length`` is added to
    a non-empty body that has none.  Raises ProtocolError for a header that
    the version cannot carry (a newline in 1.0, a CR before 1.2)."""
    if not _COMMAND.match(frame.command.encode("ascii", "replace")):
        raise ProtocolError(f"invalid command {frame.command!r}")
    raw = frame.command in UNESCAPED or version == "1.0"
    headers = frame.headers
    if not raw and headers:
        # most frames (every MESSAGE the server sends) have nothing to escape: then the
        # header block is one join, checked with three scans instead of escaped header by header
        text = "\n".join([f"{k}:{v}" for k, v in headers])
        if text.count(":") == len(headers) and text.count("\n") == len(headers) - 1 \
                and "\\" not in text and "\r" not in text:
            if frame.body and not (text.startswith("content-length:") or "\ncontent-length:" in text):
                text += f"\ncontent-length:{len(frame.body)}"
            return f"{frame.command}\n{text}\n\n".encode("utf-8") + frame.body + b"\0"
    lines = [frame.command]
    has_length = False
    for k, v in frame.headers:
        if k == "content-length":
            has_length = True
        if raw and (any(c in k for c in "\n\r:") or any(c in v for c in "\n\r")) \
                or version == "1.1" and "\r" in k + v:
            raise ProtocolError(f"header {k!r} cannot be sent in a {frame.command} frame of STOMP {version}")
        if not raw:
            k, v = escape(k, version), escape(v, version)
        lines.append(f"{k}:{v}")
    if frame.body and not has_length:
        lines.append(f"content-length:{len(frame.body)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + frame.body + b"\0"


class Decoder:
    """Incremental: :meth:`feed` bytes as they arrive, get whole frames.
    ``version`` (set after CONNECT/CONNECTED) decides header unescaping."""

    def __init__(self, limits: Limits = Limits(), version: str = "1.2"):
        self.limits = limits
        self.version = version
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        frames = []
        pos = 0
        try:
            while True:
                frame, pos = self._one(pos)
                if frame is None:
                    break
                frames.append(frame)
                if frame.command in UNESCAPED:
                    break    # the version may change now: the caller sets it, then feeds b"" for the rest
        finally:
            del self.buf[:pos]
        return frames

    def pending(self) -> bool:
        """Whether undecoded bytes remain (call :meth:`feed` with b"" again)."""
        return bool(self.buf.strip(b"\r\n"))

    def _one(self, pos: int):
        buf, lim = self.buf, self.limits
        n = len(buf)
        while pos < n and buf[pos] in (10, 13):     # heart-beats
            pos += 1
        if pos >= n:
            return None, pos
        m = _END_OF_HEAD.search(buf, pos)
        if m is None:
            if b"\n" not in buf[pos:pos + 64] and n - pos > 34:
                raise ProtocolError("invalid command line")
            if n - pos > min(lim.max_frame, lim.max_headers * (lim.max_header_length + 2) + 40):
                raise ProtocolError("frame headers too large")
            return None, pos
        head = bytes(buf[pos:m.start()])
        start = m.end()
        lines = head.split(b"\n")
        command_line = lines[0].rstrip(b"\r")
        if not _COMMAND.match(command_line):
            raise ProtocolError(f"invalid command {command_line[:40]!r}")
        command = command_line.decode("ascii")
        if len(lines) - 1 > lim.max_headers:
            raise ProtocolError(f"more than {lim.max_headers} headers")
        raw = command in UNESCAPED or self.version == "1.0"
        headers = []
        for line in lines[1:]:
            if len(line) > lim.max_header_length:
                raise ProtocolError(f"a header line is longer than {lim.max_header_length} bytes")
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("a header is not UTF-8") from None
            k, sep, v = text.partition(":")
            if not sep:
                raise ProtocolError(f"header line without a colon: {text[:60]!r}")
            if not raw:
                k, v = unescape(k, self.version), unescape(v, self.version)
            headers.append((k, v))
        frame = Frame(command, headers)
        length = frame.get("content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 12:
                raise ProtocolError(f"invalid content-length {length[:20]!r}")
            size = int(length)
            if size > lim.max_body:
                raise ProtocolError(f"body larger than {lim.max_body} bytes")
            if n < start + size + 1:
                if start - pos + size > lim.max_frame:
                    raise ProtocolError(f"frame larger than {lim.max_frame} bytes")
                return None, pos
            if buf[start + size] != 0:
                raise ProtocolError("body longer than its content-length")
            end = start + size
        else:
            end = buf.find(b"\0", start)
            if end < 0:
                if n - start > lim.max_body:
                    raise ProtocolError(f"body larger than {lim.max_body} bytes")
                return None, pos
            if end - start > lim.max_body:
                raise ProtocolError(f"body larger than {lim.max_body} bytes")
        if end - pos > lim.max_frame:
            raise ProtocolError(f"frame larger than {lim.max_frame} bytes")
        frame.body = bytes(buf[start:end])
        return frame, end + 1


def negotiate_version(accept: str | None, hint: str | None = None) -> str:
    """The highest version both sides speak.  No ``accept-version`` means
    1.0 (or ``hint``: the version a WebSocket subprotocol named)."""
    if accept is None:
        return hint or "1.0"
    offered = {v.strip() for v in accept.split(",")}
    for v in reversed(VERSIONS):
        if v in offered:
            return v
    raise ProtocolError(f"supported protocol versions are {','.join(VERSIONS)}")


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    if not value:
        return 0, 0
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) < 10 for p in parts):
        raise ProtocolError(f"invalid heart-beat header {value[:40]!r}")
    return int(parts[0]), int(parts[1])


def negotiate_heartbeat(peer: tuple[int, int], ours: tuple[int, int]) -> tuple[int, int]:
    """(send every ms, expect every ms; 0 = never) from the peer's and our
    ``heart-beat`` pairs (``can-send, wants-to-receive``)."""
    peer_send, peer_want = peer
    our_send, our_want = ours
    send = max(our_send, peer_want) if our_send and peer_want else 0
    expect = max(peer_send, our_want) if peer_send and our_want else 0
    return send, expect
