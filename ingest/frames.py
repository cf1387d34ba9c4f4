"""The rows the pipeline writes to each feature view (online and offline), from the folded state.
Both state backends write through these, so a view's columns are declared once."""

from __future__ import annotations

from typing import Any

import pandas as pd

from features.registry import ContextFeatureSpec
from features.repo import USER_CONTEXT
from ingest.folds import ItemMetadata, ItemStats, UserContext, UserHistory


def user_history_frame(users: list[UserHistory]) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": [u.user_id for u in users],
        "history_item_ids": [u.item_ids for u in users],
        "history_rewards": [[float(r) for r in u.rewards] for u in users],
        "history_times": [[int(t) for t in u.times] for u in users],
        "event_count": [u.event_count for u in users],
        "event_timestamp": pd.to_datetime([u.last_event_time for u in users], unit="s", utc=True),
    })


def _feature_value(spec: ContextFeatureSpec, value: Any) -> str | float | None:
    """A context value as user_context stores it: categorical as text, numeric as a float (None
    when the value is not a number: the prompt then takes the feature's first bucket)."""
    if spec.type == "categorical":
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def user_context_frame(contexts: list[UserContext], specs: list[ContextFeatureSpec]) -> pd.DataFrame:
    """The user_context rows of the users holding a value of at least one registered feature."""
    kept = [c for c in contexts if any(s.name in c.values for s in specs)]
    frame = {"user_id": [c.user_id for c in kept]}
    for spec in specs:
        frame[spec.name] = [_feature_value(spec, c.values[spec.name][0]) if spec.name in c.values else None
                            for c in kept]
    frame["event_timestamp"] = pd.to_datetime([c.written_us for c in kept], unit="us", utc=True)
    return pd.DataFrame(frame)


def item_stats_frame(items: list[ItemStats]) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [s.item_id for s in items],
        "impressions": [s.impressions for s in items],
        "clicks": [s.clicks for s in items],
        "event_count": [s.event_count for s in items],
        "mean_reward": [s.mean_reward for s in items],
        "last_event_time": [s.last_event_time for s in items],
        "event_timestamp": pd.to_datetime([s.last_event_time for s in items], unit="s", utc=True),
    })


def item_metadata_frame(items: list[ItemMetadata]) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [m.item_id for m in items],
        "title": [m.title for m in items],
        "tags": [m.tags for m in items],
        "published_at": pd.array([m.published_at for m in items], dtype="Int64"),
        "event_timestamp": pd.to_datetime([m.updated_at for m in items], unit="s", utc=True),
    })


def view_frames(users: list[UserHistory], items: list[ItemStats], metadata: list[ItemMetadata],
                contexts: list[UserContext], specs: list[ContextFeatureSpec]) -> dict[str, pd.DataFrame]:
    """The rows of every view these changed entities touch (user_context only for registered features)."""
    frames = {}
    if specs and contexts:
        context = user_context_frame(contexts, specs)
        if len(context):
            frames[USER_CONTEXT] = context
    if users:
        frames["user_history"] = user_history_frame(users)
    if items:
        frames["item_stats"] = item_stats_frame(items)
    if metadata:
        frames["item_metadata"] = item_metadata_frame(metadata)
    return frames
