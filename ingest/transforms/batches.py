"""GatherParts: put a source batch back together after it was fanned out by key.

The per-user (and per-item) folds cut a batch into one element per key, each carrying the batch
id and how many parts the batch has. Keyed by batch id, this stateful DoFn holds the parts in
runner-owned state until all of them are in, then emits them together, so the sinks can write
one file per batch under its deterministic name (unique across broker epochs). After a replay
from a checkpoint the restored state makes the same parts, so the same file with the same bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec

from ingest.events import EngagementEvent
from ingest.folds import UserContext, UserHistory
from ingest.transforms.user_state import UserUpdate


class GatherParts(beam.DoFn):
    """(batch_id, part) -> (batch_id, [parts]) once `getattr(part, expected)` parts have arrived."""

    PARTS = BagStateSpec("parts", PickleCoder())
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def process(self, element: tuple[str, Any], parts: Any = beam.DoFn.StateParam(PARTS),
                count: Any = beam.DoFn.StateParam(COUNT)) -> Iterator[tuple[str, list[Any]]]:
        batch_id, part = element
        parts.add(part)
        arrived = (count.read() or 0) + 1
        count.write(arrived)
        if arrived >= getattr(part, self.expected):
            gathered = list(parts.read())
            parts.clear()
            count.clear()
            yield batch_id, gathered


@dataclass
class UserBatch:
    """Every user's fold of one source batch, new events in (event time, item, id) order."""

    batch_id: str
    topic: str
    partition: int
    epoch: int
    new_events: list[EngagementEvent]
    rewards: list[float]
    times: list[int]
    offsets: list[int]
    duplicates: int
    users: list[UserHistory]  # of the users with new events, absolute
    contexts: list[UserContext]  # of the users whose context changed, absolute
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)


def user_batch(element: tuple[str, list[UserUpdate]]) -> UserBatch:
    batch_id, updates = element
    updates = sorted(updates, key=lambda u: u.user_id)
    first = updates[0]
    rows = sorted(((e, r, t, o) for u in updates for e, r, t, o in zip(u.new_events, u.rewards, u.times, u.offsets)),
                  key=lambda row: (row[0].event_time, row[0].item_id, row[0].event_id))
    pairs: Counter[tuple[str, str]] = Counter()
    for update in updates:
        pairs.update(update.pairs)
    return UserBatch(batch_id, first.topic, first.partition, first.epoch, [r[0] for r in rows], [r[1] for r in rows],
                     [r[2] for r in rows], [r[3] for r in rows], sum(u.duplicates for u in updates),
                     [u.history for u in updates if u.new_events], [u.context for u in updates if u.context], pairs)


class GatherUserBatches(beam.PTransform):
    """PCollection[UserUpdate] -> PCollection[UserBatch], one per source batch with events."""

    def expand(self, updates: beam.PCollection) -> beam.PCollection:
        return (
            updates
            | "ByBatch" >> beam.Map(lambda u: (u.batch_id, u))
            | "Gather" >> beam.ParDo(GatherParts("users_in_batch"))
            | "Assemble" >> beam.Map(user_batch)
        )
