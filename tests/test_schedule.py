"""The schedule interface on a task.Clock: firing times, overlap, deadline,
jitter, catch-up after downtime, and its state written off the reactor
thread (the node's ``run_blocking`` is injected: inline, or a queue the test
runs)."""

import datetime as dt
import json
import os
import textwrap

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.trial import unittest

from msgd.config import ConfigError, parse_text
from msgd.interfaces.ingest import atomic_write
from msgd.interfaces.schedule import Schedule
from msgd.node import NodeService
from msgd.testing import AppHarness
from tests.helpers import QueuedPool, run_now, write

JOBS = '''
from twisted.internet import defer
from msgd import api

calls = []
gates = []

def tick(*args, **kwargs):
    calls.append((api.request().services.reactor.seconds(), args, kwargs))

def held():
    """Runs until the test fires its Deferred (or the deadline cancels it)."""
    calls.append(api.request().services.reactor.seconds())
    d = defer.Deferred()
    gates.append(d)
    return d

def broken():
    raise RuntimeError("boom")
'''

START = dt.datetime(2026, 11, 22, 10, 0, 0, tzinfo=dt.timezone.utc).timestamp()


class ScheduleTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        write(os.path.join(self.base, "apps", "jobs.py"), JOBS)
        self.nodes = []

    def start(self, section: str, at: float = START, name: str = "job", run_blocking=run_now):
        """A node on a fresh task.Clock set to ``at``, with one schedule."""
        clock = task.Clock()
        clock.advance(at)
        text = f"[node]\nname = t\nrequest_timeout = 30s\n[interface:{name}]\ntype = schedule\n" + \
            textwrap.dedent(section)
        node = NodeService(parse_text(text, os.path.join(self.base, "node.ini")), clock, run_blocking=run_blocking)
        node.privilegedStartService()
        node.startService()
        self.nodes.append(node)
        self.clock, self.node, self.job = clock, node, node.interfaces[name]
        self.addCleanup(lambda: self.stop(node, clock) if node.running else None)
        return self.module()

    def stop(self, node=None, clock=None):
        """Stop the node; runs still going are given up after the drain timeout."""
        node, clock = node or self.node, clock or self.clock
        d = node.stopService()
        clock.pump([1] * 12)
        return d

    def module(self):
        return self.node.apps.modules["jobs"].module

    def value(self, metric, **labels):
        return self.node.metrics.value(metric, dict(job="job", **labels)) or 0

    def test_cron_firing_times(self):
        m = self.start("handler = jobs.tick\ncron = */20 10 * * *\ntimezone = UTC\n")
        self.clock.pump([60] * 24 * 60)
        times = [c[0] - START for c in m.calls]
        self.assertEqual(times, [1200, 2400, 86400])   # 10:20, 10:40, and 10:00 the next day
        self.assertEqual(self.value("msgd_schedule_runs_total", outcome="ok"), 3)
        self.assertEqual(self.job.next_due - START, 86400 + 1200)

    def test_interval_with_params(self):
        m = self.start('handler = jobs.tick\ninterval = 90s\nparams = {"kind": "sweep"}\n')
        self.clock.pump([30] * 10)
        self.assertEqual([c[0] - START for c in m.calls], [90, 180, 270])
        self.assertEqual(m.calls[0][1:], ((), {"kind": "sweep"}))

    def test_jitter_delays_without_drift(self):
        m = self.start("handler = jobs.tick\ninterval = 60s\njitter = 10s\n")
        for _ in range(60 * 10):
            self.clock.advance(1)
        offsets = [c[0] - START - 60 * (i + 1) for i, c in enumerate(m.calls)]
        self.assertEqual(len(offsets), 9)    # the 10th is jittered past the end or just in
        self.assertTrue(all(0 <= o <= 10 for o in offsets), offsets)

    def test_overlap_is_skipped_and_counted(self):
        m = self.start("handler = jobs.held\ninterval = 10s\n")
        self.clock.advance(10)
        self.assertEqual(len(m.gates), 1)
        self.assertTrue(self.job.describe()["busy"])
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(m.gates), 1)                 # still the first run
        self.assertEqual(self.value("msgd_schedule_skipped_total", reason="overlap"), 2)
        m.gates[0].callback("done")
        self.clock.advance(10)
        self.assertEqual(len(m.gates), 2)                 # the next firing after the run ended
        self.assertEqual([t - START for t in m.calls], [10, 40])

    def test_deadline_cancels_a_run(self):
        m = self.start("handler = jobs.held\ninterval = 60s\nrequest_timeout = 5s\n")
        self.clock.advance(60)
        self.assertEqual(len(m.gates), 1)
        self.clock.advance(5)
        self.assertEqual(self.value("msgd_schedule_runs_total", outcome="timeout"), 1)
        self.assertFalse(self.job.describe()["busy"])
        self.clock.advance(55)
        self.assertEqual(len(m.gates), 2)

    def test_failures_are_counted_and_the_schedule_goes_on(self):
        self.start("handler = jobs.broken\ninterval = 1m\n")
        self.clock.pump([60] * 3)
        self.assertEqual(self.value("msgd_schedule_runs_total", outcome="failed"), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    @defer.inlineCallbacks
    def test_catch_up_skip(self):
        m = self.start("handler = jobs.tick\ncron = 0 * * * *\ntimezone = UTC\n")
        self.clock.advance(3600)
        self.assertEqual(len(m.calls), 1)
        yield self.stop()
        with open(os.path.join(self.base, "state", "schedule-job.json")) as f:
            self.assertEqual(json.load(f)["last_run"], START + 3600)
        # down for 5 hours: nothing runs at start; the next hour fires as usual
        m = self.start("handler = jobs.tick\ncron = 0 * * * *\ntimezone = UTC\n", at=START + 6 * 3600 + 600)
        self.assertEqual(self.value("msgd_schedule_skipped_total", reason="missed"), 1)
        self.clock.advance(0)
        self.assertEqual(m.calls, [])
        self.clock.advance(3000)
        self.assertEqual([c[0] - START for c in m.calls], [7 * 3600])

    @defer.inlineCallbacks
    def test_catch_up_once(self):
        conf = "handler = jobs.tick\ninterval = 1h\ncatch_up = once\n"
        m = self.start(conf)
        self.clock.advance(3600)
        yield self.stop()
        # down for 5 hours: one run right at start, then the hourly grid goes on
        m = self.start(conf, at=START + 6 * 3600 + 600)
        self.clock.advance(0)
        self.assertEqual([c[0] - START for c in m.calls], [6 * 3600 + 600])
        self.clock.advance(3000)
        self.assertEqual([c[0] - START for c in m.calls], [6 * 3600 + 600, 7 * 3600])
        self.assertEqual(self.value("msgd_schedule_skipped_total", reason="missed"), 0)

    @defer.inlineCallbacks
    def test_no_catch_up_when_nothing_was_missed(self):
        conf = "handler = jobs.tick\ninterval = 1h\ncatch_up = once\n"
        self.start(conf)
        self.clock.advance(3600)
        yield self.stop()
        m = self.start(conf, at=START + 3600 + 60)      # a restart within the hour
        self.clock.advance(0)
        self.assertEqual(m.calls, [])
        self.clock.advance(3600 - 60)
        self.assertEqual([c[0] - START for c in m.calls], [7200])

    def state(self):
        try:
            with open(os.path.join(self.base, "state", "schedule-job.json")) as f:
                return json.load(f)["last_run"] - START
        except FileNotFoundError:
            return None

    def test_state_written_off_the_reactor_thread(self):
        """The run starts at once; its state write waits for the pool."""
        pool = QueuedPool()
        m = self.start("handler = jobs.tick\ninterval = 10s\n", run_blocking=pool)
        self.clock.advance(10)
        self.assertEqual([c[0] - START for c in m.calls], [10])
        self.assertIsNone(self.state())                    # nothing written on the reactor thread
        self.assertEqual(pool.run(), 1)
        self.assertEqual(self.state(), 10)

    def test_state_writes_do_not_overlap_and_the_newest_wins(self):
        pool = QueuedPool()
        m = self.start("handler = jobs.tick\ninterval = 10s\n", run_blocking=pool)
        self.clock.pump([10, 10, 10])
        self.assertEqual(len(m.calls), 3)
        self.assertEqual(len(pool.queue), 1)               # one write in flight; the later runs wait
        stopped = self.job.stopService()
        self.assertNoResult(stopped)                       # stopping waits for the state on disk
        self.assertEqual(pool.run(), 2)                    # the first run's write, then the third's
        self.assertEqual(self.state(), 30)
        self.successResultOf(stopped)

    def test_a_failed_state_write_is_logged_and_runs_go_on(self):
        m = self.start("handler = jobs.tick\ninterval = 10s\n")
        events = []
        self.job.log = Logger(observer=events.append)
        os.rename(os.path.join(self.base, "state"), os.path.join(self.base, "gone"))
        self.clock.pump([10, 10])
        self.assertEqual(len(m.calls), 2)
        self.assertIsNone(self.state())
        self.assertEqual([e["log_format"].split(":")[0] for e in events], ["job {job}"] * 2)
        self.assertEqual([e["path"] for e in events], [os.path.join(self.base, "state", "schedule-job.json")] * 2)

    def test_config_errors(self):
        for section, key in [("handler = jobs.tick\n", "cron"),
                             ("handler = jobs.tick\ncron = @daily\ninterval = 1h\n", "cron"),
                             ("handler = jobs.tick\ncron = 61 * * * *\n", "cron"),
                             ("handler = jobs.tick\ninterval = 1h\ntimezone = Mars/Base\n", "timezone"),
                             ("handler = jobs.tick\ninterval = 1h\ncatch_up = always\n", "catch_up"),
                             ("handler = jobs.tick\ninterval = 1h\nparams = 5\n", "params")]:
            with self.assertRaises(ConfigError, msg=section) as e:
                parse_text("[interface:job]\ntype = schedule\n" + section, "node.ini")
            self.assertEqual(e.exception.key, key, str(e.exception))


class ScheduleOnAHarnessTests(unittest.TestCase):
    """The schedule interface built on an AppHarness — its clock, dispatcher,
    metrics, settings and run_blocking — with no node."""

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        write(os.path.join(base, "apps", "jobs.py"), JOBS)
        clock = task.Clock()
        clock.advance(START)
        self.state = os.path.join(base, "state")
        os.makedirs(self.state)
        self.harness = AppHarness(os.path.join(base, "apps"), clock=clock, timeout=30, state_dir=self.state)
        self.writes = self.harness.run_blocking = QueuedPool()     # the interface's blocking work waits here

    def schedule(self, section: str) -> Schedule:
        options = parse_text("[interface:job]\ntype = schedule\n" + section, "node.ini").interfaces[0].options
        job = Schedule("job", options, self.harness)
        job.startService()

        def stop():
            stopped = job.stopService()
            self.writes.run()
            return stopped
        self.addCleanup(stop)
        return job

    def runs(self, outcome: str) -> float:
        return self.harness.metrics.value("msgd_schedule_runs_total", {"job": "job", "outcome": outcome}) or 0

    def test_each_run_writes_its_state_through_run_blocking(self):
        self.schedule("handler = jobs.tick\ninterval = 10s\n")
        path = os.path.join(self.state, "schedule-job.json")
        self.harness.clock.advance(10)
        m = self.harness.apps.modules["jobs"].module
        self.assertEqual([c[0] - START for c in m.calls], [10])
        self.assertEqual(self.runs("ok"), 1)
        self.assertEqual([(fn, args[0]) for fn, args, _, _ in self.writes.queue], [(atomic_write, path)])
        self.assertFalse(os.path.exists(path))                 # nothing written on the calling thread
        self.assertEqual(self.writes.run(), 1)
        with open(path) as f:
            self.assertEqual(json.load(f), {"last_run": START + 10})

    def test_the_deadline_is_the_request_timeout_in_force(self):
        """Without its own ``request_timeout``, a run's deadline is the
        ``[node]`` one of the services' settings when it starts (a reload
        replaces them)."""
        job = self.schedule("handler = jobs.held\ninterval = 60s\n")
        self.assertEqual(job.timeout(), 30)
        self.harness.timeout = 5
        self.assertEqual(job.timeout(), 5)
        self.harness.clock.advance(60)
        self.assertEqual(len(self.harness.apps.modules["jobs"].module.gates), 1)
        self.harness.clock.advance(5)
        self.assertEqual(self.runs("timeout"), 1)
