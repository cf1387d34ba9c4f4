"""The append-only training log: parquet, partitioned by event hour, every valid event once.

Layout: <root>/event_hour=YYYY-MM-DDTHH/<batch_id>.parquet. A batch is first staged under
<root>/_staging/<batch_id>/ (readers ignore paths starting with '_') and published by renames
only after the pipeline's state transaction has committed, so a reader never sees a batch whose
events the state store does not also hold, and a crash leaves either a staged batch that is
published on recovery or an orphan that is discarded.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ingest.events import EngagementEvent

STAGING = "_staging"
SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("event_type", pa.string()),
    ("event_time", pa.timestamp("us", tz="UTC")),
    ("reward", pa.float32()),
    ("rating", pa.float32()),
    ("rating_scale", pa.float32()),
    ("watch_seconds", pa.float32()),
    ("item_duration_seconds", pa.float32()),
    ("surface", pa.string()),
    ("context", pa.string()),  # JSON object of context feature values
    ("kafka_partition", pa.int32()),
    ("kafka_offset", pa.int64()),
])


def _hour(event: EngagementEvent) -> str:
    return event.event_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H")


class TrainingLogWriter:
    """Stages and publishes batches of events into the training log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / STAGING).mkdir(parents=True, exist_ok=True)

    def stage(self, batch_id: str, events: list[EngagementEvent], rewards: list[float], partition: int,
              offsets: list[int]) -> None:
        """Write the batch's events, one file per event hour, into its staging directory."""
        staging = self.root / STAGING / batch_id
        if staging.exists():
            shutil.rmtree(staging)
        if not events:
            return
        staging.mkdir(parents=True)
        by_hour: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            by_hour.setdefault(_hour(event), []).append(i)
        for hour, indices in by_hour.items():
            rows = [events[i] for i in indices]
            table = pa.Table.from_pydict({
                "event_id": [e.event_id for e in rows],
                "user_id": [e.user_id for e in rows],
                "item_id": [e.item_id for e in rows],
                "event_type": [e.event_type.value for e in rows],
                "event_time": [e.event_time for e in rows],
                "reward": [rewards[i] for i in indices],
                "rating": [e.rating for e in rows],
                "rating_scale": [e.rating_scale for e in rows],
                "watch_seconds": [e.watch_seconds for e in rows],
                "item_duration_seconds": [e.item_duration_seconds for e in rows],
                "surface": [e.surface for e in rows],
                "context": [json.dumps(e.context, sort_keys=True) if e.context else None for e in rows],
                "kafka_partition": [partition] * len(rows),
                "kafka_offset": [offsets[i] for i in indices],
            }, schema=SCHEMA)
            pq.write_table(table, staging / f"event_hour={hour}.parquet")

    def publish(self, batch_id: str) -> int:
        """Move a staged batch into its hour partitions (idempotent); returns files moved."""
        staging = self.root / STAGING / batch_id
        if not staging.exists():
            return 0
        moved = 0
        for file in sorted(staging.glob("*.parquet")):
            target_dir = self.root / file.stem
            target_dir.mkdir(exist_ok=True)
            os.replace(file, target_dir / f"{batch_id}.parquet")
            moved += 1
        shutil.rmtree(staging)
        return moved

    def staged_batches(self) -> list[str]:
        return sorted(p.name for p in (self.root / STAGING).iterdir() if p.is_dir())

    def discard(self, batch_id: str) -> None:
        shutil.rmtree(self.root / STAGING / batch_id, ignore_errors=True)


def read_training_log(root: Path) -> pd.DataFrame:
    """Every published event of the log as a DataFrame (staged batches are invisible)."""
    if not root.exists() or not any(p for p in root.iterdir() if p.name.startswith("event_hour=")):
        return SCHEMA.empty_table().to_pandas()
    dataset = ds.dataset(str(root), format="parquet", schema=SCHEMA, partitioning="hive",
                         exclude_invalid_files=False)
    return dataset.to_table().to_pandas()
