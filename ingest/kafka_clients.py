"""kafka-python clients built from KafkaConfig, and the topic layout the pipeline expects."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from ingest.config import KafkaConfig

# kafka-python warns whenever a poll is slow to return to its event loop; a batch pipeline holding
# the GIL for a moment is expected here, and the warning buries the progress output.
logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


class KafkaUnavailableError(Exception):
    """Kafka cannot be reached at the configured address."""


def _options(cfg: KafkaConfig, **extra: Any) -> dict[str, Any]:
    if cfg.is_embedded:
        raise KafkaUnavailableError(
            "kafka.bootstrap_servers is 'embedded' but no embedded broker address was resolved; "
            "run `plum stack up` first or set kafka.bootstrap_servers."
        )
    return {"bootstrap_servers": cfg.bootstrap_servers.split(","), **cfg.client_options, **extra}


def probe(cfg: KafkaConfig, timeout: float = 3.0) -> None:
    """Fail fast, with the address in the message, when no bootstrap server accepts a connection."""
    for server in _options(cfg)["bootstrap_servers"]:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=timeout):
                return
        except (OSError, ValueError):
            continue
    raise KafkaUnavailableError(f"No Kafka broker answers at {cfg.bootstrap_servers}; is it running?")


def make_producer(cfg: KafkaConfig, **extra: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and retries transient errors."""
    options = {"acks": "all", "retries": 10, "linger_ms": 5, "batch_size": 256 * 1024,
               "max_in_flight_requests_per_connection": 1, **extra}
    try:
        return KafkaProducer(**_options(cfg, **options))
    except KafkaTimeoutError:
        raise KafkaUnavailableError(f"No Kafka broker answers at {cfg.bootstrap_servers}.") from None


def make_consumer(cfg: KafkaConfig, **extra: Any) -> KafkaConsumer:
    """A consumer with auto-commit off: offsets are stored by whoever owns the sinks."""
    options = {"enable_auto_commit": False, "auto_offset_reset": "earliest", **extra}
    try:
        return KafkaConsumer(**_options(cfg, **options))
    except KafkaTimeoutError:
        raise KafkaUnavailableError(f"No Kafka broker answers at {cfg.bootstrap_servers}.") from None


def topic_layout(cfg: KafkaConfig) -> dict[str, int]:
    """Topic name -> partition count."""
    return {
        cfg.events_topic: cfg.events_partitions,
        cfg.items_topic: cfg.items_partitions,
        cfg.dlq_topic: cfg.dlq_partitions,
    }


def ensure_topics(cfg: KafkaConfig) -> dict[str, int]:
    """Create the project's topics where missing; returns the partition count each topic has."""
    try:
        admin = KafkaAdminClient(**_options(cfg))
    except KafkaTimeoutError:
        raise KafkaUnavailableError(f"No Kafka broker answers at {cfg.bootstrap_servers}.") from None
    try:
        existing = set(admin.list_topics())
        for name, partitions in topic_layout(cfg).items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, cfg.replication_factor)])
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        raise KafkaUnavailableError(f"Could not create topics at {cfg.bootstrap_servers}: {exc}") from None
    finally:
        admin.close()
    return topic_partitions(cfg, list(topic_layout(cfg)))


def topic_partitions(cfg: KafkaConfig, topics: list[str]) -> dict[str, int]:
    """The number of partitions of each topic as the cluster reports it (0 if it does not exist)."""
    consumer = make_consumer(cfg)
    try:
        return {topic: len(consumer.partitions_for_topic(topic) or ()) for topic in topics}
    finally:
        consumer.close()


def end_offsets(cfg: KafkaConfig, topic: str, partitions: int, timeout_s: float = 10.0) -> dict[int, int]:
    """The high watermark of each partition, read from fetch responses.

    ListOffsets is not used: the embedded broker (Tansu 0.6) answers it with the base offset of
    the last record batch plus one, which undercounts a partition whose last batch holds many
    records. A fetch response carries the true high watermark.
    """
    from kafka import TopicPartition

    # Tiny, short fetches: only the watermark in the response matters, not the records.
    consumer = make_consumer(cfg, fetch_max_wait_ms=10, max_partition_fetch_bytes=1024, fetch_max_bytes=65536)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.highwater(tp) is None for tp in tps):
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"Kafka did not report the end of {topic} within {timeout_s:.0f} s.")
            consumer.poll(timeout_ms=20, max_records=1)
        return {tp.partition: consumer.highwater(tp) for tp in tps}
    finally:
        consumer.close()
