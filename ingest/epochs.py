"""Log epochs: telling that a partition's log restarted, so that its offsets are never mixed up.

The embedded broker keeps its log in memory, so a new broker starts every partition at offset 0
again (a topic deleted and recreated on a real cluster does the same). Offsets then name other
records than before: the pipeline would resume past the new log's start (or past its end), and
batch ids and file names built from offsets would repeat. So the pipeline counts incarnations of
each partition's log, its log epoch, in the state store (0 until a restart is seen); a new
epoch restarts the read position at offset 0, batch ids and training-log rows carry the epoch,
and the trainer orders (epoch, offset) instead of offsets alone.

At every start, the pipeline checks each partition it has read from; its log restarted when
1. the log ends before the furthest offset already read (a log shorter than what was read from
   it is not that log), or
2. the record just before the read position is not the one read there: the position keeps the
   fingerprint (offset, timestamp, key and value) of that record, recorded in the same state
   transaction as the batch, and the broker is asked for the record at that offset again. This
   catches a new log that has already grown past the old position (new events sent to a new
   broker before the pipeline started), which check 1 cannot see.
Both look at the log itself. Signals that were considered and not used:
- the consumer group's committed offset being missing: it is written after the state commit (a
  crash in between leaves it missing or behind for the same log), expires when the group is idle
  longer than the broker's offsets.retention.minutes (7 days by default), and may be reset by an
  operator; each false alarm would re-read a whole partition;
- the cluster id: Tansu reports the same one ("tansu_cluster") on every start, and a topic
  recreated on a real cluster keeps its cluster's id.
A record before the position that retention or compaction removed cannot be compared; then only
check 1 applies. `plum stack up`, which knows when it started a new in-memory broker, begins the
new epochs itself (PipelineStateStore.start_new_epochs). A log that restarts under a running
pipeline stops it (LogRestartedError, ingest/kafka_source.py); the next start sees the restart.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from kafka import TopicPartition

from ingest.config import KafkaConfig
from ingest.kafka_clients import KafkaUnavailableError, make_consumer
from ingest.state_store import PipelineStateStore

Partition = tuple[str, int]


class LogRestartedError(Exception):
    """A partition's log restarted below the read position while the pipeline was reading it."""


@dataclass(frozen=True)
class EpochChange:
    """A partition whose log restarted: reading resumes at offset 0 of log epoch `epoch`."""

    topic: str
    partition: int
    epoch: int
    reason: str


def record_fingerprint(offset: int, timestamp_ms: int, key: bytes | None, value: bytes | None) -> str:
    """A short digest identifying one appended record (a resend of the same bytes differs by its
    timestamp)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (str(offset).encode(), str(timestamp_ms).encode(), key, value):
        digest.update(b"\xff" * 8 if part is None else len(part).to_bytes(8, "big"))
        digest.update(part or b"")
    return digest.hexdigest()


def records_at(kafka: KafkaConfig, offsets: dict[Partition, int],
               timeout_s: float = 10.0) -> dict[Partition, str | None]:
    """The fingerprint of the record at each partition's given offset; None where the log no
    longer holds it (removed by retention or compaction). Each offset must be below its log's end."""
    if not offsets:
        return {}
    consumer = make_consumer(kafka, fetch_max_wait_ms=10, max_partition_fetch_bytes=65536)
    wanted = {TopicPartition(t, p): offset for (t, p), offset in offsets.items()}
    found: dict[TopicPartition, str | None] = {}
    try:
        consumer.assign(list(wanted))
        for tp, offset in wanted.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(found) < len(wanted):
            if time.monotonic() > deadline:
                missing = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in wanted if tp not in found)
                raise KafkaUnavailableError(f"Kafka returned no record of {missing} within {timeout_s:.0f} s.")
            for tp, records in consumer.poll(timeout_ms=50, max_records=500).items():
                # The first record at or after the offset (auto_offset_reset moves past a removed one).
                first = next((r for r in records if r.offset >= wanted[tp]), None)
                if first is None or tp in found:
                    continue
                kept = first.offset == wanted[tp]
                found[tp] = record_fingerprint(first.offset, first.timestamp, first.key, first.value) if kept else None
                consumer.pause(tp)
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): fingerprint for tp, fingerprint in found.items()}


def start_new_epochs(kafka: KafkaConfig, store: PipelineStateStore, ends: dict[Partition, int]) -> list[EpochChange]:
    """Check every partition of `ends` (its log's end offset) that `store` has read from; begin a
    new log epoch for each whose log restarted (see the module docstring). Returns the changes."""
    positions = store.positions()
    reasons: dict[Partition, str] = {}
    compare: dict[Partition, int] = {}
    for key, end in ends.items():
        position = positions.get(key)
        if position is None:
            continue
        if end < position.furthest_offset:
            reasons[key] = f"its log ends at offset {end}, before offset {position.furthest_offset} already read"
        elif position.next_offset > 0 and position.last_record is not None:
            compare[key] = position.next_offset - 1
    for key, fingerprint in records_at(kafka, compare).items():
        if fingerprint is not None and fingerprint != positions[key].last_record:
            reasons[key] = f"its record at offset {compare[key]} is not the one read there"
    return [EpochChange(topic, partition, store.start_epoch(topic, partition), reason)
            for (topic, partition), reason in sorted(reasons.items())]
