"""What the asynchronous inputs (``dirwatch``, ``pop3``) share: their base
class :class:`Input` (metrics, the counted handler call, start-up failure,
the stop that lets work finish), crash-safe writes of small state files,
and the one-line reason recorded when a handler fails.

Both inputs are at-least-once: an item (a file, a mail) leaves its source
only after the handler succeeded, so a crash at any moment can hand an item
to the handler twice but never lose one.  See ``docs/ingest.rst``.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgd.core import errors
from msgd.interfaces.base import Interface, StartupError

LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400)


class IngestMetrics:
    """The ``msgd_ingest_*`` series of one interface (label ``interface``)."""

    def __init__(self, metrics, interface: str):
        label = ["interface"]
        self.taken = metrics.counter("msgd_ingest_taken_total", "Items handed to an ingest handler",
                                     label).labels(interface)
        self.succeeded = metrics.counter("msgd_ingest_succeeded_total", "Items whose handler succeeded",
                                         label).labels(interface)
        self.failed = metrics.counter("msgd_ingest_failed_total", "Items whose handler failed",
                                      label).labels(interface)
        self.in_flight = metrics.gauge("msgd_ingest_in_flight", "Items being handled now",
                                       label).labels(interface)
        self.lag = metrics.histogram("msgd_ingest_lag_seconds",
                                     "Time from an item's arrival to its handler call",
                                     label, buckets=LAG_BUCKETS).labels(interface)
        self.errors = metrics.counter("msgd_ingest_errors_total",
                                      "Errors of the input itself (connection, server, file system)",
                                      label).labels(interface)


class Input(Interface):
    """Base of ``dirwatch`` and ``pop3``: an interface that takes items
    from a source and hands each to the ``handler`` app target."""

    log = Logger()
    close_grace = 5.0     # how long a stop waits for work being finished (see stopService)

    def __init__(self, name, options, services):
        super().__init__(name, options, services)
        self.metrics = IngestMetrics(services.metrics, name)
        self.accepting = False

    def cannot_start(self, what: str, error: Exception) -> None:
        """Start-up failed: ``ready`` fails, which stops the node with one
        line naming the section (``what``: e.g. ``watch /srv/drop``)."""
        self.log.critical("interface {interface} cannot {what}: {error}", interface=self.name, what=what, error=error)
        self.ready.errback(StartupError(f"[interface:{self.name}] cannot {what}: {error}"))

    @defer.inlineCallbacks
    def call_handler(self, item, lag: float | None):
        """``handler(item)``, counted (``lag``: seconds from the item's
        arrival, when known).  Fires with None when the handler succeeded,
        else with ``(reason, request id)``; never fails."""
        m = self.metrics
        m.taken.inc()
        if lag is not None:
            m.lag.observe(lag)
        m.in_flight.inc()
        request = self.new_request()
        try:
            yield self.services.dispatcher.call(request, self.options.handler, (item,))
        except Exception as e:
            m.failed.inc()
            return reason(e), request.id
        else:
            m.succeeded.inc()
            return None
        finally:
            m.in_flight.dec()

    def stop_accepting(self):
        self.accepting = False
        return defer.succeed(None)

    def unfinished(self) -> list[defer.Deferred]:
        """The work a stop waits for."""
        return []

    def stopService(self):
        """Stop taking work, then wait (briefly: the node already drained
        the handler calls) for :meth:`unfinished`; what is cut short is
        taken again at the next start (at-least-once)."""
        super().stopService()
        self.stop_accepting()
        return settle_within(self.unfinished(), self.close_grace, self.services.reactor)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash (or power loss) leaves
    either the old or the new content, never a mix: write a temp file in the
    same directory, fsync it, rename it over ``path``, fsync the directory.
    Blocking: call it through ``services.run_blocking``."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reason(failure: Failure | BaseException) -> str:
    """One line saying why a handler failed, e.g. ``application_error
    (-32000): bad total``.  Internal errors carry the request id that the
    logged traceback carries too."""
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, errors.MsgdError):
        return f"{exc.name} ({exc.code}): {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def settle_within(deferreds, seconds: float, clock) -> defer.Deferred:
    """Fires when every one of ``deferreds`` has fired, or after ``seconds``,
    whichever is first; never cancels them (work cut short at stop is redone
    at the next start, which is the at-least-once contract)."""
    done: defer.Deferred[None] = defer.Deferred()
    timer = clock.callLater(seconds, lambda: None if done.called else done.callback(None))

    def finished(_):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)
    defer.DeferredList(list(deferreds), consumeErrors=True).addBoth(finished)
    return done
