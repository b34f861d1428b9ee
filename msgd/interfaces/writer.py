"""The one bounded writer of every push transport (WebSocket, plain stream,
SSE, STOMP): bytes go out at once while the transport drains, and queue
while it does not, up to a limit; past the limit the client is a slow
consumer and is dropped with a reason.

The transport's ``IPushProducer`` calls tell the writer when to queue
(:meth:`BoundedWriter.pause`) and when to send what it holds
(:meth:`BoundedWriter.resume`).  Past ``limit`` queued bytes the writer
drops its queue and, through ``discard``, what the transport has not begun
to send (:func:`msgd.interfaces.base.discard_unsent`), then calls
``overflow(limit)``: the transport sends its last message (a close frame,
an ``rpc.closing`` line, an ERROR frame) with :meth:`BoundedWriter.last`
— the next thing the client reads — and closes the connection within
``close_timeout`` (:meth:`msgd.interfaces.base.Listener.close_within`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BoundedWriter:
    __slots__ = ("closed", "discard", "limit", "out", "overflow", "paused", "queue", "queued")

    def __init__(self, out: Callable[[bytes], Any], limit: int, overflow: Callable[[int], Any],
                 discard: Callable[[], Any] | None = None):
        self.out = out              # write(bytes) of the transport
        self.limit = limit
        self.overflow = overflow    # overflow(limit): say why and close
        self.discard = discard      # drop what the transport has not begun to send
        self.paused = False
        self.queue: list[bytes] | None = None     # made when first needed: idle connections stay small
        self.queued = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            self.out(data)
            return
        if self.queue is None:
            self.queue = []
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > self.limit:
            self.clear()
            if self.discard is not None:
                self.discard()
            self.closed = True
            self.overflow(self.limit)

    def last(self, data: bytes) -> None:
        """Write ``data`` now, paused or not, after what is queued (nothing,
        after an overflow)."""
        self.flush()
        self.out(data)

    def pause(self) -> None:
        """The transport's buffer is full: queue from now on."""
        self.paused = True

    def resume(self) -> None:
        """The transport drained: send what is queued, then write through."""
        self.paused = False
        self.flush()

    def flush(self) -> None:
        if self.queue:
            data = b"".join(self.queue)
            self.clear()
            self.out(data)

    def clear(self) -> None:
        self.queue, self.queued = None, 0

    def close(self) -> None:
        """Nothing more is written (the connection is closing or gone)."""
        self.closed = True
        self.clear()
