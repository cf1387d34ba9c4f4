"""The embedded state backend's sinks, applied batch by batch with one commit protocol (the
DirectRunner keeps no state of its own; on a runner that does, ingest/transforms/ holds the
state and writes instead, through the same folds and frames).

For each parsed batch, under one process-wide lock:
  1. one state transaction: fold the events into their users' state (ingest/folds.py:
     de-duplication, histories, latest context values, pairs), merge item stats and
     co-occurrences, replace item metadata, stage the training-log files and the Feast offline
     files, record the offsets and a pending-publication entry;
  2. before its commit, rejects and expired events go to the dead-letter topic (value = the
     original bytes, the reason in headers) and the producer is flushed; commit;
  3. publish: rename the staged files into place, push the changed entities' absolute
     feature values to the Feast online store, clear the pending entry;
  4. commit the partition's read position to the Kafka consumer group (so standard tools see
     the lag; the state store, not Kafka, decides where reading resumes): at most every
     `pipeline.group_commit_interval_s`, the newest position of each partition, and once more when
     the run ends.
A crash anywhere leaves either an uncommitted batch (its staged files are discarded and its
records re-read) or a committed one whose publication `recover()` completes: no event is lost,
none is applied twice. Every write is idempotent, so recovery may repeat any step. Staged files
are fsynced before the commit and renames before the pending entry is cleared, and SQLite syncs
every commit, so this holds after an OS crash or a power loss too (`pipeline.durable`).

A batch id names the partition, its log epoch and the offset range, `<topic>-<partition>-e<epoch>-
<start>-<next>`: unique across broker restarts, so a published file is never overwritten (a
publication onto an existing name with other content raises PublishConflictError).

Context features: the state keeps each user's latest value of every context key; the view
user_context carries the registered ones (features/registry.py). Before each batch the applier
looks at the registry; a feature registered since the last look is filled first: every stored
user value of it is pushed (online and offline), then recorded as filled, so a user need not send
another event for serving to see it. The pipeline picks up a registration without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam
import pandas as pd
from apache_beam.metrics import Metrics
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from features import FeatureStoreClient
from features.config import FeastConfig
from features.registry import ContextFeatureSpec
from features.repo import USER_CONTEXT
from ingest.config import KafkaConfig, PipelineConfig
from ingest.events import EngagementEvent
from ingest.kafka_clients import make_consumer, make_producer
from ingest.parse import ParsedBatch, Reject
from ingest.folds import UserFoldSettings
from ingest.frames import user_context_frame, view_frames
from ingest.state_store import PipelineStateStore
from ingest.training_log import TrainingLogWriter
from ingest.transforms.dead_letters import expired_dead_letter, send_dead_letters

log = logging.getLogger(__name__)

VIEWS = ("user_history", "item_stats", "item_metadata")  # the views this pipeline writes (+ user_context)


@dataclass(frozen=True)
class SinkSettings:
    """Everything the sinks need; picklable so Beam can ship it to workers."""

    kafka: KafkaConfig
    pipeline: PipelineConfig
    feast: FeastConfig
    feast_repo_dir: str
    state_db: str
    training_log_dir: str
    progress_interval_s: float | None = 5.0  # None: no progress lines


class ProgressReporter:
    """Prints totals every `interval` seconds from whichever thread applies a batch, with the rate
    since the previous line (a streaming pipeline runs for days: an average since its start would
    say 0/s while events arrive)."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self.last = time.monotonic()
        self.last_events = 0
        self.totals = {"events": 0, "duplicates": 0, "items": 0, "rejected": 0, "expired": 0}

    def add(self, counts: dict[str, int]) -> None:
        for key in self.totals:
            self.totals[key] += counts.get(key, 0)
        now = time.monotonic()
        if self.interval is not None and now - self.last >= self.interval:
            t = self.totals
            rate = (t["events"] - self.last_events) / (now - self.last)
            self.last, self.last_events = now, t["events"]
            print(f"pipeline: {t['events']:,} events applied ({rate:,.1f}/s lately), {t['duplicates']:,} duplicates, "
                  f"{t['items']:,} item upserts, {t['rejected'] + t['expired']:,} to the DLQ", flush=True)


class BatchApplier:
    """Applies parsed batches to every sink with the commit protocol above. Thread-safe."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        durable = settings.pipeline.durable
        self.state = PipelineStateStore(Path(settings.state_db), UserFoldSettings.of(settings.pipeline), durable)
        self.training_log = TrainingLogWriter(Path(settings.training_log_dir), durable)
        self.features = FeatureStoreClient(Path(settings.feast_repo_dir), settings.feast, durable)
        self._producer: Any = None
        self._committer: Any = None
        self._uncommitted: dict[TopicPartition, int] = {}  # partition -> read position not yet in the group
        self._last_group_commit = 0.0
        self.progress = ProgressReporter(settings.progress_interval_s)
        self._filled = self.state.filled_context_features()

    def _dlq_producer(self) -> Any:
        if self._producer is None:
            self._producer = make_producer(self.settings.kafka)
        return self._producer

    def _send_rejects(self, rejects: list[Reject]) -> None:
        if rejects:
            send_dead_letters(self._dlq_producer(), self.settings.kafka.dlq_topic, rejects)

    def apply(self, batch: ParsedBatch) -> dict[str, int]:
        """Apply one batch to all sinks; returns counts of what it did."""
        with self.lock:
            specs = self._context_features()
            batch_id = batch.batch_id
            events = [r for r in batch.records if isinstance(r, EngagementEvent)]
            upserts, _, upserted_at = batch.upserts()
            offset_of = {r.event_id: o for r, o in zip(batch.records, batch.offsets) if isinstance(r, EngagementEvent)}
            self.state.begin()
            try:
                changes = self.state.apply_events(events)
                # Before the commit: a crash after it must not lose a dead letter (a crash before
                # it re-reads the batch and may send one twice).
                expired = [expired_dead_letter(batch.topic, batch.partition, offset_of[e.event_id], e)
                           for e in changes.expired]
                self._send_rejects(batch.rejects + expired)
                metadata = self.state.apply_items(upserts, upserted_at) if upserts else []
                self.training_log.stage(batch_id, changes.new_events, changes.rewards, batch.partition,
                                        [offset_of[e.event_id] for e in changes.new_events], batch.epoch)
                frames = view_frames(changes.users, changes.items, metadata, changes.contexts, specs)
                for view, frame in frames.items():
                    self.features.stage_offline(view, frame, batch_id)
                self.state.record_batch(batch.topic, batch.partition, batch.start_offset, batch.next_offset,
                                        len(batch.rejects), batch.epoch, batch.last_record)
                self.state.add_pending(batch_id, [u.user_id for u in changes.users],
                                       [s.item_id for s in changes.items], [m.item_id for m in metadata])
                self.state.commit()
            except BaseException:
                self.state.rollback()
                self.training_log.discard(batch_id)
                for view in self._views(specs):
                    self.features.discard_offline(view, batch_id)
                raise
            self._publish(batch_id, frames)
            self._commit_position(batch.topic, batch.partition)
            counts = {"events": len(changes.new_events), "duplicates": changes.duplicates,
                      "items": len(upserts), "rejected": len(batch.rejects), "expired": len(changes.expired)}
            self.progress.add(counts)
            return counts

    @staticmethod
    def _views(specs: list[ContextFeatureSpec]) -> tuple[str, ...]:
        return (*VIEWS, USER_CONTEXT) if specs else VIEWS

    def _context_features(self) -> list[ContextFeatureSpec]:
        """The registered context features; one registered since the last batch is filled first."""
        specs = self.features.context_specs()
        new = {s.name for s in specs} - self._filled
        if new:
            self.features.align_offline(USER_CONTEXT)
            tag = hashlib.sha1(",".join(sorted(new)).encode()).hexdigest()[:12]
            pushed = 0
            for i, contexts in enumerate(self.state.contexts_with(new)):
                contexts = self.state.restate_contexts(contexts)
                frame = user_context_frame(contexts, specs)
                self.features.write_offline(USER_CONTEXT, frame, f"context-fill-{tag}-{i:06d}")
                self.features.push_online(USER_CONTEXT, frame)
                pushed += len(frame)
            self.state.mark_context_features_filled(new)
            self._filled |= new
            print(f"pipeline: context feature(s) {', '.join(sorted(new))} registered: their latest values of "
                  f"{pushed:,} users are now in the online store (view {USER_CONTEXT})", flush=True)
        return specs

    def _publish(self, batch_id: str, frames: dict[str, pd.DataFrame]) -> None:
        self.training_log.publish(batch_id)
        for view, frame in frames.items():
            self.features.publish_offline(view, batch_id)
            self.features.push_online(view, frame)
        self.state.clear_pending(batch_id)

    def _commit_position(self, topic: str, partition: int) -> None:
        self._uncommitted[TopicPartition(topic, partition)] = self.state.read_position(topic, partition)
        if time.monotonic() - self._last_group_commit >= self.settings.pipeline.group_commit_interval_s:
            self._commit_positions()

    def _commit_positions(self) -> None:
        """Commit every partition's newest read position to the consumer group in one request."""
        if not self._uncommitted:
            return
        if self._committer is None:
            self._committer = make_consumer(self.settings.kafka, group_id=self.settings.pipeline.consumer_group)
        self._committer.commit({tp: OffsetAndMetadata(position, "", -1) for tp, position in self._uncommitted.items()})
        self._uncommitted = {}
        self._last_group_commit = time.monotonic()

    def recover(self) -> int:
        """Finish what a crash interrupted: publish committed batches, discard uncommitted ones."""
        with self.lock:
            specs = self.features.context_specs()
            pending = self.state.pending()
            committed = {batch_id for batch_id, *_ in pending}
            for batch_id in self.training_log.staged_batches():
                if batch_id not in committed:
                    self.training_log.discard(batch_id)
            for view, batch_id in self.features.pending_offline(self._views(specs)):
                if batch_id not in committed:
                    self.features.discard_offline(view, batch_id)
            for batch_id, users, items, metadata_items in pending:
                # A batch's context changes are among its users' contexts; pushing all of them is harmless.
                frames = view_frames(
                    list(self.state.load_users(users).values()),
                    list(self.state.load_items(items).values()),
                    list(self.state.load_metadata(metadata_items).values()),
                    list(self.state.load_contexts(users).values()), specs,
                )
                # Offline files were staged in the committed transaction; online values are re-read.
                self._publish(batch_id, frames)
            return len(pending)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
        with self.lock:
            try:
                self._commit_positions()
            except KafkaError as exc:  # informational only: the state store holds the positions
                log.warning("could not commit the last read positions to consumer group %s: %s",
                            self.settings.pipeline.consumer_group, exc)
        if self._committer is not None:
            self._committer.close()
        self.state.close()


_APPLIERS: dict[str, BatchApplier] = {}
_APPLIERS_LOCK = threading.Lock()


def shared_applier(settings: SinkSettings) -> BatchApplier:
    """One applier per process and state store: DoFn instances on runner threads share it."""
    with _APPLIERS_LOCK:
        if settings.state_db not in _APPLIERS:
            applier = BatchApplier(settings)
            applier.recover()
            _APPLIERS[settings.state_db] = applier
        return _APPLIERS[settings.state_db]


def close_shared_appliers() -> None:
    with _APPLIERS_LOCK:
        for applier in _APPLIERS.values():
            applier.close()
        _APPLIERS.clear()


class ApplyBatches(beam.DoFn):
    """ParsedBatch -> per-batch counts, after every sink has flushed."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.events = Metrics.counter("plum.ingest", "events_applied")
        self.duplicates = Metrics.counter("plum.ingest", "events_duplicate")
        self.items = Metrics.counter("plum.ingest", "items_upserted")
        self.dlq = Metrics.counter("plum.ingest", "dlq_records")

    def setup(self) -> None:
        self.applier = shared_applier(self.settings)

    def process(self, batch: ParsedBatch) -> Iterator[dict[str, Any]]:
        counts = self.applier.apply(batch)
        self.events.inc(counts["events"])
        self.duplicates.inc(counts["duplicates"])
        self.items.inc(counts["items"])
        self.dlq.inc(counts["rejected"] + counts["expired"])
        yield {"topic": batch.topic, "partition": batch.partition, "next_offset": batch.next_offset, **counts}
