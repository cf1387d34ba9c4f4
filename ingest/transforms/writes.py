"""The file sinks when the runner owns the state: idempotent under replay from a checkpoint.

Every write is a file named by its source batch id, which is unique across broker epochs and,
once the runner restores its state, always gets the same bytes (the training log and the Feast
offline files: publishing the same bytes onto the same name is a no-op, other bytes are refused
with PublishConflictError). The online values are written by the keys' owners instead
(ingest/transforms/stores.py). Each DoFn opens its own clients in setup: nothing is shared between
workers but the stores themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam

from ingest.folds import item_metadata
from ingest.frames import view_frames
from ingest.parse import ParsedBatch
from ingest.training_log import TrainingLogWriter
from ingest.transforms.batches import UserBatch
from ingest.transforms.item_state import ItemPart
from ingest.transforms.stores import StoreSettings


class _FeatureWriter(beam.DoFn):
    def __init__(self, stores: StoreSettings) -> None:
        self.stores = stores

    def setup(self) -> None:
        self.features = self.stores.open_features()

    def write_views(self, batch_id: str, frames: dict[str, Any]) -> None:
        for view, frame in frames.items():  # a batch id published before (a replay) keeps its file
            self.features.write_offline(view, frame, batch_id)


class WriteUserBatches(_FeatureWriter):
    """UserBatch -> the training log (one file per event hour, named by the batch) and the users'
    user_history and user_context rows, offline under the batch id."""

    def setup(self) -> None:
        super().setup()
        self.training_log = TrainingLogWriter(Path(self.stores.training_log_dir), self.stores.durable)

    def start_bundle(self) -> None:
        self.specs = self.features.context_specs()

    def process(self, batch: UserBatch) -> Iterator[str]:
        self.training_log.stage(batch.batch_id, batch.new_events, batch.rewards, batch.partition, batch.offsets,
                                batch.epoch)
        self.training_log.publish(batch.batch_id)
        self.write_views(batch.batch_id, view_frames(batch.users, [], [], batch.contexts, self.specs))
        yield batch.batch_id


class WriteItemStats(_FeatureWriter):
    """(batch_id, [ItemPart]) -> item_stats rows, offline under the batch id."""

    def process(self, element: tuple[str, list[ItemPart]]) -> Iterator[str]:
        batch_id, parts = element
        stats = sorted((p.stats for p in parts), key=lambda s: s.item_id)
        self.write_views(batch_id, view_frames([], stats, [], [], []))
        yield batch_id


class WriteItemMetadata(_FeatureWriter):
    """A parsed batch of the items topic -> item_metadata rows (the last upsert of an item wins;
    updated_at is the record's Kafka timestamp), offline under the batch id."""

    def process(self, batch: ParsedBatch) -> Iterator[str]:
        upserts, _, upserted_at = batch.upserts()
        metadata = item_metadata(upserts, upserted_at)
        if metadata:
            self.write_views(batch.batch_id, view_frames([], [], metadata, [], []))
        yield batch.batch_id
