"""Prometheus metrics, one registry per node.

Parts of the node ask for a metric by name; asking twice (a restarted
interface, a reloaded adapter) returns the same collector, so restarts never
fail with "duplicated timeseries".
"""

from __future__ import annotations

import bisect
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

disable_created_metrics()   # *_created series double the output and nobody here reads them

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._made: dict[str | int, object] = {}   # metrics by name, collectors by id
        self._lock = threading.Lock()

    def _get(self, kind, name, doc, labels, **kw):
        with self._lock:
            metric = self._made.get(name)
            if metric is None:
                metric = kind(name, doc, labelnames=tuple(labels), registry=self.registry, **kw)
                self._made[name] = metric
            elif not isinstance(metric, kind):
                raise ValueError(f"metric {name} already exists as another kind")
            return metric

    def counter(self, name: str, doc: str, labels=()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels=()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, doc, labels, buckets=buckets)

    def register(self, collector) -> None:
        """Add a custom collector (one with ``collect()``) once."""
        with self._lock:
            if id(collector) not in self._made:
                self.registry.register(collector)
                self._made[id(collector)] = collector

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict | None = None) -> float | None:
        """A sample's current value (for tests and the status page)."""
        return self.registry.get_sample_value(name, labels or {})


class CallStats:
    """``msgd_requests_total`` and ``msgd_request_duration_seconds`` for the
    dispatcher, kept as plain Python numbers and turned into Prometheus
    samples only when scraped.

    Every app call updates them; a prometheus_client Counter and Histogram
    take a lock per update, which for a small function costs more than the
    call itself.  The reactor thread is the only writer here (blocking calls
    finish through reactor callbacks), so no lock is needed; a scrape from
    another thread reads a snapshot made with ``list()``.
    """

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self._le = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        self.outcomes: dict = {}    # (interface, target, outcome) -> count
        self.latency: dict = {}     # (interface, target) -> [count per bucket..., count above, sum]

    def record(self, interface: str, target: str, outcome: str, seconds: float) -> None:
        key = (interface, target, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        h = self.latency.get((interface, target))
        if h is None:
            h = self.latency[(interface, target)] = [0] * (len(self.buckets) + 1) + [0.0]
        h[bisect.bisect_left(self.buckets, seconds)] += 1
        h[-1] += seconds

    def collect(self):
        total = CounterMetricFamily("msgd_requests", "App calls by interface, target and outcome",
                                    labels=["interface", "target", "outcome"])
        for labels, n in list(self.outcomes.items()):
            total.add_metric(list(labels), n)
        yield total
        latency = HistogramMetricFamily("msgd_request_duration_seconds", "App call latency",
                                        labels=["interface", "target"])
        for labels, h in list(self.latency.items()):
            h = list(h)
            cumulative, buckets = 0, []
            for le, n in zip(self._le, h[:-1]):
                cumulative += n
                buckets.append((le, cumulative))
            latency.add_metric(list(labels), buckets, h[-1])
        yield latency
