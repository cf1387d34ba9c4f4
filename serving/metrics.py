"""Prometheus metrics of `plum serve`, on the REST port at TF Serving's path /monitoring/prometheus/metrics.

  plum_serving_requests_total{outcome}          Predict calls to this server's model: ok, invalid (a client
                                                mistake: bad input, unknown version), error
  plum_serving_version_requests_total{version}  Predict calls answered (ok) by each version: the traffic of
                                                the versions the labels point at
  plum_serving_request_seconds                  Predict latency inside the server (queue + batch + search)
  plum_serving_batch_size                       users per beam search the batcher ran
  plum_serving_batch_seconds{stage}             per batch: features (Feast history read), search (prompt
                                                building, beam search, item lookup)
  plum_serving_version_state{version,state}     1 for each version's current state (LOADING, AVAILABLE, ...)
  plum_serving_label_version{label}             the version a label points at
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serving.versions import VersionManager

PATH = "/monitoring/prometheus/metrics"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("ok", "invalid", "error")


class _VersionCollector(Collector):
    """Version states and labels read from the manager at scrape time (never stale)."""

    def __init__(self, manager: "VersionManager") -> None:
        self.manager = manager

    def collect(self) -> Any:
        states = GaugeMetricFamily("plum_serving_version_state", "1 for the current life-cycle state of a version.",
                                   labels=["version", "state"])
        for status in self.manager.snapshot():
            states.add_metric([str(status.version), status.state], 1.0)
        yield states
        labels = GaugeMetricFamily("plum_serving_label_version", "The version a label (stable, canary) points at.",
                                   labels=["label"])
        for label, version in sorted(self.manager.labels().items()):
            labels.add_metric([label], float(version))
        yield labels


class ServingMetrics:
    """The server's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("plum_serving_requests", "Predict calls answered, by outcome.", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros before the first request
        self.version_requests = Counter("plum_serving_version_requests", "Predict calls answered, by version.",
                                        ["version"], registry=self.registry)
        self.latency = Histogram("plum_serving_request_seconds", "Predict latency inside the server.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("plum_serving_batch_size", "Users per beam search run by the batcher.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("plum_serving_batch_seconds", "Seconds per batch, by stage.", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch(self, manager: "VersionManager") -> None:
        self.registry.register(_VersionCollector(manager))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
