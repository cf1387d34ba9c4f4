"""Producer API for production systems: batched, acks=all, retries, stable event ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from kafka.errors import KafkaError

from ingest.config import KafkaConfig
from ingest.events import EngagementEvent, ItemUpsert, stable_event_id
from ingest.kafka_clients import make_producer


class DeliveryError(Exception):
    """Some records were not acknowledged by Kafka after all retries."""


def new_event(namespace: str, *, user_id: str, item_id: str, event_type: str, event_time: datetime,
              **fields: Any) -> EngagementEvent:
    """An EngagementEvent whose id is derived from its content, so a resend is de-duplicated downstream."""
    event_id = stable_event_id(namespace, user_id, item_id, event_type, event_time)
    return EngagementEvent(event_id=event_id, user_id=user_id, item_id=item_id, event_type=event_type,
                           event_time=event_time, **fields)


class EventProducer:
    """Sends events (key user_id) and item upserts (key item_id) as JSON; `flush()` raises on lost records."""

    def __init__(self, cfg: KafkaConfig, **producer_options: Any) -> None:
        self.cfg = cfg
        self._producer = make_producer(cfg, **producer_options)
        self._failures: list[str] = []
        self.sent = 0

    def _on_error(self, exc: BaseException) -> None:
        self._failures.append(str(exc))

    def _send(self, topic: str, key: str, value: bytes) -> None:
        future = self._producer.send(topic, key=key.encode(), value=value)
        future.add_errback(self._on_error)
        self.sent += 1

    def send_event(self, event: EngagementEvent) -> None:
        self._send(self.cfg.events_topic, event.user_id, event.model_dump_json(exclude_none=True).encode())

    def send_item(self, item: ItemUpsert) -> None:
        self._send(self.cfg.items_topic, item.item_id, item.model_dump_json(exclude_none=True).encode())

    def send_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (tests and tools that need malformed records)."""
        self._producer.send(topic, key=key, value=value).add_errback(self._on_error)
        self.sent += 1

    def send_events(self, events: Iterable[EngagementEvent]) -> int:
        n = 0
        for event in events:
            self.send_event(event)
            n += 1
        return n

    def flush(self, timeout: float | None = 60.0) -> None:
        """Block until every record sent so far is acknowledged; raise DeliveryError otherwise."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise DeliveryError(f"Kafka did not acknowledge all records: {exc}") from None
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(f"{len(failures)} records were not delivered; first error: {failures[0]}")

    def close(self, timeout: float = 60.0) -> None:
        """Flush (raising DeliveryError for anything unacknowledged), then release the connection."""
        try:
            self.flush(timeout)
        finally:
            try:
                self._producer.close(timeout=timeout)
            except KafkaError:
                pass  # only undelivered records make close fail, and flush has reported them

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._producer.close(timeout=5)
