"""Parse and validate record batches; every bad record becomes a Reject with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

import apache_beam as beam
from apache_beam.metrics import Metrics
from pydantic import BaseModel, ValidationError

from ingest.events import EngagementEvent, ItemUpsert
from ingest.kafka_source import BatchCoder, RecordBatch

Parsed = Union[EngagementEvent, ItemUpsert]


@dataclass
class Reject:
    """A record that failed parsing or validation, with the original bytes kept intact."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


@dataclass
class ParsedBatch:
    """The valid records and the rejects of one RecordBatch; carries its offset range, log epoch
    and last record's fingerprint onward."""

    topic: str
    partition: int
    start_offset: int
    next_offset: int
    records: list[Parsed] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)  # the Kafka record timestamps of `records`
    rejects: list[Reject] = field(default_factory=list)
    epoch: int = 0
    last_record: str | None = None

    def __len__(self) -> int:
        return len(self.records) + len(self.rejects)

    def upserts(self) -> tuple[list[ItemUpsert], list[int], list[int]]:
        """The batch's item upserts, their offsets and their records' Kafka timestamps in unix seconds."""
        rows = [(r, o, t // 1000) for r, o, t in zip(self.records, self.offsets, self.timestamps_ms, strict=True)
                if isinstance(r, ItemUpsert)]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    @property
    def batch_id(self) -> str:
        """The batch's name in file names: partition, log epoch and offset range (unique across epochs)."""
        return (f"{self.topic}-{self.partition}-e{self.epoch:06d}-{self.start_offset:020d}-"
                f"{self.next_offset:020d}")


beam.coders.registry.register_coder(ParsedBatch, BatchCoder)


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        location = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{location}: {err['msg']}")
    return "; ".join(parts)


def parse_batch(batch: RecordBatch, model: type[BaseModel], max_payload_bytes: int) -> ParsedBatch:
    """Validate every record of a batch against `model` (pure; the DoFn below wraps it)."""
    out = ParsedBatch(batch.topic, batch.partition, batch.start_offset, batch.next_offset, epoch=batch.epoch,
                      last_record=batch.last_record())
    for offset, key, value, timestamp in zip(batch.offsets, batch.keys, batch.values, batch.timestamps_ms):
        if value is None:
            reason = "empty record (null value)"
        elif len(value) > max_payload_bytes:
            reason = f"payload of {len(value)} bytes exceeds the limit of {max_payload_bytes}"
        else:
            try:
                out.records.append(model.model_validate_json(value))
                out.offsets.append(offset)
                out.timestamps_ms.append(timestamp)
                continue
            except ValidationError as exc:
                reason = _reason(exc)
        out.rejects.append(Reject(batch.topic, batch.partition, offset, key, value, reason))
    return out


class ParseRecords(beam.DoFn):
    """RecordBatch -> ParsedBatch; counts valid and rejected records in Beam metrics."""

    def __init__(self, models_by_topic: dict[str, type[BaseModel]], max_payload_bytes: int) -> None:
        self.models_by_topic = models_by_topic
        self.max_payload_bytes = max_payload_bytes
        self.valid = Metrics.counter("plum.ingest", "records_valid")
        self.rejected = Metrics.counter("plum.ingest", "records_rejected")

    def process(self, batch: RecordBatch) -> Iterator[ParsedBatch]:
        model = self.models_by_topic[batch.topic]
        parsed = parse_batch(batch, model, self.max_payload_bytes)
        self.valid.inc(len(parsed.records))
        self.rejected.inc(len(parsed.rejects))
        yield parsed
