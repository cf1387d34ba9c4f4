"""FoldUsers: per-user keyed state owned by the runner.

A parsed batch is cut into one element per user it holds (key = user_id, as the topic is keyed,
so a user's events stay in one partition and arrive in order). A stateful DoFn keeps each user's
UserState (ingest/folds.py: seen ids within the retention, the last-N history, the latest
context values) in Beam state, which the runner checkpoints and redistributes with the key, and
folds the element into it. As the key's owner it writes the users' online values at the end of
each bundle (ingest/transforms/stores.py). Out comes one UserUpdate per element, carrying the
source batch id and how many users that batch holds, so the batch can be put back together
downstream (ingest/transforms/batches.py) for the training log and the offline store.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from ingest.events import EngagementEvent
from ingest.folds import UserContext, UserFoldSettings, UserHistory, UserState, fold_user
from ingest.parse import ParsedBatch
from ingest.transforms.dead_letters import DEAD_LETTERS, expired_dead_letter
from ingest.transforms.stores import OnlineWrites, StoreSettings


@dataclass
class UserEvents:
    """One user's events of one source batch (offsets aligned with events)."""

    batch_id: str
    users_in_batch: int
    topic: str
    partition: int
    epoch: int
    events: list[EngagementEvent]
    offsets: list[int]


@dataclass
class UserUpdate:
    """What folding one UserEvents did; `history` and `context` are the user's absolute values."""

    batch_id: str
    users_in_batch: int
    topic: str
    partition: int
    epoch: int
    user_id: str
    history: UserHistory
    context: UserContext | None  # set only when this fold changed it
    new_events: list[EngagementEvent]
    rewards: list[float]
    times: list[int]
    offsets: list[int]  # of new_events
    duplicates: int
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)


def events_by_user(batch: ParsedBatch) -> Iterator[tuple[str, UserEvents]]:
    """(user_id, that user's events of the batch) for every user the batch holds."""
    events: dict[str, list[EngagementEvent]] = {}
    offsets: dict[str, list[int]] = {}
    for record, offset in zip(batch.records, batch.offsets):
        if isinstance(record, EngagementEvent):
            events.setdefault(record.user_id, []).append(record)
            offsets.setdefault(record.user_id, []).append(offset)
    batch_id = batch.batch_id
    for user_id, user_events in events.items():
        yield user_id, UserEvents(batch_id, len(events), batch.topic, batch.partition, batch.epoch, user_events,
                                  offsets[user_id])


class FoldUserState(beam.DoFn):
    """(user_id, UserEvents) -> UserUpdate, with the user's state in runner-owned keyed state and
    the users' user_history and user_context rows pushed online when the bundle ends (`stores`
    None: no online writes)."""

    USER = ReadModifyWriteStateSpec("user", PickleCoder())

    def __init__(self, settings: UserFoldSettings, stores: StoreSettings | None = None) -> None:
        self.settings = settings
        self.stores = stores
        self.applied = Metrics.counter("plum.ingest", "events_applied")
        self.duplicates = Metrics.counter("plum.ingest", "events_duplicate")
        self.expired = Metrics.counter("plum.ingest", "events_expired")

    def setup(self) -> None:
        self.features = self.stores.open_features() if self.stores else None
        self.online = OnlineWrites()

    def finish_bundle(self) -> None:
        self.online.flush(self.features)

    def process(self, element: tuple[str, UserEvents],
                user: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(USER)
                ) -> Iterator[UserUpdate | beam.pvalue.TaggedOutput]:
        user_id, part = element
        state = user.read() or UserState.empty(user_id)
        fold = fold_user(state, part.events, self.settings)
        if fold.new_events:
            user.write(fold.state)
            self.online.users[user_id] = fold.state.history
        if fold.context_changed:
            self.online.contexts[user_id] = fold.state.context
        offset_of = dict(zip((e.event_id for e in part.events), part.offsets))
        self.applied.inc(len(fold.new_events))
        self.duplicates.inc(fold.duplicates)
        self.expired.inc(len(fold.expired))
        for event in fold.expired:
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, expired_dead_letter(part.topic, part.partition,
                                                                             offset_of[event.event_id], event))
        yield UserUpdate(part.batch_id, part.users_in_batch, part.topic, part.partition, part.epoch, user_id,
                         fold.state.history, fold.state.context if fold.context_changed else None, fold.new_events,
                         fold.rewards, fold.times, [offset_of[e.event_id] for e in fold.new_events], fold.duplicates,
                         fold.pairs)


class FoldUsers(beam.PTransform):
    """PCollection[ParsedBatch] -> PCollection[UserUpdate], one per (source batch, user), with the
    expired events as the tagged DEAD_LETTERS output."""

    def __init__(self, settings: UserFoldSettings, stores: StoreSettings | None = None) -> None:
        super().__init__()
        self.settings, self.stores = settings, stores

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return (
            batches
            | "ByUser" >> beam.FlatMap(events_by_user)
            | "Fold" >> beam.ParDo(FoldUserState(self.settings, self.stores)).with_outputs(DEAD_LETTERS,
                                                                                           main="updates")
        )
