"""The pipeline's state logic as pure folds: what one user's or one item's state becomes when
events arrive. Both places the state can live call these and nothing else: Beam keyed state on a
runner (ingest/transforms/) and the durable embedded store (ingest/state_store.py), so the two
give the same outputs from the same input.

Per user (key = user_id, the topic's key): de-duplication by event id, the last-N history, the
latest context values and the co-occurring item pairs the new events add. Per item: stats that
merge associatively (a keyed combine or keyed state).

De-duplication remembers an event id for `retention_s` of event time behind the user's newest
event. An event older than that can no longer be told from a duplicate, so the fold neither
applies nor drops it: it comes back as `expired`, and the pipeline sends it to the dead-letter
topic with the reason. Nothing is lost, nothing is applied twice, and the seen set stays bounded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ingest.config import PipelineConfig, RewardConfig
from ingest.events import EngagementEvent, EventType, ItemUpsert


@dataclass
class UserHistory:
    """The last `history_length` engagements of a user, oldest first."""

    user_id: str
    item_ids: list[str]
    rewards: list[float]
    times: list[int]
    event_count: int
    last_event_time: int


@dataclass
class UserContext:
    """A user's latest value of every context key its events carried: {name: (value, event time)}.
    Every key is kept, registered or not, so a feature registered later starts from what is known."""

    user_id: str
    values: dict[str, tuple[Any, int]]
    last_event_time: int
    # The timestamp (unix microseconds) of the user's newest user_context row: the last event time,
    # or a microsecond after the previous row when a row restates values at the same instant (the
    # fill of a newly registered feature), so a user's rows never share a timestamp.
    written_us: int = 0

    def latest(self) -> dict[str, Any]:
        return {name: value for name, (value, _) in self.values.items()}


@dataclass
class ItemStats:
    item_id: str
    impressions: int
    clicks: int
    event_count: int
    reward_sum: float
    last_event_time: int

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.event_count if self.event_count else 0.0


@dataclass
class ItemMetadata:
    item_id: str
    title: str
    tags: list[str]
    published_at: int | None
    description: str | None
    updated_at: int


@dataclass(frozen=True)
class UserFoldSettings:
    """The sizes the per-user fold keeps (PipelineConfig's values)."""

    reward: RewardConfig
    history_length: int = 50
    cooccurrence_window: int = 10
    retention_s: int = 7 * 86400

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "UserFoldSettings":
        return cls(cfg.reward, cfg.history_length, cfg.cooccurrence_window, cfg.dedup_retention_s)


@dataclass
class UserState:
    """What the pipeline keeps per user. `seen` maps event id -> event time for the ids within the
    de-duplication retention; a caller holding many users may pass only the ids it is asked about."""

    history: UserHistory
    context: UserContext | None = None
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, user_id: str) -> "UserState":
        return cls(UserHistory(user_id, [], [], [], 0, 0))


@dataclass
class UserFold:
    """What one fold of a user's events did."""

    state: UserState
    new_events: list[EngagementEvent]  # in (event time, item, id) order
    rewards: list[float]  # of new_events
    times: list[int]  # unix seconds, of new_events
    duplicates: int
    expired: list[EngagementEvent]  # older than the retention: for the dead-letter topic
    pairs: Counter[tuple[str, str]]  # co-occurrence increments, (smaller id, larger id)
    seen_added: dict[str, int]  # ids remembered by this fold
    retain_from: int  # ids with an event time below this are forgotten
    context_changed: bool


def unix_seconds(event: EngagementEvent) -> int:
    return int(event.event_time.timestamp())


def fold_user(state: UserState, events: Iterable[EngagementEvent], settings: UserFoldSettings) -> UserFold:
    """Fold one user's events (any order, duplicates allowed) into its state; `state` is not modified."""
    horizon = state.history.last_event_time - settings.retention_s
    seen = state.seen
    fresh: dict[str, EngagementEvent] = {}
    expired: list[EngagementEvent] = []
    duplicates = 0
    for event in events:
        if event.event_id in fresh or event.event_id in seen:
            duplicates += 1
        elif unix_seconds(event) < horizon:
            expired.append(event)
        else:
            fresh[event.event_id] = event
    # (time, item) order makes a history a function of the event set, whatever the batching.
    new = sorted(fresh.values(), key=lambda e: (e.event_time, e.item_id, e.event_id))
    rewards = [e.reward(settings.reward) for e in new]
    times = [unix_seconds(e) for e in new]
    history, pairs = _fold_history(state.history, new, rewards, times, settings)
    context = _fold_context(state.context, state.history.user_id, new, times)
    retain_from = history.last_event_time - settings.retention_s
    seen_added = {e.event_id: t for e, t in zip(new, times)}
    kept = {i: t for i, t in {**seen, **seen_added}.items() if t >= retain_from}
    return UserFold(UserState(history, context or state.context, kept), new, rewards, times, duplicates,
                    expired, pairs, seen_added, retain_from, context is not None)


def _fold_history(history: UserHistory, new: list[EngagementEvent], rewards: list[float], times: list[int],
                  settings: UserFoldSettings) -> tuple[UserHistory, Counter[tuple[str, str]]]:
    if not new:
        return history, Counter()
    recent = list(history.item_ids)
    entries = list(zip(history.times, history.item_ids, history.rewards))
    pairs: Counter[tuple[str, str]] = Counter()
    window = settings.cooccurrence_window
    for event, at, reward in zip(new, times, rewards):
        item = event.item_id
        pairs.update((other, item) if other < item else (item, other) for other in set(recent[-window:]) if other != item)
        recent.append(item)
        entries.append((at, item, reward))
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    entries = entries[-settings.history_length:]
    folded = UserHistory(history.user_id, [e[1] for e in entries], [e[2] for e in entries], [e[0] for e in entries],
                         history.event_count + len(new), max(history.last_event_time, entries[-1][0]))
    return folded, pairs


def _fold_context(context: UserContext | None, user_id: str, new: list[EngagementEvent],
                  times: list[int]) -> UserContext | None:
    """The user's context after the new events' values (None when no new event carried one)."""
    carrying = [(e, t) for e, t in zip(new, times) if e.context]
    if not carrying:
        return None
    folded = UserContext(user_id, dict(context.values), context.last_event_time, context.written_us) if context \
        else UserContext(user_id, {}, 0)
    for event, at in carrying:
        for name, value in event.context.items():
            if name not in folded.values or folded.values[name][1] <= at:
                folded.values[name] = (value, at)
        folded.last_event_time = max(folded.last_event_time, at)
    folded.written_us = max(folded.last_event_time * 1_000_000, folded.written_us + 1)
    return folded


def restate_context(context: UserContext) -> UserContext:
    """The same values one microsecond after the user's newest row (the fill of a new feature)."""
    return UserContext(context.user_id, dict(context.values), context.last_event_time, context.written_us + 1)


def item_contributions(events: list[EngagementEvent], rewards: list[float], times: list[int]) -> dict[str, ItemStats]:
    """Per item, the stats of these events alone (to merge into the item's running stats)."""
    out: dict[str, ItemStats] = {}
    for event, reward, at in zip(events, rewards, times):
        part = ItemStats(event.item_id, int(event.event_type is EventType.IMPRESSION),
                         int(event.event_type is EventType.CLICK), 1, reward, at)
        out[event.item_id] = merge_item_stats(out[event.item_id], part) if event.item_id in out else part
    return out


def merge_item_stats(a: ItemStats, b: ItemStats) -> ItemStats:
    """Associative and commutative: the stats of the union of two disjoint event sets."""
    return ItemStats(a.item_id, a.impressions + b.impressions, a.clicks + b.clicks, a.event_count + b.event_count,
                     a.reward_sum + b.reward_sum, max(a.last_event_time, b.last_event_time))


def merge_into(stats: Mapping[str, ItemStats], parts: Mapping[str, ItemStats]) -> dict[str, ItemStats]:
    """The running stats of every item in `parts` after merging them in."""
    return {item: merge_item_stats(stats[item], part) if item in stats else part for item, part in parts.items()}


def item_metadata(upserts: list[ItemUpsert], updated_at: list[int]) -> list[ItemMetadata]:
    """The metadata the upserts leave, the last upsert of an item winning (`updated_at`: unix seconds
    of each upsert)."""
    latest = {u.item_id: (u, at) for u, at in zip(upserts, updated_at)}
    return [ItemMetadata(u.item_id, u.title, list(u.tags), int(u.published_at.timestamp()) if u.published_at else None,
                         u.description, at) for u, at in latest.values()]
