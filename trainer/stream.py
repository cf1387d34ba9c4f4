"""The continuous trainer's view of the training log (DESIGN.md, contracts: training log).

Published log files never change (the pipeline renames complete files into place), so how far the
trainer has read is the set of files it has read. Every event read lands in its user's history
(ordered by event time, then partition and offset) and, unless the CPT checkpoint already covered
it, in the queue of fresh examples:

    read -> pending (held out: the next checkpoint evaluates on it) -> released (waiting to be
    trained as a fresh example) -> taken (trained, or dropped by reward sampling) -> history pool

The data state saved with each checkpoint is the read files, the pending and released queues, and
the ledger of taken examples (a count and an order-free digest of their event ids), so a restart
from that checkpoint re-reads the same files, rebuilds the same histories and takes each fresh
example exactly once in the model's lineage.

Positions in the log are (partition, log epoch, offset): the pipeline begins a new log epoch
when a partition's log restarts at offset 0 (a new broker, ingest/epochs.py), and every event of
a later epoch comes after every event of an earlier one. A data watermark says how far a model
has read each partition:

    {"event_time": ISO time of the newest event, "events": count,
     "offsets": {"<partition>": the newest offset read, in that partition's newest epoch read},
     "epochs": {"<partition>": that epoch}}

A watermark without "epochs" (written before epochs existed, or by the CPT job) means epoch 0
for every partition. Log files without the log_epoch column read as epoch 0.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from ingest.training_log import HOUR

COLUMNS = ["event_id", "user_id", "item_id", "event_time", "reward", "kafka_partition", "kafka_offset", "context",
           "log_epoch"]
DIGEST_MOD = 2 ** 64


def event_digest(event_ids: Iterable[str]) -> int:
    """An order-free digest of a set of event ids (sum of 64-bit hashes): equal sets, equal digests."""
    total = 0
    for event_id in event_ids:
        total += int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")
    return total % DIGEST_MOD


@dataclass(frozen=True)
class LoggedEvent:
    """One event as the trainer keeps it; `order` sorts a user's events (time, partition, offset);
    `epoch` is the log epoch its offset counts in."""

    event_id: str
    user_id: str
    item_id: str
    reward: float
    order: tuple[int, int, int]
    context_json: str | None = None  # the event's context-feature values (JSON object), as logged
    epoch: int = 0

    @property
    def context(self) -> dict[str, Any]:
        return json.loads(self.context_json) if self.context_json else {}

    @property
    def partition(self) -> int:
        return self.order[1]

    @property
    def log_position(self) -> tuple[int, int]:
        """(epoch, offset): orders the events of one partition, a later epoch after an earlier one."""
        return self.epoch, self.order[2]


def published_files(root: Path) -> list[str]:
    """Published log files as paths relative to root (`event_hour=H/<batch>.parquet`), sorted."""
    if not root.is_dir():
        return []
    return sorted(f"{d.name}/{f.name}" for d in root.iterdir() if d.is_dir() and d.name.startswith(f"{HOUR}=")
                  for f in d.iterdir() if f.suffix == ".parquet")


def read_events(root: Path, relative: str) -> list[LoggedEvent]:
    file = pq.ParquetFile(root / relative)
    present = set(file.schema_arrow.names)  # files written before log_epoch lack it: epoch 0
    table = file.read(columns=[c for c in COLUMNS if c in present]).to_pydict()
    epochs = table.get("log_epoch") or [0] * len(table["event_id"])
    out = []
    for i, event_id in enumerate(table["event_id"]):
        when = table["event_time"][i]
        micros = int(when.timestamp() * 1_000_000)
        out.append(LoggedEvent(event_id, str(table["user_id"][i]), str(table["item_id"][i]),
                               float(table["reward"][i]), (micros, int(table["kafka_partition"][i]),
                                                           int(table["kafka_offset"][i])), table["context"][i],
                               int(epochs[i] or 0)))
    return out


def covered_by(watermark: dict[str, Any] | None, event: LoggedEvent) -> bool:
    """Whether a data watermark (per partition, the newest (epoch, offset) read) includes the event;
    an event of a later epoch than the watermark's is after all of it."""
    return position_covered(watermark, event.partition, *event.log_position)


def position_covered(watermark: dict[str, Any] | None, partition: int, epoch: int, offset: int) -> bool:
    """Whether a data watermark includes the log position (partition, epoch, offset)."""
    if not watermark or "offsets" not in watermark:
        return False
    last = watermark["offsets"].get(str(partition))
    if last is None:
        return False
    newest_epoch = int((watermark.get("epochs") or {}).get(str(partition), 0))
    return (epoch, offset) <= (newest_epoch, int(last))


def watermark_positions(positions: Iterable[tuple[int, int, int]]) -> dict[str, dict[str, int]]:
    """The "offsets" and "epochs" of a data watermark over (partition, epoch, offset) positions: per
    partition the newest (epoch, offset)."""
    newest: dict[str, tuple[int, int]] = {}
    for partition, epoch, offset in positions:
        key = str(int(partition))
        newest[key] = max(newest.get(key, (-1, -1)), (int(epoch), int(offset)))
    return {"offsets": {key: offset for key, (_, offset) in newest.items()},
            "epochs": {key: epoch for key, (epoch, _) in newest.items()}}


@dataclass
class Ledger:
    """Fresh examples taken so far: count, order-free digest of their event ids, and what became of them."""

    taken: int = 0
    digest: int = 0
    trained: int = 0
    dropped_by_reward: int = 0
    without_sid: int = 0
    # The event ids taken since the last servable version, by outcome: the next version's manifest
    # lists them (`fresh_examples`), so a reader can tell which version first trained on an event.
    since_export: dict[str, list[str]] = field(default_factory=dict)

    def take(self, event_id: str, outcome: str) -> None:
        self.taken += 1
        self.digest = (self.digest + event_digest([event_id])) % DIGEST_MOD
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.since_export.setdefault(outcome, []).append(event_id)

    def counts(self) -> dict[str, int]:
        return {"taken": self.taken, "trained": self.trained, "dropped_by_reward": self.dropped_by_reward,
                "without_sid": self.without_sid}


@dataclass
class Stream:
    """Histories, queues and ledger built from the log files read so far."""

    root: Path
    base_watermark: dict[str, Any] | None = None  # the CPT checkpoint's: events it covers are history
    files: set[str] = field(default_factory=set)
    events: dict[str, LoggedEvent] = field(default_factory=dict)
    user_events: dict[str, list[LoggedEvent]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    released: deque[str] = field(default_factory=deque)
    pool: list[str] = field(default_factory=list)  # events in the history pool (sampled for historical rows)
    ledger: Ledger = field(default_factory=Ledger)
    reward_max: float = 0.0  # the largest reward read: reward sampling keeps reward / reward_max

    # Reading ------------------------------------------------------------------------------------
    def _add(self, events: Sequence[LoggedEvent]) -> list[LoggedEvent]:
        new = [e for e in events if e.event_id not in self.events]  # the log holds each event once
        touched = set()
        for event in new:
            self.events[event.event_id] = event
            self.reward_max = max(self.reward_max, event.reward)
            self.user_events.setdefault(event.user_id, []).append(event)
            touched.add(event.user_id)
        for user in touched:
            self.user_events[user].sort(key=lambda e: e.order)
        return new

    def poll(self) -> int:
        """Read the files published since the last poll; their new events join the pending queue
        (or the history pool when the base watermark covers them). Returns the events read."""
        fresh = [f for f in published_files(self.root) if f not in self.files]
        added: list[LoggedEvent] = []
        for relative in fresh:
            added += self._add(read_events(self.root, relative))
            self.files.add(relative)
        added.sort(key=lambda e: e.order)
        for event in added:
            (self.pool if covered_by(self.base_watermark, event) else self.pending).append(event.event_id)
        return len(added)

    # Queues -------------------------------------------------------------------------------------
    def release(self) -> list[str]:
        """Move the pending (evaluated) events to the released queue; returns them."""
        moved, self.pending = self.pending, []
        self.released.extend(moved)
        return moved

    def take_fresh(self) -> str | None:
        """The next released event, now part of the history pool (the caller records its outcome)."""
        if not self.released:
            return None
        event_id = self.released.popleft()
        self.pool.append(event_id)
        return event_id

    # Views --------------------------------------------------------------------------------------
    def before(self, event: LoggedEvent) -> list[LoggedEvent]:
        """The user's events strictly before this one."""
        events = self.user_events[event.user_id]
        return events[:events.index(event)]

    def watermark(self) -> dict[str, Any]:
        """The newest event trained or held in history so far: event time, and per partition the
        newest (epoch, offset) (the shape is in the module docstring)."""
        events = [self.events[event_id] for event_id in self.pool]
        newest = max((event.order[0] for event in events), default=0)
        when = datetime.fromtimestamp(newest / 1e6, timezone.utc).isoformat() if self.pool else None
        return {"event_time": when, "events": len(self.pool),
                **watermark_positions((event.partition, *event.log_position) for event in events)}

    def sample_pool(self, rng: np.random.Generator, n: int) -> list[LoggedEvent]:
        if not self.pool:
            return []
        return [self.events[self.pool[i]] for i in rng.integers(len(self.pool), size=n)]

    # Persistence --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint stores to restore this stream exactly."""
        return {"files": sorted(self.files), "pending": list(self.pending), "released": list(self.released),
                "ledger": vars(self.ledger) | {"digest": str(self.ledger.digest),
                                                 "since_export": {o: list(ids) for o, ids in
                                                                  self.ledger.since_export.items()}},
                "base_watermark": self.base_watermark}

    @classmethod
    def restore(cls, root: Path, state: dict[str, Any]) -> "Stream":
        """Re-read exactly the checkpoint's files; queues and ledger as saved; the rest is history."""
        stream = cls(root, state.get("base_watermark"))
        for relative in state["files"]:
            if not (root / relative).is_file():
                raise FileNotFoundError(f"training log file {relative} read by the checkpoint is gone from {root}")
            stream._add(read_events(root, relative))
            stream.files.add(relative)
        stream.pending = list(state["pending"])
        stream.released = deque(state["released"])
        queued = set(stream.pending) | set(stream.released)
        stream.pool = [e.event_id for e in sorted(stream.events.values(), key=lambda e: e.order)
                       if e.event_id not in queued]
        ledger = dict(state["ledger"])
        ledger["digest"] = int(ledger["digest"])
        stream.ledger = Ledger(**ledger)
        return stream
