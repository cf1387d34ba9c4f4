import pytest

from features.config import FeastConfig, OnlineStoreConfig
from features.repo import VIEW_SCHEMAS, VIEWS, feature_columns
from features.store import repo_config

pytestmark = pytest.mark.unit


def test_sqlite_is_the_default_online_store(tmp_path):
    config = repo_config(tmp_path, FeastConfig())
    assert config["online_store"] == {"type": "sqlite", "path": str(tmp_path / "online_store.db")}
    assert config["offline_store"] == {"type": "file"}
    assert config["registry"] == str(tmp_path / "registry.db")


def test_redis_is_configuration_only(tmp_path):
    cfg = FeastConfig(online_store=OnlineStoreConfig(type="redis", connection_string="redis-1:6379"))
    assert repo_config(tmp_path, cfg)["online_store"] == {"type": "redis", "connection_string": "redis-1:6379"}


def test_views_carry_the_contracted_features():
    assert VIEWS == ("user_history", "item_stats", "item_metadata", "item_sid")
    assert feature_columns("user_history") == ["history_item_ids", "history_rewards", "history_times", "event_count"]
    assert feature_columns("item_stats") == ["impressions", "clicks", "event_count", "mean_reward", "last_event_time"]
    assert feature_columns("item_metadata") == ["title", "tags", "published_at"]
    assert feature_columns("item_sid") == ["sid_version", "sid_codes", "sid_suffix"]
    for view in VIEWS:
        assert VIEW_SCHEMAS[view].names[-1] == "event_timestamp"
