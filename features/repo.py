"""The Feast repo, declared: entities, push sources, feature views, one feature service.

Four views are fixed. The fifth, user_context, holds each user's latest value of every registered
context feature (features/registry.py): its schema is the registry's, one column per feature in
registration order (categorical values as strings, numeric ones as floats), and it exists once a
feature is registered. A user's rows have strictly increasing timestamps (the pipeline's state
says how), so a later row always wins, in Feast's offline retrieval and in online stores that
keep the newest write (Redis). A registration re-applies the repo with the grown view; columns are never
removed or retyped, since registered features never change.

Each view's offline source is a directory of parquet files, one file per pipeline batch, plus an
empty `_schema.parquet` (store.py says why both). Feature schemas are declared here, never inferred
from the files. Names here are the contract other components read.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String

from features.registry import ContextFeatureSpec

TIMESTAMP = "event_timestamp"

USER_HISTORY = "user_history"
ITEM_STATS = "item_stats"
ITEM_METADATA = "item_metadata"
ITEM_SID = "item_sid"
USER_CONTEXT = "user_context"
VIEWS = (USER_HISTORY, ITEM_STATS, ITEM_METADATA, ITEM_SID)  # the fixed views

ENTITY_KEY = {USER_HISTORY: "user_id", ITEM_STATS: "item_id", ITEM_METADATA: "item_id", ITEM_SID: "item_id",
              USER_CONTEXT: "user_id"}

# Arrow schema of each view's offline files (entity key, features, timestamp), in Feast's column order.
VIEW_SCHEMAS: dict[str, pa.Schema] = {
    USER_HISTORY: pa.schema([
        ("user_id", pa.string()),
        ("history_item_ids", pa.list_(pa.string())),   # last 50 item ids, oldest first
        ("history_rewards", pa.list_(pa.float32())),
        ("history_times", pa.list_(pa.int64())),       # unix seconds
        ("event_count", pa.int64()),                   # all events of the user, not only the last 50
        (TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]),
    ITEM_STATS: pa.schema([
        ("item_id", pa.string()),
        ("impressions", pa.int64()),
        ("clicks", pa.int64()),
        ("event_count", pa.int64()),
        ("mean_reward", pa.float32()),
        ("last_event_time", pa.int64()),               # unix seconds
        (TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]),
    ITEM_METADATA: pa.schema([
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("published_at", pa.int64()),                  # unix seconds, null when unknown
        (TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]),
    ITEM_SID: pa.schema([
        ("item_id", pa.string()),
        ("sid_version", pa.int64()),
        ("sid_codes", pa.list_(pa.int64())),           # one code per level
        ("sid_suffix", pa.int64()),                    # collision suffix token
        (TIMESTAMP, pa.timestamp("us", tz="UTC")),
    ]),
}

# Every column of a view's DataFrames, in order: what push_online and the offline writes take.
VIEW_COLUMNS: dict[str, list[str]] = {view: schema.names for view, schema in VIEW_SCHEMAS.items()}

_FEAST_TYPES: dict[pa.DataType, Any] = {
    pa.string(): String, pa.int64(): Int64, pa.float32(): Float32,
    pa.list_(pa.string()): Array(String), pa.list_(pa.int64()): Array(Int64), pa.list_(pa.float32()): Array(Float32),
}


def context_schema(specs: Sequence[ContextFeatureSpec]) -> pa.Schema:
    """The Arrow schema of user_context for these registered features."""
    return pa.schema([("user_id", pa.string()),
                      *((s.name, pa.string() if s.type == "categorical" else pa.float32()) for s in specs),
                      (TIMESTAMP, pa.timestamp("us", tz="UTC"))])


def all_views(specs: Sequence[ContextFeatureSpec] = ()) -> tuple[str, ...]:
    """The views of the repo: the fixed four, and user_context once a feature is registered."""
    return (*VIEWS, USER_CONTEXT) if specs else VIEWS


def view_schema(view: str, specs: Sequence[ContextFeatureSpec] = ()) -> pa.Schema:
    """A view's Arrow schema (user_context's follows the registered features)."""
    return context_schema(specs) if view == USER_CONTEXT else VIEW_SCHEMAS[view]


def feature_columns(view: str, specs: Sequence[ContextFeatureSpec] = ()) -> list[str]:
    """The feature names of a view (no entity key, no timestamp)."""
    return [f.name for f in view_schema(view, specs) if f.name not in (ENTITY_KEY[view], TIMESTAMP)]


def feature_objects(offline_dir: Path, specs: Sequence[ContextFeatureSpec] = ()) -> list:
    """Every Feast object of the repo; `offline_dir/<view>/` holds each view's parquet files."""
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="A user of the recommender")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
                  description="A recommendable item")
    entity = {USER_HISTORY: user, ITEM_STATS: item, ITEM_METADATA: item, ITEM_SID: item, USER_CONTEXT: user}
    objects: list = [user, item]
    views: list = []
    descriptions = {spec.name: spec.description for spec in specs}
    for name in all_views(specs):
        source = FileSource(name=f"{name}_source", path=str(offline_dir / name), timestamp_field=TIMESTAMP)
        push = PushSource(name=f"{name}_push", batch_source=source)
        view = FeatureView(
            name=name,
            entities=[entity[name]],
            ttl=timedelta(0),  # never expires: a user's history is valid until replaced
            schema=[Field(name=col, dtype=_FEAST_TYPES[view_schema(name, specs).field(col).type],
                          description=descriptions.get(col, "") if name == USER_CONTEXT else "")
                    for col in feature_columns(name, specs)],
            source=push,
            online=True,
        )
        objects += [source, push, view]
        views.append(view)
    objects.append(FeatureService(name="plum_ingest", features=views))
    return objects
