"""A thin wrapper over feast.FeatureStore: apply, push, read online, historical retrieval.

What Feast 0.67 (file offline store = dask 2026.8) does, and how this module works with it:
- Offline writes do not go through Feast's push: the file offline store's `offline_write_batch`
  re-reads and rewrites the whole parquet table on every push (quadratic, and a crash mid-write
  corrupts it). Each view's source is a directory instead, and every batch adds one parquet file.
- dask's `read_parquet(<directory>)` reads every `*.parquet` file in it, names starting with `_`
  or `.` included (pyarrow's ParquetDataset skips those; dask does not). So a batch is staged
  outside the source directory, in offline/_staging/<view>/, and published by an atomic rename
  into it; a hidden temporary name inside the directory would be read by historical retrieval.
- That same dask read fails on a directory without a parquet file ("No files satisfy the
  `parquet_file_extension` criteria"), so historical retrieval of a view with no batches yet
  would raise. apply() writes an empty `_schema.parquet` with the view's Arrow schema into each
  directory: dask reads it (zero rows), so retrieval works from the start. apply() itself needs
  no files: the schemas are declared in repo.py, never inferred.
- Pushes: Feast rejects an Array(Float32) list holding Python ints (TypeError) and turns null
  Int64 values into floats on the way through pandas. push_online therefore converts each frame
  to the view's Arrow schema first and hands Feast Arrow-backed columns (exact types, and faster
  to push than lists of Python objects).
- A push whose feature columns are all null is skipped by Feast with only a warning.
- Historical retrieval through the dask store loses or refuses some entity rows on its own;
  `_historical_view` says which and how this module asks around it. It also costs about 0.3 ms
  per offline row of the view read (dask hashes the data it persists), whatever the request.
- Durability: a staged file and its directory are fsynced when staged (the pipeline commits its
  state after staging, and recovery then publishes the file instead of re-reading the batch);
  publishing is fsync, rename, fsync of the view's directory (features/files.py). A published
  batch file is never replaced by another with different content (PublishConflictError).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from features.config import FeastConfig
from features.errors import FeatureStoreError
from features.files import flush_files, make_directory, move_into_place
from features.registry import ContextFeatureRegistry, ContextFeatureSpec
from features.repo import ENTITY_KEY, TIMESTAMP, USER_CONTEXT, all_views, feature_objects, view_schema

SCHEMA_FILE = "_schema.parquet"
STAGING = "_staging"
_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
        "entity_key_serialization_version": 3,  # 0.67's default and the only one it recommends
    }


def write_repo_config(repo_dir: Path, cfg: FeastConfig) -> Path:
    """Write `<repo_dir>/feature_store.yaml` and return its path."""
    path = Path(repo_dir) / "feature_store.yaml"
    path.write_text(yaml.safe_dump(repo_config(Path(repo_dir), cfg), sort_keys=False))
    return path


def _check_batch_id(batch_id: str) -> None:
    # Batch ids become file names next to _schema.parquet: no separators, no hidden names.
    if not _BATCH_ID.fullmatch(batch_id):
        raise ValueError(f"Invalid batch id {batch_id!r}: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit.")


def _column(ref: str, full_feature_names: bool) -> str:
    """The result column of a "view:feature" reference, as Feast names it."""
    return ref.replace(":", "__") if full_feature_names else ref.partition(":")[2]


def view_table(view: str, schema: pa.Schema, frame: pd.DataFrame) -> pa.Table:
    """`frame` as an Arrow table of the view's schema (columns in schema order, types cast)."""
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ValueError(f"A '{view}' frame needs the columns {schema.names}; missing: {missing}.")
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


class FeatureStoreClient:
    """The project's access to Feast. Construct cheaply; Feast itself is loaded on first use."""

    def __init__(self, repo_dir: Path, cfg: FeastConfig, durable: bool = True) -> None:
        self.repo_dir = Path(repo_dir)
        self.cfg = cfg
        self.durable = durable  # False: offline files are not fsynced (only to measure what that costs)
        self.offline_dir = self.repo_dir / "offline"
        self.registry = ContextFeatureRegistry(self.repo_dir)
        self._store: Any = None
        self._specs: tuple[Any, list[ContextFeatureSpec]] = (None, [])  # (registry fingerprint, specs)

    @property
    def store(self) -> Any:
        """The underlying feast.FeatureStore (raises FeatureStoreError when the repo was never applied)."""
        if self._store is None:
            if not (self.repo_dir / "feature_store.yaml").is_file():
                raise FeatureStoreError(
                    f"No Feast repo at {self.repo_dir}; run `plum stack up` to apply it."
                )
            from feast import FeatureStore

            self._store = FeatureStore(repo_path=str(self.repo_dir))
        return self._store

    # -- the repo and its context features ---------------------------------------------------
    def context_specs(self) -> list[ContextFeatureSpec]:
        """The registered context features (re-read when the registry file changes; a Feast store
        already open then refreshes its registry, so it knows the grown user_context view)."""
        fingerprint = self.registry.fingerprint()
        if fingerprint != self._specs[0]:
            specs = self.registry.specs()
            if self._store is not None and self._specs[0] is not None:
                self._store.refresh_registry()
            self._specs = (fingerprint, specs)
        return self._specs[1]

    def views(self) -> tuple[str, ...]:
        """The repo's views: the fixed four, and user_context once a context feature is registered."""
        return all_views(self.context_specs())

    def schema(self, view: str) -> pa.Schema:
        """A view's Arrow schema; FeatureStoreError for a view the repo does not have."""
        views = self.views()
        if view not in views:
            hint = " (it appears when a context feature is registered)" if view == USER_CONTEXT else ""
            raise FeatureStoreError(f"Unknown feature view '{view}'{hint}; known views: {', '.join(views)}.")
        return view_schema(view, self.context_specs())

    def columns(self, view: str) -> list[str]:
        """The feature names of a view (no entity key, no timestamp)."""
        return [name for name in self.schema(view).names if name not in (ENTITY_KEY[view], TIMESTAMP)]

    def apply(self, specs: list[ContextFeatureSpec] | None = None) -> None:
        """Write feature_store.yaml, create the offline directories and apply the repo (idempotent).
        `specs`: the context features to declare (default: the registry's)."""
        specs = self.context_specs() if specs is None else specs
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        for view in all_views(specs):
            directory = self.offline_dir / view
            directory.mkdir(parents=True, exist_ok=True)
            (self.offline_dir / STAGING / view).mkdir(parents=True, exist_ok=True)
            schema = view_schema(view, specs)
            schema_file = directory / SCHEMA_FILE
            # Rewritten when a view's schema grew, so that dask sees the new columns from the start.
            if not schema_file.exists() or not pq.read_schema(schema_file).equals(schema):
                pq.write_table(schema.empty_table(), schema_file)
            self.align_offline(view, schema)
        write_repo_config(self.repo_dir, self.cfg)
        self._store = None
        self.store.apply(feature_objects(self.offline_dir, specs))

    def align_offline(self, view: str, schema: pa.Schema | None = None) -> int:
        """Give every published file of a view the view's current schema (user_context grows when a
        feature is registered; older files get the new columns, empty), each file replaced atomically.
        Returns how many files were rewritten."""
        schema = schema or self.schema(view)
        rewritten = 0
        for name in self._published_files(view):
            if pq.read_schema(name).equals(schema):
                continue
            table = pq.read_table(name)
            columns = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                       for f in schema]
            staged = self.offline_dir / STAGING / view / f"align-{Path(name).name}"
            staged.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_arrays(columns, schema=schema), staged)
            move_into_place(staged, Path(name), self.durable, replace=True)  # the same rows, more columns
            rewritten += 1
        return rewritten

    def register_context_feature(self, spec: ContextFeatureSpec) -> list[ContextFeatureSpec]:
        """Register a context feature: the Feast repo is applied with the grown user_context view,
        then the registry file records it. Returns every registered feature."""
        specs = self.registry.register(spec, apply=self.apply)
        self.context_specs()
        return specs

    # -- online ---------------------------------------------------------------------------
    def push_online(self, view: str, frame: pd.DataFrame) -> None:
        """Write the absolute feature values of `frame`'s entities (columns: VIEW_COLUMNS[view])."""
        from feast.data_source import PushMode

        table = view_table(view, self.schema(view), frame)
        if table.num_rows:
            self.store.push(f"{view}_push", table.to_pandas(types_mapper=pd.ArrowDtype), to=PushMode.ONLINE)

    def read_online(self, view: str, entity_ids: list[str]) -> pd.DataFrame:
        """One row per requested id, in order: the entity key, then the view's features.

        Cells hold Python values (str, int, float, list) and None where an entity is unknown;
        object columns, so Int64 features stay exact ints instead of floats beside a None.
        """
        return self.read_online_views((view,), entity_ids)

    def read_online_views(self, views: tuple[str, ...], entity_ids: list[str]) -> pd.DataFrame:
        """read_online of several views of one entity in one lookup: the key, then each view's
        features in turn (their names must differ)."""
        refs = [(view, col) for view in views for col in self.columns(view)]  # unknown views refused here
        keys = {ENTITY_KEY[view] for view in views}
        if len(keys) != 1:
            raise FeatureStoreError(f"Views {', '.join(views)} do not share one entity key.")
        key = keys.pop()
        columns = [key, *(col for _, col in refs)]
        if len(set(columns)) != len(columns):
            raise FeatureStoreError(f"Views {', '.join(views)} share feature names; read them one at a time.")
        if not entity_ids:
            return pd.DataFrame({col: [] for col in columns}, dtype=object)
        response = self.store.get_online_features(
            features=[f"{view}:{col}" for view, col in refs],
            entity_rows={key: list(entity_ids)},
        )
        values = response.to_dict()
        return pd.DataFrame({col: values[col] for col in columns}, dtype=object)

    # -- offline --------------------------------------------------------------------------
    def _staged(self, view: str, batch_id: str) -> Path:
        return self.offline_dir / STAGING / view / f"{batch_id}.parquet"

    def _published(self, view: str, batch_id: str) -> Path:
        return self.offline_dir / view / f"{batch_id}.parquet"

    def stage_offline(self, view: str, frame: pd.DataFrame, batch_id: str) -> Path:
        """Write a batch's rows where readers do not look (on disk when this returns, unless not
        durable); invisible until `publish_offline`."""
        _check_batch_id(batch_id)
        table = view_table(view, self.schema(view), frame)
        path = self._staged(view, batch_id)
        make_directory(path.parent, self.durable)
        pq.write_table(table, path)
        if self.durable:
            flush_files([path])
        return path

    def publish_offline(self, view: str, batch_id: str) -> bool:
        """Make a staged batch visible (atomic, durable rename); False, doing nothing, when none is
        staged. A batch published already with the same content stays as it is; with other content,
        PublishConflictError and nothing is replaced."""
        self.schema(view)
        _check_batch_id(batch_id)
        staged = self._staged(view, batch_id)
        if not staged.exists():
            return False
        move_into_place(staged, self._published(view, batch_id), self.durable)
        return True

    def write_offline(self, view: str, frame: pd.DataFrame, batch_id: str) -> bool:
        """Stage and publish in one go; a batch id published already is left as it is (False)."""
        self.schema(view)
        _check_batch_id(batch_id)
        if self._published(view, batch_id).exists():
            return False
        self.stage_offline(view, frame, batch_id)
        return self.publish_offline(view, batch_id)

    def pending_offline(self, views: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
        """(view, batch_id) of every staged, unpublished batch of these views (default: all)."""
        return [(view, path.stem) for view in (views or self.views())
                for path in sorted((self.offline_dir / STAGING / view).glob("*.parquet"))]

    def discard_offline(self, view: str, batch_id: str) -> None:
        """Delete a staged batch (a no-op when there is none)."""
        self.schema(view)
        _check_batch_id(batch_id)
        self._staged(view, batch_id).unlink(missing_ok=True)

    def _published_files(self, view: str) -> list[str]:
        return sorted(str(p) for p in (self.offline_dir / view).glob("*.parquet") if p.name != SCHEMA_FILE)

    def _offline_table(self, view: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.dataset as ds

        schema = self.schema(view)
        files = self._published_files(view)
        if not files:
            return schema.empty_table().select(columns or schema.names)
        return ds.dataset(files, format="parquet", schema=schema).to_table(columns=columns)

    def offline_rows(self, view: str) -> pd.DataFrame:
        """Every published row of a view, from its offline files."""
        return self._offline_table(view).to_pandas()

    def latest_offline(self, view: str) -> pd.DataFrame:
        """The newest published row of every entity of a view, from its offline files."""
        frame = self.offline_rows(view).sort_values(TIMESTAMP, kind="stable")
        return frame.drop_duplicates(ENTITY_KEY[view], keep="last").reset_index(drop=True)

    def historical_features(self, entity_df: pd.DataFrame, features: list[str],
                            full_feature_names: bool = False) -> pd.DataFrame:
        """Point-in-time correct values of `"view:feature"` refs for each row of `entity_df`.

        `entity_df` holds the views' entity keys and an `event_timestamp` column (other columns
        ride along). The result is `entity_df` (same rows, same order) plus one column per
        feature (`view__feature` with full_feature_names), read from published batches only.
        Arrays come back as numpy arrays. No row at or before a timestamp gives None (strings,
        arrays) or NaN (numbers), so an Int64 feature comes back as floats when a value is missing.
        """
        if TIMESTAMP not in entity_df.columns:
            raise FeatureStoreError(f"entity_df needs an '{TIMESTAMP}' column for point-in-time retrieval.")
        refs_by_view: dict[str, list[str]] = {}
        for ref in features:
            view, _, name = ref.partition(":")
            if name not in self.columns(view):
                raise FeatureStoreError(f"Unknown feature {ref!r}; '{view}' has {', '.join(self.columns(view))}.")
            refs_by_view.setdefault(view, []).append(ref)
        names = [_column(ref, full_feature_names) for ref in features]
        if len(set(names)) < len(names):
            raise FeatureStoreError("Two requested features share a name; pass full_feature_names=True.")
        frame = entity_df.reset_index(drop=True)
        when = pd.to_datetime(frame[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
        parts = [frame]
        for view, refs in refs_by_view.items():
            key = ENTITY_KEY[view]
            if key not in frame.columns:
                raise FeatureStoreError(f"entity_df needs a '{key}' column for the features of '{view}'.")
            parts.append(self._historical_view(view, refs, frame[key], when, full_feature_names))
        return pd.concat(parts, axis=1)[[*frame.columns, *names]]

    def _historical_view(self, view: str, refs: list[str], keys: pd.Series, when: pd.Series,
                         full_feature_names: bool) -> pd.DataFrame:
        """One view's feature columns for (keys, when), row for row.

        Works around Feast 0.67's dask store, which on its own (a) drops an entity row whose only
        matches are later than its timestamp, (b) collapses rows sharing (key, timestamp)
        (feast-dev/feast#6787), and (c) fails in dask's sort ("Divisions calculation failed for
        non-numeric column '__event_timestamp'") when a row matches nothing and the files make
        more than one partition. So Feast is asked only for distinct (key, timestamp) pairs that
        have a value at or before the timestamp (found from the key and timestamp columns of the
        published files), and the answers are joined back onto every row; the rest stay empty.
        """
        key = ENTITY_KEY[view]
        request = pd.DataFrame({key: keys, TIMESTAMP: when})
        first_seen = self._offline_table(view, [key, TIMESTAMP]).to_pandas().groupby(key)[TIMESTAMP].min()
        answerable = request[request[key].map(first_seen) <= when].drop_duplicates(ignore_index=True)
        columns = [_column(ref, full_feature_names) for ref in refs]
        if not len(answerable):
            schema = self.schema(view)
            numeric = [pa.types.is_integer(t) or pa.types.is_floating(t)
                       for t in (schema.field(ref.partition(":")[2]).type for ref in refs)]
            return pd.DataFrame({col: float("nan") if num else None for col, num in zip(columns, numeric)},
                                index=request.index)
        answer = self.store.get_historical_features(
            entity_df=answerable, features=refs, full_feature_names=full_feature_names).to_df()
        answer[TIMESTAMP] = pd.to_datetime(answer[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
        values = request.merge(answer, on=[key, TIMESTAMP], how="left", validate="many_to_one")[columns]
        objects = values.select_dtypes(object).columns  # strings and arrays: None, not NaN, when missing
        values[objects] = values[objects].astype(object).where(values[objects].notna(), None)
        return values
