"""A small synthetic world for the continuous trainer's tests, written with the real artifact
writers: a training log (TrainingLogWriter), a SID table (save_table) and a CPT checkpoint (orbax).

Items fall into clusters; the first SID level is the cluster. Each user stays in one cluster and
walks its items in a fixed cyclic order, so the next item is predictable from the history.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from ingest.events import EngagementEvent
from ingest.training_log import TrainingLogWriter
from tokenizer.sid_table import new_table, save_table
from trainer.checkpoint import save_model
from trainer.retrieval import RetrievalSettings, init_model
from trainer.vocab import VocabLayout

CLUSTERS, PER_CLUSTER = 4, 16
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def item_id(cluster: int, k: int) -> str:
    return f"item-{cluster}-{k}"


def catalogue_items() -> list[str]:
    return [item_id(c, k) for c in range(CLUSTERS) for k in range(PER_CLUSTER)]


def write_sid_table(sid_dir: Path, item_ids: list[str] | None = None) -> None:
    item_ids = item_ids or catalogue_items()
    codes = np.array([[int(i.split("-")[1]), int(i.split("-")[2])] for i in item_ids], np.int64)
    save_table(sid_dir, new_table(1, item_ids, codes, (CLUSTERS, 16)))


def user_events(user: int, steps: int, start_step: int = 0, offset_minutes: int = 0) -> list[EngagementEvent]:
    """User `user`'s walk through its cluster, events start_step .. start_step + steps - 1."""
    cluster = user % CLUSTERS
    events = []
    for t in range(start_step, start_step + steps):
        k = (user + t) % PER_CLUSTER
        events.append(EngagementEvent(
            event_id=f"u{user}-t{t}", user_id=f"user-{user}", item_id=item_id(cluster, k),
            event_type="rating", rating=4.0 + (t % 2), rating_scale=5.0,
            event_time=START + timedelta(minutes=offset_minutes + 10 * t + user % 7)))
    return events


class LogWriter:
    """Publishes batches into a real training log with increasing offsets on partition 0."""

    def __init__(self, root: Path) -> None:
        self.writer = TrainingLogWriter(root)
        self.offset = 0
        self.batches = 0

    def publish(self, events: list[EngagementEvent]) -> list[int]:
        self.batches += 1
        batch_id = f"batch-{self.batches:05d}"
        offsets = list(range(self.offset, self.offset + len(events)))
        self.offset += len(events)
        self.writer.stage(batch_id, events, [e.rating / e.rating_scale for e in events], 0, offsets)
        self.writer.publish(batch_id)
        return offsets


def write_cpt_checkpoint(directory: Path, last_offset: int | dict[str, int] | None, max_history: int = 5,
                         seed: int = 0) -> Path:
    """A real (untrained) CPT checkpoint whose watermark covers offsets up to last_offset (of
    partition 0, or {partition: last offset})."""
    layout = VocabLayout((CLUSTERS, 16), 2)
    model = init_model(RetrievalSettings(model_size="tiny", seed=seed), layout)
    offsets = last_offset if isinstance(last_offset, dict) else {} if last_offset is None else {"0": last_offset}
    watermark = {"offsets": offsets}
    return save_model(directory, model, {
        "stage": "cpt", "vocabulary": layout.to_json(), "sid_version": 1,
        "prompt_schema": {"format": "behaviour-v1", "max_history": max_history, "features": []},
        "data_watermark": watermark})
