"""Reading Kafka inside Beam: a splittable DoFn over (topic, partition) with kafka-python.

Beam's own ReadFromKafka is a cross-language transform that needs Java; this one is pure Python
and runs on any runner. One element per partition; its restriction is the offset range still to
read. Each call polls one batch (up to `max_records`), claims it and defers the remainder, so a
bundle carries one batch and the runner checkpoints between batches. Records leave the source as
batches, never one element per record: per-element overhead dominates in Python.

Where reading starts is not Kafka's business: `start_offsets` come from the sink's state store,
which records offsets in the same transaction as the data they produced. Each partition is read
in one log epoch (ingest/epochs.py), which its batches carry with the fingerprint of their last
record; a log that restarts below the read position while the pipeline runs stops the pipeline
(LogRestartedError) instead of skipping the new log's first records.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import WalltimeWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration
from kafka import TopicPartition

from ingest.config import KafkaConfig
from ingest.epochs import LogRestartedError, record_fingerprint
from ingest.kafka_clients import make_consumer

END_OF_TIME = 2**63 - 1
IDLE_POLLS_TO_FINISH = 2


@dataclass(frozen=True)
class PartitionSpec:
    """One Kafka partition to read from `start_offset` of log epoch `epoch`; bounded runs stop
    once caught up."""

    topic: str
    partition: int
    start_offset: int
    stop_when_caught_up: bool = False
    epoch: int = 0


@dataclass
class RecordBatch:
    """Consecutive records of one partition: offsets [start_offset, next_offset) of log epoch `epoch`."""

    topic: str
    partition: int
    start_offset: int
    next_offset: int
    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.values)

    def last_record(self) -> str | None:
        """The fingerprint of the batch's last record (None for an empty batch)."""
        if not self.values:
            return None
        return record_fingerprint(self.offsets[-1], self.timestamps_ms[-1], self.keys[-1], self.values[-1])


class BatchCoder(beam.coders.Coder):
    """Pickles a batch, but estimates its size from its record count.

    Beam samples element sizes for its metrics through the coder; the default pickling coder
    would serialise every large batch just to weigh it.
    """

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value: Any) -> int:
        return 256 * len(value)


beam.coders.registry.register_coder(RecordBatch, BatchCoder)


class PartitionTracker(OffsetRestrictionTracker):
    """An offset tracker that the runner may checkpoint (split at the current position) but never
    split further ahead: a partition's offsets mean nothing until read, so a split at a fraction of
    [position, end of time) would start a second reader at an offset the log may never reach (Prism
    splits so)."""

    def try_split(self, fraction_of_remainder: float) -> tuple[OffsetRange, OffsetRange] | None:
        if fraction_of_remainder > 0:
            return None
        return super().try_split(0)


class _PartitionRestrictionProvider(RestrictionProvider):
    def initial_restriction(self, element: PartitionSpec) -> OffsetRange:
        return OffsetRange(element.start_offset, END_OF_TIME)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return PartitionTracker(restriction)

    def restriction_size(self, element: PartitionSpec, restriction: OffsetRange) -> int:
        # Unknown and unbounded: a constant keeps the runner from splitting on size.
        return 1

    def split(self, element: PartitionSpec, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction


class ReadPartitionBatches(beam.DoFn):
    """Splittable DoFn: PartitionSpec -> RecordBatch, one poll per call."""

    def __init__(self, kafka: KafkaConfig, max_records: int, poll_timeout_ms: int) -> None:
        self.kafka = kafka
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self._consumers: dict[tuple[str, int], Any] = {}
        self._idle_polls: dict[tuple[str, int], int] = {}

    def setup(self) -> None:
        self._consumers = {}
        self._idle_polls = {}

    def _consumer(self, spec: PartitionSpec) -> Any:
        key = (spec.topic, spec.partition)
        if key not in self._consumers:
            consumer = make_consumer(self.kafka, max_partition_fetch_bytes=8 * 1024 * 1024,
                                     fetch_max_bytes=32 * 1024 * 1024, fetch_max_wait_ms=self.poll_timeout_ms)
            consumer.assign([TopicPartition(spec.topic, spec.partition)])
            self._consumers[key] = consumer
        return self._consumers[key]

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        spec: PartitionSpec,
        tracker: OffsetRestrictionTracker = beam.DoFn.RestrictionParam(_PartitionRestrictionProvider()),
        # Holds the output watermark at processing time while the partition is read, so the
        # watermark behind Create does not reach the end of time under an unbounded read (a runner
        # collects keyed state at the end of its window).
        _watermark: Any = beam.DoFn.WatermarkEstimatorParam(WalltimeWatermarkEstimator.default_provider()),
    ) -> Iterator[RecordBatch]:
        tp = TopicPartition(spec.topic, spec.partition)
        key = (spec.topic, spec.partition)
        start = tracker.current_restriction().start
        consumer = self._consumer(spec)
        if consumer.position(tp) != start:
            consumer.seek(tp, start)
        records = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records).get(tp, [])
        if not records:
            highwater = consumer.highwater(tp)
            caught_up = highwater is not None and start >= highwater
            self._idle_polls[key] = self._idle_polls.get(key, 0) + 1 if caught_up else 0
            if spec.stop_when_caught_up and self._idle_polls[key] >= IDLE_POLLS_TO_FINISH:
                tracker.try_claim(END_OF_TIME)  # claims nothing; marks the restriction done
                return
            tracker.defer_remainder(Duration.of(0.05))
            return
        self._idle_polls[key] = 0
        batch = RecordBatch(spec.topic, spec.partition, start, start, epoch=spec.epoch)
        for record in records:
            if record.offset < start:
                # kafka-python drops records below the fetch position, so the broker moved the
                # position back: the log ended before it (a new broker). Reading on would skip
                # the new log's first records; the next start begins a new epoch instead.
                raise LogRestartedError(
                    f"The log of {spec.topic}[{spec.partition}] restarted under the running pipeline (the broker "
                    f"returned offset {record.offset}, below the read position {start}); restart the pipeline: "
                    "it reads the new log from its start as a new log epoch.")
            if not tracker.try_claim(record.offset):
                break
            batch.offsets.append(record.offset)
            batch.keys.append(record.key)
            batch.values.append(record.value)
            batch.timestamps_ms.append(record.timestamp)
            batch.next_offset = record.offset + 1
        if batch.next_offset != records[-1].offset + 1:
            # The runner split the restriction mid-batch: hand the unclaimed records back.
            consumer.seek(tp, batch.next_offset)
        if batch.values:
            yield batch
        tracker.defer_remainder()

    def teardown(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers = {}


class ReadFromKafkaPartitions(beam.PTransform):
    """PBegin -> PCollection[RecordBatch] for the given partitions and start offsets."""

    def __init__(self, kafka: KafkaConfig, partitions: list[PartitionSpec], max_records: int,
                 poll_timeout_ms: int) -> None:
        super().__init__()
        self.kafka = kafka
        self.partitions = partitions
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Partitions" >> beam.Create(self.partitions)
            | "Reshuffle" >> beam.Reshuffle()
            | "Poll" >> beam.ParDo(ReadPartitionBatches(self.kafka, self.max_records, self.poll_timeout_ms))
            .with_output_types(RecordBatch)
        )
