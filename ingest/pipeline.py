"""The streaming ingestion pipeline: Kafka -> parse/validate -> de-duplicate -> state -> sinks.

The transforms are runner-agnostic; the runner is an option (DirectRunner here, FlinkRunner or
DataflowRunner at scale). `until_caught_up` turns the unbounded read into a bounded catch-up:
each partition stops once it has read everything that was there. Before reading, every
partition whose log restarted since the last run (a new broker) begins a new log epoch, read
from offset 0 (ingest/epochs.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from ingest.config import KafkaConfig
from ingest.epochs import LogRestartedError, start_new_epochs
from ingest.events import EngagementEvent, ItemUpsert
from ingest.folds import UserFoldSettings
from ingest.kafka_clients import end_offsets, topic_partitions
from ingest.kafka_source import PartitionSpec, ReadFromKafkaPartitions
from ingest.parse import ParsedBatch, ParseRecords
from ingest.sinks import ApplyBatches, SinkSettings, close_shared_appliers
from ingest.state_store import PipelineStateStore, ReadPosition
from ingest.transforms.batches import GatherUserBatches
from ingest.transforms.dead_letters import DEAD_LETTERS, WriteDeadLetters, split_dead_letters
from ingest.transforms.item_state import FoldItems, KeepItemMetadata
from ingest.transforms.stores import StoreSettings
from ingest.transforms.user_state import FoldUsers
from ingest.transforms.writes import WriteItemMetadata, WriteItemStats, WriteUserBatches

log = logging.getLogger(__name__)


class TopicMissingError(Exception):
    """A topic the pipeline reads does not exist on the cluster."""


class PipelineBusyError(Exception):
    """Another pipeline process already owns this state store."""


class IncompleteRunError(Exception):
    """A bounded run ended before every partition was read to the end it had at the start."""


@dataclass
class PipelineResult:
    events_applied: int
    events_duplicate: int
    items_upserted: int
    records_rejected: int
    events_expired: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events_applied / self.seconds if self.seconds > 0 else 0.0


def log_ends(kafka: KafkaConfig) -> dict[tuple[str, int], int]:
    """The end offset of every partition of the events and items topics (TopicMissingError if one
    of them does not exist)."""
    counts = topic_partitions(kafka, [kafka.events_topic, kafka.items_topic])
    missing = [t for t, n in counts.items() if n == 0]
    if missing:
        raise TopicMissingError(f"Topic(s) {', '.join(missing)} do not exist; run `plum stack up` or create them.")
    return {(topic, p): end for topic, n in counts.items() for p, end in end_offsets(kafka, topic, n).items()}


def partition_specs(settings: SinkSettings, store: PipelineStateStore, ends: dict[tuple[str, int], int],
                    until_caught_up: bool) -> list[PartitionSpec]:
    """One spec per partition of `ends`, starting at the stored position of its log epoch, after a
    new epoch began for each partition whose log restarted."""
    for change in start_new_epochs(settings.kafka, store, ends):
        print(f"pipeline: {change.topic}[{change.partition}] restarted ({change.reason}): reading its new log from "
              f"offset 0 as log epoch {change.epoch}", flush=True)
    positions = store.positions()
    never_read = ReadPosition(0, 0, None, 0)
    specs = []
    for topic, p in sorted(ends):
        position = positions.get((topic, p), never_read)
        specs.append(PartitionSpec(topic, p, position.next_offset, until_caught_up, position.epoch))
    return specs


def build(pipeline: beam.Pipeline, settings: SinkSettings, partitions: list[PartitionSpec]) -> beam.PCollection:
    """Add the ingestion transforms to `pipeline`; returns the per-batch counts."""
    kafka, cfg = settings.kafka, settings.pipeline
    models = {kafka.events_topic: EngagementEvent, kafka.items_topic: ItemUpsert}
    return (
        pipeline
        | "ReadKafka" >> ReadFromKafkaPartitions(kafka, partitions, cfg.poll_max_records, cfg.poll_timeout_ms)
        | "ParseAndValidate" >> beam.ParDo(ParseRecords(models, cfg.max_payload_bytes)).with_output_types(ParsedBatch)
        | "ApplyToSinks" >> beam.ParDo(ApplyBatches(settings))
    )


def build_with_runner_state(pipeline: beam.Pipeline, settings: SinkSettings, partitions: list[PartitionSpec]) -> None:
    """The same ingestion with every piece of state in the runner (Beam keyed state, which Flink or
    Dataflow checkpoint and redistribute): parse -> dead letters; per-user folds -> the batch put
    back together -> training log and user views; per-item folds -> item_stats; upserts ->
    item_metadata. The folds and frames are those of the embedded backend (ingest/folds.py,
    ingest/frames.py); only where the state lives differs."""
    kafka, cfg = settings.kafka, settings.pipeline
    stores = StoreSettings(settings.feast, settings.feast_repo_dir, settings.training_log_dir, cfg.durable)
    models = {kafka.events_topic: EngagementEvent, kafka.items_topic: ItemUpsert}
    parsed = (
        pipeline
        | "ReadKafka" >> ReadFromKafkaPartitions(kafka, partitions, cfg.poll_max_records, cfg.poll_timeout_ms)
        | "ParseAndValidate" >> beam.ParDo(ParseRecords(models, cfg.max_payload_bytes)).with_output_types(ParsedBatch)
        | "SplitDeadLetters" >> beam.FlatMap(split_dead_letters).with_outputs(DEAD_LETTERS, main="batches")
    )
    events = parsed.batches | "Events" >> beam.Filter(lambda b: b.topic == kafka.events_topic)
    upserts = parsed.batches | "Upserts" >> beam.Filter(lambda b: b.topic == kafka.items_topic)
    folded = events | "FoldUsers" >> FoldUsers(UserFoldSettings.of(cfg), stores)
    ((parsed[DEAD_LETTERS], folded[DEAD_LETTERS]) | "AllDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> WriteDeadLetters(kafka))
    user_batches = folded.updates | "GatherUserBatches" >> GatherUserBatches()
    user_batches | "WriteUserBatches" >> beam.ParDo(WriteUserBatches(stores))
    user_batches | "FoldItems" >> FoldItems(stores) | "WriteItemStats" >> beam.ParDo(WriteItemStats(stores))
    upserts | "WriteItemMetadata" >> beam.ParDo(WriteItemMetadata(stores))
    upserts | "KeepItemMetadata" >> KeepItemMetadata(stores)


def pipeline_options(runner: str, streaming: bool, extra_args: list[str] | None = None) -> PipelineOptions:
    args = list(extra_args or [])
    if runner == "PrismRunner":
        # Beam's DirectRunner tries Prism first (fetching its binary from the internet, which fails
        # here) and keeps that job server for the whole process: a Prism run must start its own.
        args.append("--experiments=disable_prism_server_singleton")
        # Prism (v2.77.0) splits a slow bundle and frees the keys of the residual elements while the
        # primary half may still hold the same key, so a second bundle reads that key's state before
        # the first commits it and one of the two updates is lost. Without splits a key's elements
        # stay in one bundle at a time, as on Flink.
        args.append("--experiments=prism_disable_sdf_split")
    options = PipelineOptions(args)
    options.view_as(StandardOptions).runner = runner
    options.view_as(StandardOptions).streaming = streaming
    if runner == "DirectRunner":
        options.view_as(DirectOptions).direct_running_mode = "in_memory"
    return options


@contextmanager
def pid_lock(path: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on `path` (this process's pid written inside) until the block ends;
    when another process holds it, raise busy(its pid, or "unknown") at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(handle.read().strip() or "unknown") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_RUNNER_SUFFIX = re.compile(r"\s*\[while running '[^']*'\]\)?$")  # what Beam appends to a DoFn's error


def log_restart_in(exc: BaseException) -> LogRestartedError | None:
    """The LogRestartedError a runner failed with, if any: runners re-raise a DoFn's exception wrapped
    (its class kept in the chain, or only its text in the message)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LogRestartedError):
            return LogRestartedError(_RUNNER_SUFFIX.sub("", str(exc).splitlines()[0]))
        match = re.search(r"LogRestartedError: (.+)", str(exc))
        if match:
            return LogRestartedError(_RUNNER_SUFFIX.sub("", match[1].strip()))
        exc = exc.__cause__ or exc.__context__
    return None


def state_lock(state_db: Path) -> AbstractContextManager[None]:
    """One pipeline per state store: a second would only re-read and de-duplicate the first's work."""
    return pid_lock(state_db.with_suffix(".lock"), lambda owner: PipelineBusyError(
        f"Another pipeline (pid {owner}) is running with state {state_db.parent}; stop it first."))


def run(settings: SinkSettings, until_caught_up: bool = False, extra_args: list[str] | None = None,
        while_running: AbstractContextManager[Any] | None = None) -> PipelineResult:
    """Run the pipeline to completion (bounded) or until interrupted (unbounded). `while_running` is
    entered once this process owns the state store and left when the run ends (metrics, status records)."""
    with state_lock(Path(settings.state_db)), while_running or nullcontext():
        return _run(settings, until_caught_up, extra_args)


def _run(settings: SinkSettings, until_caught_up: bool, extra_args: list[str] | None) -> PipelineResult:
    ends = log_ends(settings.kafka)
    targets = ends if until_caught_up else {}
    store = PipelineStateStore(Path(settings.state_db), durable=settings.pipeline.durable)
    try:
        partitions = partition_specs(settings, store, ends, until_caught_up)
        before = store.counters()
    finally:
        store.close()
    started = time.monotonic()
    options = pipeline_options(settings.pipeline.runner, streaming=True, extra_args=extra_args)
    try:
        with beam.Pipeline(options=options) as pipeline:
            build(pipeline, settings, partitions)
    except Exception as exc:
        restarted = log_restart_in(exc)
        if restarted is None:
            raise
        raise restarted from None
    finally:
        close_shared_appliers()
    seconds = time.monotonic() - started
    store = PipelineStateStore(Path(settings.state_db))
    after = store.counters()
    positions = store.read_positions()
    store.close()
    # A guard, not a formality: the runner decides when an SDF is done, and this proves it read everything.
    behind = {key: end for key, end in targets.items() if positions.get(key, 0) < end}
    if behind:
        detail = ", ".join(f"{t}[{p}] at {positions.get((t, p), 0)} of {end}" for (t, p), end in sorted(behind.items()))
        raise IncompleteRunError(f"The pipeline stopped before catching up: {detail}; run it again to continue.")

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    return PipelineResult(delta("events_applied"), delta("events_duplicate"), delta("items_upserted"),
                          delta("records_rejected"), delta("events_expired"), seconds)


def counters(state_db: Path) -> dict[str, Any]:
    """Totals the pipeline has recorded in its state store."""
    store = PipelineStateStore(state_db)
    try:
        return store.counters()
    finally:
        store.close()
