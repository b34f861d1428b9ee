"""Work started by the clock (``type = schedule``): each section is one job
that calls an app function on a cron expression or every interval.

* **One run at a time.**  When the next firing comes while the previous run
  is still going, that firing is skipped, logged and counted
  (``msgd_schedule_skipped_total{reason="overlap"}``); runs never pile up.
* **Deadline.**  Each run is a request with the interface's deadline
  (``request_timeout``, default ``[node] request_timeout``); past it the run is
  cancelled and counted as ``timeout``.
* **Jitter.**  Each firing is delayed by a random 0…``jitter`` seconds, so
  that many nodes with the same schedule do not hit a shared system at once.
  The schedule itself does not drift: the next firing is computed from the
  planned time, not from when the run happened.
* **Catch-up.**  The planned time of the last run started is kept in
  ``[node] state_dir``/``schedule-NAME.json``.  When the node starts and a
  firing was missed while it was down, ``catch_up = skip`` (default) only
  counts it (``reason="missed"``); ``catch_up = once`` runs the job once right
  away, however many firings were missed.  A job that never ran (no state
  yet) waits for its first firing.

Everything runs on the node's reactor clock, so tests drive it with
``task.Clock``.  The state file is written on every run, atomically
(:func:`~msgd.interfaces.ingest.atomic_write`), in the node's thread pool
(``run_blocking``), never on the reactor thread; one write is in flight at a
time and a run that comes while one is going only replaces the value written
next.  It is read once, when the interface starts (as the ``pop3`` input
reads its own).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.internet import defer
from twisted.logger import Logger

from msgd.config import Invalid, choice, duration, option, optional_duration, target
from msgd.core import errors
from msgd.core.cron import Cron, CronError
from msgd.interfaces.base import Interface
from msgd.interfaces.ingest import atomic_write
from msgd.services import Services


def cron_expression(value: str, ctx) -> Cron | None:
    if not value.strip():
        return None
    try:
        return Cron.parse(value)
    except CronError as e:
        raise Invalid(str(e)) from None


def time_zone(value: str, ctx) -> str:
    v = value.strip()
    if v.lower() != "local":
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise Invalid(f"{v!r} is not a time zone (use local, UTC, or a name like Europe/Paris)") from None
    return v


def json_params(value: str, ctx) -> Any:
    try:
        params = json.loads(value)
    except ValueError as e:
        raise Invalid(f"not JSON: {e}") from None
    if not isinstance(params, (list, dict)):
        raise Invalid("must be a JSON array (positional) or object (keyword arguments)")
    return tuple(params) if isinstance(params, list) else params


@dataclass(frozen=True)
class Options:
    handler: str = option(parse=target, doc="the app function called at each firing")
    cron: Cron | None = option(None, parse=cron_expression, doc="when to fire, e.g. */5 * * * * or @daily")
    interval: float | None = option(None, parse=optional_duration, doc="fire every this long (instead of cron)")
    jitter: float = option(0.0, parse=duration, doc="delay each firing by a random 0..jitter")
    timezone: str = option("local", parse=time_zone, doc="time zone of cron expressions (local, UTC, Europe/Paris…)")
    catch_up: str = option("skip", parse=choice("skip", "once"),
                           doc="after downtime that missed a firing: skip it, or run once at start")
    params: Any = option((), parse=json_params, doc="arguments of the call: a JSON array or object")
    request_timeout: float | None = option(None, parse=optional_duration,
                                           doc="deadline of each run (default: [node] request_timeout)")

    def check(self):
        if (self.cron is None) == (self.interval is None):
            raise Invalid("give exactly one of cron and interval", "cron")
        if self.interval is not None and self.interval <= 0:
            raise Invalid("must be more than 0", "interval")


class Schedule(Interface):
    """``[interface:NAME] type = schedule``: one job."""

    Options = Options
    type_name = "schedule"
    log = Logger()

    def __init__(self, name, options, services: Services):
        super().__init__(name, options, services)
        self.clock = self.services.reactor
        self.random = random.Random()
        self.tz = None if options.timezone.lower() == "local" else ZoneInfo(options.timezone)
        self.state_path = os.path.join(services.settings.state_dir, f"schedule-{name}.json")
        self.anchor: float | None = None   # interval grid origin
        self.last_run: float | None = None
        self.next_due: float | None = None
        self.busy: defer.Deferred | None = None
        self._call = None
        self._saving: defer.Deferred | None = None     # the state write in flight
        self._unsaved: float | None = None             # the value to write when it is done
        m = self.services.metrics
        self.m_runs = m.counter("msgd_schedule_runs_total", "Scheduled runs by outcome", ["job", "outcome"])
        self.m_skipped = m.counter("msgd_schedule_skipped_total",
                                   "Scheduled firings not run (overlap: previous run still going; "
                                   "missed: node was down)", ["job", "reason"])
        self.m_duration = m.histogram("msgd_schedule_duration_seconds", "Duration of scheduled runs", ["job"])
        self.m_next = m.gauge("msgd_schedule_next_run_timestamp", "Planned time of the next firing", ["job"])
        self.m_success = m.gauge("msgd_schedule_last_success_timestamp",
                                 "When the last successful run ended", ["job"])

    # -- planning ----------------------------------------------------------------

    def due_after(self, t: float) -> float:
        """The first planned firing strictly after ``t``."""
        o = self.options
        if o.cron is not None:
            return o.cron.next(t, self.tz)
        assert self.anchor is not None   # set by startService, before any planning
        k = math.floor((t - self.anchor) / o.interval) + 1
        return self.anchor + k * o.interval

    def startService(self):
        super().startService()
        now = self.clock.seconds()
        self.last_run = self._load()
        self.anchor = self.last_run if self.last_run is not None else now
        if self.last_run is not None and self.due_after(self.last_run) <= now:
            if self.options.catch_up == "once":
                self.log.info("job {job}: firings missed while down; running once now", job=self.name)
                self._call = self.clock.callLater(0, self._fire, now, self.due_after(now))
                self._ready()
                return
            self.log.info("job {job}: firings missed while down; skipped (catch_up = skip)", job=self.name)
            self.m_skipped.labels(self.name, "missed").inc()
        self._plan(self.due_after(now))
        self._ready()

    def _ready(self):
        if not self.ready.called:
            self.ready.callback(self)

    def _plan(self, due: float) -> None:
        self.next_due = due
        self.m_next.labels(self.name).set(due)
        delay = max(0.0, due - self.clock.seconds()) + self.random.uniform(0, self.options.jitter)
        self._call = self.clock.callLater(delay, self._fire, due, None)

    def _fire(self, due: float, then: float | None) -> None:
        """Run the job planned for ``due``; plan the next firing first, so a
        slow or failing run never stops the schedule."""
        self._call = None
        nxt = then if then is not None else self.due_after(due)
        if nxt <= self.clock.seconds():          # the clock jumped (suspend, jitter past a whole period)
            nxt = self.due_after(self.clock.seconds())
        self._plan(nxt)
        if self.busy is not None:
            self.log.warn("job {job}: previous run still going at {due}; this firing is skipped",
                          job=self.name, due=due)
            self.m_skipped.labels(self.name, "overlap").inc()
            return
        self._run(due)

    # -- running -----------------------------------------------------------------

    def _run(self, due: float) -> None:
        self.last_run = due
        self._save(due)
        services = self.services
        request = self.new_request()
        params = self.options.params
        args, kwargs = (params, {}) if isinstance(params, tuple) else ((), dict(params))
        started = self.clock.seconds()
        d = self.busy = services.dispatcher.call(request, self.options.handler, args, kwargs)

        def done(result):
            self.busy = None
            self.m_duration.labels(self.name).observe(self.clock.seconds() - started)
            return result

        def ok(result):
            self.m_runs.labels(self.name, "ok").inc()
            self.m_success.labels(self.name).set(self.clock.seconds())

        def failed(f):
            outcome = "timeout" if f.check(errors.Timeout) else "failed"
            self.m_runs.labels(self.name, outcome).inc()
            self.log.error("job {job} ({target}) {outcome}: {error}", job=self.name,
                           target=self.options.handler, outcome=outcome, error=f.getErrorMessage())
        d.addBoth(done)
        d.addCallbacks(ok, failed)

    # -- state ---------------------------------------------------------------------

    def _load(self) -> float | None:
        try:
            with open(self.state_path) as f:
                return float(json.load(f)["last_run"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warn("job {job}: ignoring unreadable {path}: {error}", job=self.name,
                          path=self.state_path, error=e)
            return None

    def _save(self, due: float) -> None:
        """Write ``due`` as the last run, off the reactor thread; writes never
        overlap, and only the newest value waiting is written."""
        self._unsaved = due
        if self._saving is None:
            self._write_next()

    def _write_next(self, _=None) -> None:
        due, self._unsaved = self._unsaved, None
        if due is None:
            self._saving = None
            return
        self._saving = d = self.services.run_blocking(atomic_write, self.state_path,
                                                      json.dumps({"last_run": due}).encode())
        d.addErrback(lambda f: self.log.error("job {job}: cannot save {path}: {error}", job=self.name,
                                              path=self.state_path, error=f.value))
        d.addCallback(self._write_next)

    def saved(self) -> defer.Deferred:
        """Fires when no state write is in flight."""
        if self._saving is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def again(_):                 # the write that ended may have started the next one
            self.saved().addCallback(done.callback)
        self._saving.addBoth(again)
        return done

    # -- service -------------------------------------------------------------------

    def stop_accepting(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.succeed(None)

    def stopService(self):
        super().stopService()
        self.stop_accepting()
        return self.saved()

    def describe(self) -> dict:
        o = self.options
        return dict(super().describe(), handler=o.handler,
                    schedule=o.cron.expression if o.cron is not None else f"every {o.interval}s",
                    next_run=self.next_due, last_run=self.last_run, busy=self.busy is not None)
