"""WriteDeadLetters: rejected records to the dead-letter topic, flushed before the bundle ends.

The value is the record's original bytes (an expired event: the event re-encoded as JSON), the
reason and the record's source in headers. A runner commits a bundle (and with it the read
position of the records behind it) only after finish_bundle returns, so a dead letter is never
lost; a bundle retried after a crash may send one twice (the DLQ is at-least-once).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from ingest.config import KafkaConfig
from ingest.events import EngagementEvent
from ingest.kafka_clients import make_producer
from ingest.parse import ParsedBatch, Reject

DEAD_LETTERS = "dead_letters"  # the tag of the dead-letter output
EXPIRED_REASON = ("older than the de-duplication retention (pipeline.dedup_retention_s) behind the user's newest "
                  "event: cannot be told from a duplicate, so not applied")


def dead_letter_headers(reject: Reject) -> list[tuple[str, bytes]]:
    return [
        ("plum.dlq.reason", reject.reason.encode()),
        ("plum.source.topic", reject.topic.encode()),
        ("plum.source.partition", str(reject.partition).encode()),
        ("plum.source.offset", str(reject.offset).encode()),
    ]


def expired_dead_letter(topic: str, partition: int, offset: int, event: EngagementEvent) -> Reject:
    """The dead letter of an event older than the de-duplication retention (re-encoded as JSON)."""
    return Reject(topic, partition, offset, event.user_id.encode(), event.model_dump_json().encode(), EXPIRED_REASON)


def send_dead_letters(producer: Any, topic: str, rejects: Iterable[Reject]) -> int:
    """Send and flush; returns how many were sent (flush raises if one was not)."""
    sent = 0
    for reject in rejects:
        producer.send(topic, key=reject.key, value=reject.value, headers=dead_letter_headers(reject))
        sent += 1
    if sent:
        producer.flush()
    return sent


class _SendDeadLetters(beam.DoFn):
    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.sent = Metrics.counter("plum.ingest", "dlq_records")

    def setup(self) -> None:
        self.producer = make_producer(self.kafka)

    def start_bundle(self) -> None:
        self.pending: list[Reject] = []

    def process(self, reject: Reject) -> None:
        self.pending.append(reject)

    def finish_bundle(self) -> None:
        self.sent.inc(send_dead_letters(self.producer, self.kafka.dlq_topic, self.pending))
        self.pending = []

    def teardown(self) -> None:
        self.producer.close(timeout=10)


class WriteDeadLetters(beam.PTransform):
    """PCollection[Reject] -> the configured dead-letter topic."""

    def __init__(self, kafka: KafkaConfig) -> None:
        super().__init__()
        self.kafka = kafka

    def expand(self, rejects: beam.PCollection) -> beam.pvalue.PDone:
        rejects | "Send" >> beam.ParDo(_SendDeadLetters(self.kafka))
        return beam.pvalue.PDone(rejects.pipeline)


def split_dead_letters(batch: ParsedBatch) -> Iterator[Any]:
    """A ParsedBatch's rejects on the tagged dead-letter output, the batch without them on the main one."""
    for reject in batch.rejects:
        yield beam.pvalue.TaggedOutput(DEAD_LETTERS, reject)
    yield dataclasses.replace(batch, rejects=[])
