"""Configuration of the ingestion stage: where Kafka is, which topics, how the pipeline batches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EMBEDDED = "embedded"


class KafkaConfig(BaseModel):
    """How to reach Kafka. `bootstrap_servers="embedded"` means the broker `plum stack up` started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = EMBEDDED
    # Which broker `plum stack up` starts when bootstrap_servers is "embedded": Apache Kafka in
    # KRaft mode from its pinned Maven jars (log on disk in <state>/kafka, kept across `plum stack
    # down` / `up` and a kill of the broker), or the Tansu binary (log in memory; starts in 0.1 s).
    # Chosen by `plum bench broker` (docs/benchmarks.md).
    broker: Literal["apache-kafka", "tansu"] = "apache-kafka"
    broker_heap_mb: int = Field(512, ge=128)  # -Xmx of the embedded Apache Kafka
    events_topic: str = "plum.events"
    items_topic: str = "plum.items"
    dlq_topic: str = "plum.events.dlq"
    events_partitions: int = Field(4, ge=1)
    items_partitions: int = Field(1, ge=1)
    dlq_partitions: int = Field(1, ge=1)
    replication_factor: int = Field(1, ge=1)
    # Passed through to every kafka-python client (security_protocol, sasl_mechanism, ssl_cafile...).
    client_options: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_embedded(self) -> bool:
        return self.bootstrap_servers == EMBEDDED


class RewardConfig(BaseModel):
    """Reward of an event: a configured function of its type, rating and watch fraction.

    rating events: rating / rating_scale; watch events: watch_seconds / item_duration_seconds
    (clipped to [0, 1]), or `watch_without_duration` when the duration is unknown; every other
    type: its fixed value below.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    impression: float = 0.0
    click: float = 0.3
    like: float = 1.0
    dislike: float = 0.0
    watch_without_duration: float = 0.5


class PipelineConfig(BaseModel):
    """Sizes and policies of the streaming pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runner: str = "DirectRunner"
    consumer_group: str = "plum-pipeline"
    # How often the read positions are committed to the consumer group (at most; and once more when
    # the run ends). They are for standard tools only; the state store decides where reading resumes.
    # 0 = after every batch (a commit is about 4 ms on Apache Kafka here, 1 ms on Tansu).
    group_commit_interval_s: float = Field(1.0, ge=0)
    poll_max_records: int = Field(10000, ge=1)
    poll_timeout_ms: int = Field(50, ge=1)
    history_length: int = Field(50, ge=1)
    cooccurrence_window: int = Field(10, ge=1)
    # An event id is remembered for this long (event time) behind its user's newest event. An event
    # older than that can no longer be told from a duplicate: it goes to the dead-letter topic with
    # that reason instead of being applied or dropped (ingest/folds.py).
    dedup_retention_s: int = Field(7 * 86400, ge=1)
    max_payload_bytes: int = Field(65536, ge=256)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    # Prometheus metrics (ingest/metrics.py) on 127.0.0.1:<metrics_port>/metrics while `plum pipeline`
    # streams; 0 = off. Sampled from the state store and the broker every metrics_interval_s.
    metrics_port: int = Field(8502, ge=0, le=65535)
    metrics_interval_s: float = Field(5.0, gt=0)
    # fsync staged files, directories and SQLite commits (exactly-once after an OS crash or a power
    # loss). False exists only for `plum bench ingest` to measure what that costs.
    durable: bool = True
