"""Prometheus metrics, one registry per node.

Parts of the node ask for a metric by name; asking twice (a restarted
interface, a reloaded adapter) returns the same collector, so restarts never
fail with "duplicated timeseries".
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()   # *_created series double the output and nobody here reads them

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._made: dict[str, object] = {}
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict | None = None) -> float | None:
        """A sample's current value (for tests and the status page)."""
        return self.registry.get_sample_value(name, labels or {})
