"""Prometheus metrics of the ingestion pipeline, in their own registry (prefix plum_pipeline_).

  plum_pipeline_events_applied_total                   valid events applied (new after de-duplication)
  plum_pipeline_events_duplicate_total                 events dropped because their event_id was applied before
  plum_pipeline_records_rejected_total                 records sent to the dead-letter topic (parse/validation)
  plum_pipeline_events_expired_total                   events sent to the dead-letter topic (older than the
                                                       de-duplication retention)
  plum_pipeline_items_upserted_total                   item upserts applied
  plum_pipeline_consumer_lag_records{topic,partition}  end offset of the partition minus the applied read position
  plum_pipeline_records_per_second                     records processed per second over the last sampling interval
  plum_pipeline_last_flush_timestamp_seconds           unix time at which the sinks committed the newest batch
  plum_pipeline_broker_reachable                       1 if the last sample reached Kafka (lag is known), else 0

Everything is read from where the sinks commit it (the state store: totals, read positions, the
time of the newest batch) and from the broker (end offsets), by a thread beside the pipeline every
`metrics_interval_s`; nothing runs inside the transforms, so the figures are the same on any
runner. Totals count since the state store was created, across restarts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ingest.config import KafkaConfig
from ingest.kafka_clients import KafkaUnavailableError, end_offsets, topic_partitions
from ingest.state_store import PipelineStateStore

PREFIX = "plum_pipeline_"
Partition = tuple[str, int]
# The state store's counters; every record read ends as exactly one of them.
TOTALS = {
    "events_applied": "Valid events applied (new after de-duplication by event_id).",
    "events_duplicate": "Events dropped because their event_id had been applied before.",
    "records_rejected": "Records sent to the dead-letter topic (failed parsing or validation).",
    "events_expired": "Events sent to the dead-letter topic: older than the de-duplication retention.",
    "items_upserted": "Item upserts applied to the catalogue.",
}


def consumer_lag(ends: Mapping[Partition, int], positions: Mapping[Partition, int]) -> dict[Partition, int]:
    """Records each partition holds beyond the pipeline's applied read position (never read: position 0).
    Negative when the position is past the end: the topic was recreated under the state store."""
    return {key: end - positions.get(key, 0) for key, end in sorted(ends.items())}


def records_processed(totals: Mapping[str, int]) -> int:
    """Records the pipeline has read and disposed of, from its totals."""
    return sum(int(totals.get(name, 0)) for name in TOTALS)


def records_per_second(earlier: "PipelineSample | None", totals: Mapping[str, int], at: float) -> float | None:
    """Throughput between an earlier sample and totals read at unix time `at` (None without an earlier one)."""
    if earlier is None or at <= earlier.at:
        return None
    return (records_processed(totals) - records_processed(earlier.totals)) / (at - earlier.at)


def partition_ends(kafka: KafkaConfig, topics: list[str]) -> dict[Partition, int]:
    """The end offset (high watermark) of every partition of `topics` that exist."""
    ends: dict[Partition, int] = {}
    for topic, count in topic_partitions(kafka, topics).items():
        if count:
            ends.update({(topic, p): end for p, end in end_offsets(kafka, topic, count).items()})
    return ends


@dataclass(frozen=True)
class PipelineSample:
    """One reading of the pipeline's progress."""

    at: float  # unix time of the reading
    totals: dict[str, int]
    last_flush: float | None  # unix time of the newest committed batch
    positions: dict[Partition, int]  # applied read positions
    ends: dict[Partition, int] | None  # end offsets; None: Kafka was not reachable
    records_per_second: float | None  # None: no earlier sample yet

    @property
    def lag(self) -> dict[Partition, int] | None:
        return None if self.ends is None else consumer_lag(self.ends, self.positions)


def read_progress(store: PipelineStateStore, kafka: KafkaConfig | None, earlier: PipelineSample | None = None
                  ) -> PipelineSample:
    """Totals, read positions and the newest batch's time from the state store; the partitions' end
    offsets from the broker (skipped when `kafka` is None: known to be down)."""
    totals = {name: int(store.counters().get(name, 0)) for name in TOTALS}
    positions = store.read_positions()
    last_flush = store.last_commit_time()
    ends = None
    if kafka is not None:
        try:
            ends = partition_ends(kafka, [kafka.events_topic, kafka.items_topic])
        except (KafkaUnavailableError, KafkaError):
            pass  # reported as unknown lag and broker_reachable 0
    at = time.time()
    return PipelineSample(at, totals, last_flush, positions, ends, records_per_second(earlier, totals, at))


class _SampleCollector(Collector):
    def __init__(self, metrics: "PipelineMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        sample = self.metrics.latest
        if sample is None:
            return
        for name, text in TOTALS.items():
            yield CounterMetricFamily(PREFIX + name, text, value=sample.totals[name])
        yield GaugeMetricFamily(PREFIX + "broker_reachable", "1 if the last sample reached Kafka, else 0.",
                                value=0.0 if sample.ends is None else 1.0)
        lag = GaugeMetricFamily(PREFIX + "consumer_lag_records",
                                "End offset of a partition minus the pipeline's applied read position.",
                                labels=["topic", "partition"])
        for (topic, partition), behind in (sample.lag or {}).items():
            lag.add_metric([topic, str(partition)], float(behind))
        yield lag
        if sample.records_per_second is not None:
            yield GaugeMetricFamily(PREFIX + "records_per_second",
                                    "Records processed per second over the last sampling interval.",
                                    value=sample.records_per_second)
        if sample.last_flush is not None:
            yield GaugeMetricFamily(PREFIX + "last_flush_timestamp_seconds",
                                    "Unix time at which the sinks committed the newest batch.", value=sample.last_flush)


class PipelineMetrics:
    """Samples the pipeline's progress every `interval` seconds into its own registry; `serve` exposes it."""

    def __init__(self, kafka: KafkaConfig, state_db: Path, interval: float = 5.0) -> None:
        self.kafka, self.state_db, self.interval = kafka, Path(state_db), interval
        self.registry = CollectorRegistry()
        self.registry.register(_SampleCollector(self))
        self.latest: PipelineSample | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd: Any = None
        self._store: PipelineStateStore | None = None

    def sample(self) -> PipelineSample:
        if self._store is None:
            self._store = PipelineStateStore(self.state_db)
        self.latest = read_progress(self._store, self.kafka, self.latest)
        return self.latest

    def _sample_forever(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except sqlite3.OperationalError:
                continue  # the state store stayed locked past its timeout: try again next interval

    def serve(self, port: int, host: str = "127.0.0.1") -> str:
        """Take a first sample, serve /metrics on host:port and keep sampling; returns the URL.
        Raises OSError when the port cannot be bound."""
        self.sample()
        self._httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        sampler = threading.Thread(target=self._sample_forever, name="pipeline-metrics", daemon=True)
        sampler.start()
        self._threads = [thread, sampler]
        return f"http://{host}:{self._httpd.server_port}/metrics"

    def close(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=self.interval + 15)
        if self._store is not None:
            self._store.close()
