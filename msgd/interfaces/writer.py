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

With a :class:`Turn` (the listener's), what a writer is given during a
reactor turn goes out in one write at the end of the turn, however many
events and answers there were: a fan-out costs each socket one ``send`` per
turn.  :func:`msgd.net.write_now` is the ``out`` of plain sockets: straight
to the socket when Twisted holds nothing unsent for it.  :class:`Producer` is the
``IPushProducer`` of a connection that writes through a writer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


# what a writer holds for the end of the turn before it writes at once (Twisted's
# transports buffer 64 KiB before they pause their producer)
TURN_BYTES = 64 * 1024


class Turn:
    """The writers given bytes during this reactor turn: each writes them
    at the end of the turn (one ``callLater(0)`` for all of them)."""

    __slots__ = ("call", "clock", "dirty")

    def __init__(self, clock):
        self.clock = clock
        self.dirty: list[BoundedWriter] = []
        self.call = None

    def add(self, writer: BoundedWriter) -> None:
        self.dirty.append(writer)
        if self.call is None:
            self.call = self.clock.callLater(0, self.run)

    def run(self) -> None:
        """The turn ends (called early by tests: what is due goes now)."""
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        dirty, self.dirty = self.dirty, []
        for writer in dirty:
            try:
                writer.turn_ended()
            except Exception:
                log.failure("writing at the end of the reactor turn failed")


class BoundedWriter:
    __slots__ = ("closed", "discard", "limit", "out", "overflow", "paused", "queue", "queued", "turn")

    def __init__(self, out: Callable[[bytes], Any], limit: int, overflow: Callable[[int], Any],
                 discard: Callable[[], Any] | None = None, turn: Turn | None = None):
        self.out = out              # write(bytes) of the transport
        self.limit = limit
        self.overflow = overflow    # overflow(limit): say why and close
        self.discard = discard      # drop what the transport has not begun to send
        self.paused = False
        self.queue: list[bytes] | None = None     # made when first needed: idle connections stay small
        self.queued = 0
        self.closed = False
        self.turn = turn            # None: write at once

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            if self.turn is None:
                self.out(data)
            elif self.queue is None:
                self.queue, self.queued = [data], len(data)
                self.turn.add(self)
            else:
                self.queue.append(data)
                self.queued += len(data)
                if self.queued >= TURN_BYTES:
                    self.flush()        # a burst: to the transport now, which pauses us if it must
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

    def turn_ended(self) -> None:
        if not self.paused:
            self.flush()

    def flush(self) -> None:
        if self.queue:
            data = b"".join(self.queue)
            self.clear()
            self.out(data)

    def clear(self) -> None:
        self.queue, self.queued = None, 0

    def close(self) -> None:
        """Nothing more is written (the connection is closing or gone) after
        what was given this turn."""
        if not self.paused and not self.closed:
            self.flush()
        self.closed = True
        self.clear()


@implementer(IPushProducer)
class Producer:
    """The push producer of a connection that writes through a
    :class:`BoundedWriter` (:meth:`_writer`): the transport tells it when
    its buffer is full and when it drained.  Meanwhile the writer queues and
    the connection stops reading ``transport`` (a client that does not read
    sends no more requests), and reads again unless it is ``_closing``."""

    transport: Any = None
    writer: Any = None
    _closing = False

    def _writer(self) -> BoundedWriter | None:
        return self.writer

    def pauseProducing(self):
        writer = self._writer()
        if writer is not None:
            writer.pause()
        if self.transport is not None and hasattr(self.transport, "pauseProducing"):
            self.transport.pauseProducing()

    def resumeProducing(self):
        writer = self._writer()
        if writer is not None:
            writer.resume()
        if self.transport is not None and hasattr(self.transport, "resumeProducing") and not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self):
        writer = self._writer()
        if writer is not None:
            writer.clear()
