"""The append-only training log: parquet, partitioned by event hour, every valid event once.

Layout: <root>/event_hour=YYYY-MM-DDTHH/<batch_id>.parquet. A batch is first written into
<root>/_staging/ (a directory every Hive-style reader skips) and published by renames into its
hour partitions only after the pipeline's state transaction has committed, so a reader never
sees an event the state store does not also hold, and a crash leaves either a staged batch that
recovery publishes or an orphan that it discards.

Durability: staged files (and the staging directory) are fsynced before the state transaction
that refers to them commits, and each rename is followed by an fsync of the hour directory
(features/files.py), so the log holds after an OS crash or a power loss as well. A published
file is never replaced: publishing onto an existing name with other content raises
PublishConflictError (a batch id must name one batch forever, across broker epochs too).

Rows carry where they came from: kafka_partition, kafka_offset and log_epoch, the incarnation
of the partition's log the offset belongs to (it grows when the broker's log restarts at offset
0, see ingest/epochs.py). Files written before log_epoch existed read back as epoch 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from features.files import flush_files, make_directory, move_into_place
from ingest.events import EngagementEvent

HOUR = "event_hour"
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
    ("log_epoch", pa.int32()),  # which incarnation of the partition's log kafka_offset counts in
])


def events_table(events: list[EngagementEvent], rewards: list[float], partition: int, offsets: list[int],
                 epoch: int = 0) -> pa.Table:
    """The log's rows for these events, in the log's schema."""
    return pa.Table.from_pydict({
        "event_id": [e.event_id for e in events],
        "user_id": [e.user_id for e in events],
        "item_id": [e.item_id for e in events],
        "event_type": [e.event_type.value for e in events],
        "event_time": [e.event_time for e in events],
        "reward": rewards,
        "rating": [e.rating for e in events],
        "rating_scale": [e.rating_scale for e in events],
        "watch_seconds": [e.watch_seconds for e in events],
        "item_duration_seconds": [e.item_duration_seconds for e in events],
        "surface": [e.surface for e in events],
        "context": [json.dumps(e.context, sort_keys=True) if e.context else None for e in events],
        "kafka_partition": [partition] * len(events),
        "kafka_offset": offsets,
        "log_epoch": [epoch] * len(events),
    }, schema=SCHEMA)


class TrainingLogWriter:
    """Stages and publishes batches of events into the training log."""

    def __init__(self, root: Path, durable: bool = True) -> None:
        self.root = root
        self.durable = durable  # False: no fsync (only to measure what durability costs)
        self.staging = root / STAGING
        make_directory(self.staging, durable)
        self._staged: dict[str, list[str]] = {}

    def stage(self, batch_id: str, events: list[EngagementEvent], rewards: list[float], partition: int,
              offsets: list[int], epoch: int = 0) -> None:
        """Write the batch's events into the staging directory, one file per event hour (on disk
        when this returns, unless not durable)."""
        if not events:
            return
        table = events_table(events, rewards, partition, offsets, epoch)
        hours = pc.strftime(table["event_time"], format="%Y-%m-%dT%H")
        order = pc.sort_indices(hours)
        table, hours = table.take(order), hours.take(order).to_pylist()
        # Sorted by hour, each hour is one zero-copy slice: a replay batch can span hundreds of hours.
        written: list[str] = []
        start = 0
        for end in range(1, len(hours) + 1):
            if end == len(hours) or hours[end] != hours[start]:
                path = self.staging / f"{batch_id}.{hours[start]}.parquet"
                pq.write_table(table.slice(start, end - start), path)
                written.append(str(path))
                start = end
        if self.durable:
            flush_files(Path(p) for p in written)
        self._staged[batch_id] = written

    def _staged_files(self, batch_id: str) -> list[Path]:
        if batch_id in self._staged:
            return [Path(p) for p in self._staged[batch_id]]
        return sorted(self.staging.glob(f"{batch_id}.*.parquet"))

    def publish(self, batch_id: str) -> int:
        """Rename a staged batch's files to their visible names (idempotent: a file published already
        with the same content is left as it is); returns files moved. PublishConflictError, and
        nothing replaced, when a published file of that name holds other content."""
        moved = 0
        for path in self._staged_files(batch_id):
            if path.exists():
                hour = path.name[len(batch_id) + 1:-len(".parquet")]
                target = self.root / f"{HOUR}={hour}" / f"{batch_id}.parquet"
                moved += move_into_place(path, target, self.durable)
        self._staged.pop(batch_id, None)
        return moved

    def staged_batches(self) -> list[str]:
        """Batch ids with staged files on disk (after a crash: committed or orphaned)."""
        ids = {p.name[:-len(".parquet")].rsplit(".", 1)[0] for p in self.staging.glob("*.parquet")}
        return sorted(ids)

    def discard(self, batch_id: str) -> None:
        for path in self._staged_files(batch_id):
            path.unlink(missing_ok=True)
        self._staged.pop(batch_id, None)


def read_training_log(root: Path) -> pd.DataFrame:
    """Every published event of the log as a DataFrame (staged files are invisible)."""
    if not root.exists() or not any(p.name.startswith(f"{HOUR}=") for p in root.iterdir()):
        return SCHEMA.empty_table().to_pandas()
    dataset = ds.dataset(str(root), format="parquet", schema=SCHEMA, partitioning="hive")
    table = dataset.to_table()
    epoch = table.schema.get_field_index("log_epoch")  # null in files written before the column existed
    table = table.set_column(epoch, SCHEMA.field("log_epoch"), pc.fill_null(table["log_epoch"], 0))
    return table.to_pandas()
