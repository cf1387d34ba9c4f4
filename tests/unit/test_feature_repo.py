"""The declared Feast repo and the feature_store.yaml it runs under; no store is started."""

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from features.config import FeastConfig, OnlineStoreConfig
from features.repo import VIEW_COLUMNS, VIEW_SCHEMAS, VIEWS, feature_columns, feature_objects
from features.store import FeatureStoreClient, repo_config, write_repo_config

pytestmark = pytest.mark.unit


def load_with_feast(repo_dir: Path, cfg: FeastConfig):
    from feast.repo_config import load_repo_config

    return load_repo_config(repo_dir, write_repo_config(repo_dir, cfg))


def test_sqlite_is_the_default_online_store(tmp_path):
    config = repo_config(tmp_path, FeastConfig())
    assert config["online_store"] == {"type": "sqlite", "path": str(tmp_path / "online_store.db")}
    assert config["offline_store"] == {"type": "file"}
    assert config["registry"] == str(tmp_path / "registry.db")
    loaded = load_with_feast(tmp_path, FeastConfig())
    assert type(loaded.online_store).__name__ == "SqliteOnlineStoreConfig"
    assert loaded.online_store.path == str(tmp_path / "online_store.db")
    assert loaded.entity_key_serialization_version == 3
    assert (loaded.project, loaded.provider) == ("plum", "local")


def test_sqlite_path_can_be_configured(tmp_path):
    cfg = FeastConfig(project="shop", online_store=OnlineStoreConfig(path=str(tmp_path / "elsewhere.db")))
    written = yaml.safe_load((write_repo_config(tmp_path, cfg)).read_text())
    assert written["project"] == "shop"
    assert written["online_store"]["path"] == str(tmp_path / "elsewhere.db")


def test_redis_is_configuration_only(tmp_path):
    cfg = FeastConfig(online_store=OnlineStoreConfig(type="redis", connection_string="redis-1:6379"))
    assert repo_config(tmp_path, cfg)["online_store"] == {"type": "redis", "connection_string": "redis-1:6379"}
    loaded = load_with_feast(tmp_path, cfg)  # Feast accepts it without reaching a server
    assert type(loaded.online_store).__name__ == "RedisOnlineStoreConfig"
    assert loaded.online_store.connection_string == "redis-1:6379"
    assert type(loaded.offline_store).__name__ == "DaskOfflineStoreConfig"


def test_views_carry_the_contracted_features():
    assert VIEWS == ("user_history", "item_stats", "item_metadata", "item_sid")
    assert feature_columns("user_history") == ["history_item_ids", "history_rewards", "history_times", "event_count"]
    assert feature_columns("item_stats") == ["impressions", "clicks", "event_count", "mean_reward", "last_event_time"]
    assert feature_columns("item_metadata") == ["title", "tags", "published_at"]
    assert feature_columns("item_sid") == ["sid_version", "sid_codes", "sid_suffix"]
    for view in VIEWS:
        assert VIEW_SCHEMAS[view].names[-1] == "event_timestamp"
    assert VIEW_COLUMNS["user_history"] == [
        "user_id", "history_item_ids", "history_rewards", "history_times", "event_count", "event_timestamp"]
    assert VIEW_COLUMNS["item_metadata"] == ["item_id", "title", "tags", "published_at", "event_timestamp"]


def test_every_view_is_pushed_and_backed_by_its_own_directory(tmp_path):
    from feast import Entity, FeatureService, FeatureView, PushSource
    from feast.types import Array, Float32, Int64, String

    objects = feature_objects(tmp_path)
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    assert list(views) == list(VIEWS)
    for name, view in views.items():
        assert isinstance(view.stream_source, PushSource) and view.stream_source.name == f"{name}_push"
        assert view.batch_source.path == str(tmp_path / name)
        assert view.batch_source.timestamp_field == "event_timestamp"
        assert view.online and view.ttl in (None, timedelta(0))
    entities = {o.name: o.join_key for o in objects if isinstance(o, Entity)}
    assert entities == {"user": "user_id", "item": "item_id"}
    assert [views[name].entities for name in VIEWS] == [["user"], ["item"], ["item"], ["item"]]
    dtypes = {f.name: f.dtype for f in views["user_history"].features}
    assert dtypes == {"history_item_ids": Array(String), "history_rewards": Array(Float32),
                      "history_times": Array(Int64), "event_count": Int64}
    (service,) = [o for o in objects if isinstance(o, FeatureService)]
    assert service.name == "plum_ingest"
    assert feature_objects(tmp_path)[0] is not objects[0]  # declarative: fresh objects, no shared state


@pytest.mark.parametrize("batch_id", ["", "../x", "a/b", ".hidden", "_schema", "_anything"])
def test_batch_ids_that_are_not_plain_file_names_are_refused(tmp_path, batch_id):
    client = FeatureStoreClient(tmp_path, FeastConfig())
    with pytest.raises(ValueError, match="Invalid batch id"):
        client.stage_offline("user_history", pd.DataFrame(), batch_id)
