"""A thin wrapper over feast.FeatureStore: apply, push, read online, historical retrieval.

Offline writes do not go through Feast's push: the file offline store's `offline_write_batch`
re-reads and rewrites the whole parquet table on every push (quadratic, and a crash mid-write
corrupts it). Instead each view's source is a directory and every batch adds one parquet file,
staged outside it (in offline/_staging/<view>/; Feast's dask reader would see a hidden file
inside the source directory) and published by an atomic rename into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from features.config import FeastConfig
from features.errors import FeatureStoreError
from features.repo import ENTITY_KEY, TIMESTAMP, VIEW_SCHEMAS, VIEWS, feature_columns, feature_objects

SCHEMA_FILE = "_schema.parquet"
STAGING = "_staging"


def repo_config(repo_dir: Path, cfg: FeastConfig) -> dict[str, Any]:
    """The feature_store.yaml content for this repo directory and configuration."""
    if cfg.online_store.type == "redis":
        online: dict[str, Any] = {"type": "redis", "connection_string": cfg.online_store.connection_string}
    else:
        online = {"type": "sqlite", "path": cfg.online_store.path or str(repo_dir / "online_store.db")}
    return {
        "project": cfg.project,
        "registry": str(repo_dir / "registry.db"),
        "provider": "local",
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


class FeatureStoreClient:
    """The project's access to Feast. Construct cheaply; Feast itself is loaded on first use."""

    def __init__(self, repo_dir: Path, cfg: FeastConfig) -> None:
        self.repo_dir = Path(repo_dir)
        self.cfg = cfg
        self.offline_dir = self.repo_dir / "offline"
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            if not (self.repo_dir / "feature_store.yaml").is_file():
                raise FeatureStoreError(
                    f"No Feast repo at {self.repo_dir}; run `plum stack up` to apply it."
                )
            from feast import FeatureStore

            self._store = FeatureStore(repo_path=str(self.repo_dir))
        return self._store

    def apply(self) -> None:
        """Write feature_store.yaml, create the offline directories and apply the repo (idempotent)."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        for view in VIEWS:
            directory = self.offline_dir / view
            directory.mkdir(parents=True, exist_ok=True)
            (self.offline_dir / STAGING / view).mkdir(parents=True, exist_ok=True)
            if not (directory / SCHEMA_FILE).exists():
                pq.write_table(VIEW_SCHEMAS[view].empty_table(), directory / SCHEMA_FILE)
        config = self.repo_dir / "feature_store.yaml"
        config.write_text(yaml.safe_dump(repo_config(self.repo_dir, self.cfg), sort_keys=False))
        self._store = None
        self.store.apply(feature_objects(self.offline_dir))

    # -- online ---------------------------------------------------------------------------
    def push_online(self, view: str, frame: pd.DataFrame) -> None:
        """Write the absolute feature values of `frame`'s entities to the online store."""
        from feast.data_source import PushMode

        self._check_view(view)
        if len(frame):
            self.store.push(f"{view}_push", frame, to=PushMode.ONLINE)

    def read_online(self, view: str, entity_ids: list[str]) -> pd.DataFrame:
        """One row per requested id, in order; features are null for unknown entities."""
        self._check_view(view)
        key = ENTITY_KEY[view]
        columns = [key, *feature_columns(view)]
        if not entity_ids:
            return pd.DataFrame(columns=columns)
        response = self.store.get_online_features(
            features=[f"{view}:{col}" for col in feature_columns(view)],
            entity_rows=[{key: entity_id} for entity_id in entity_ids],
        )
        return response.to_df()[columns]

    # -- offline --------------------------------------------------------------------------
    def _table(self, view: str, frame: pd.DataFrame) -> pa.Table:
        schema = VIEW_SCHEMAS[view]
        return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)

    def stage_offline(self, view: str, frame: pd.DataFrame, batch_id: str) -> Path:
        """Write a batch's rows under a hidden name; invisible until `publish_offline`."""
        self._check_view(view)
        path = self._staged(view, batch_id)
        pq.write_table(self._table(view, frame), path)
        return path

    def _staged(self, view: str, batch_id: str) -> Path:
        return self.offline_dir / STAGING / view / f"{batch_id}.parquet"

    def publish_offline(self, view: str, batch_id: str) -> bool:
        """Make a staged batch visible (atomic rename); a no-op when already published."""
        staged = self._staged(view, batch_id)
        if not staged.exists():
            return False
        os.replace(staged, self.offline_dir / view / f"{batch_id}.parquet")
        return True

    def write_offline(self, view: str, frame: pd.DataFrame, batch_id: str) -> None:
        """Stage and publish in one go; a batch id that exists already is left as it is."""
        if (self.offline_dir / view / f"{batch_id}.parquet").exists():
            return
        self.stage_offline(view, frame, batch_id)
        self.publish_offline(view, batch_id)

    def pending_offline(self, views: tuple[str, ...] = VIEWS) -> list[tuple[str, str]]:
        """(view, batch_id) of every staged, unpublished batch of these views."""
        out = []
        for view in views:
            for path in sorted((self.offline_dir / STAGING / view).glob("*.parquet")):
                out.append((view, path.stem))
        return out

    def discard_offline(self, view: str, batch_id: str) -> None:
        self._staged(view, batch_id).unlink(missing_ok=True)

    def latest_offline(self, view: str) -> pd.DataFrame:
        """The newest published row of every entity of a view, from its offline files."""
        import pyarrow.dataset as ds

        self._check_view(view)
        schema = VIEW_SCHEMAS[view]
        files = sorted(str(p) for p in (self.offline_dir / view).glob("*.parquet") if p.name != SCHEMA_FILE)
        if not files:
            return schema.empty_table().to_pandas()
        frame = ds.dataset(files, format="parquet", schema=schema).to_table().to_pandas()
        frame = frame.sort_values(TIMESTAMP, kind="stable")
        return frame.drop_duplicates(ENTITY_KEY[view], keep="last").reset_index(drop=True)

    def historical_features(self, entity_df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
        """Point-in-time correct feature values for `entity_df` (entity keys + event_timestamp)."""
        if TIMESTAMP not in entity_df.columns:
            raise FeatureStoreError(f"entity_df needs an '{TIMESTAMP}' column for point-in-time retrieval.")
        return self.store.get_historical_features(entity_df=entity_df, features=features).to_df()

    @staticmethod
    def _check_view(view: str) -> None:
        if view not in VIEWS:
            raise FeatureStoreError(f"Unknown feature view '{view}'; known views: {', '.join(VIEWS)}.")
