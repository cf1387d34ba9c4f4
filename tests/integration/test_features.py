"""The Feast repo applied for real into a temporary directory (SQLite), and against a real Redis."""

from __future__ import annotations

import shutil
import subprocess
import time

import pandas as pd
import pytest

from features import FeatureStoreClient, FeatureStoreError
from features.config import FeastConfig, OnlineStoreConfig
from ingest.frames import item_metadata_frame, item_stats_frame, user_history_frame
from ingest.folds import ItemMetadata, ItemStats, UserHistory
from ops.broker import free_port, port_is_open, stop_process

pytestmark = pytest.mark.integration

T = 1_700_000_000


def user(uid: str, items: list[str], count: int, at: int = T) -> UserHistory:
    return UserHistory(uid, items, [0.5] * len(items), list(range(at - len(items), at)), count, at)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> FeatureStoreClient:
    store = FeatureStoreClient(tmp_path_factory.mktemp("feast"), FeastConfig())
    store.apply()
    store.apply()  # idempotent
    return store


def test_online_round_trip_keeps_lists_and_types(client):
    client.push_online("user_history", user_history_frame([user("u1", ["a", "b", "c"], 7)]))
    client.push_online("item_stats", item_stats_frame([ItemStats("a", 3, 2, 9, 4.5, T)]))
    client.push_online("item_metadata", item_metadata_frame([ItemMetadata("a", "Alpha", ["x", "y"], None, None, T)]))
    history = client.read_online("user_history", ["u1", "nobody"])
    assert list(history["history_item_ids"][0]) == ["a", "b", "c"]
    assert list(history["history_times"][0]) == [T - 3, T - 2, T - 1]
    assert history["event_count"][0] == 7
    assert history["history_item_ids"][1] is None
    stats = client.read_online("item_stats", ["a"])
    assert (stats["clicks"][0], stats["event_count"][0]) == (2, 9)
    assert stats["mean_reward"][0] == pytest.approx(0.5)
    meta = client.read_online("item_metadata", ["a"])
    assert meta["title"][0] == "Alpha" and list(meta["tags"][0]) == ["x", "y"]


def test_staged_offline_batch_is_invisible_until_published(client):
    entity = pd.DataFrame({"user_id": ["u2"], "event_timestamp": [pd.Timestamp(T + 10, unit="s", tz="UTC")]})
    client.stage_offline("user_history", user_history_frame([user("u2", ["a"], 1)]), "b-1")
    assert client.pending_offline() == [("user_history", "b-1")]
    before = client.historical_features(entity, ["user_history:event_count"])
    assert before["event_count"].isna().all()
    assert client.publish_offline("user_history", "b-1")
    assert not client.publish_offline("user_history", "b-1")  # idempotent
    after = client.historical_features(entity, ["user_history:event_count"])
    assert list(after["event_count"]) == [1]


def test_historical_retrieval_is_point_in_time_correct(client):
    client.write_offline("user_history", user_history_frame([user("u3", ["a"], 1, at=T)]), "p-1")
    client.write_offline("user_history", user_history_frame([user("u3", ["a", "b"], 2, at=T + 3600)]), "p-2")
    client.write_offline("user_history", user_history_frame([user("u3", ["z"], 99, at=T + 7200)]), "p-2")  # exists: kept
    entity = pd.DataFrame({"user_id": ["u3", "u3"],
                           "event_timestamp": pd.to_datetime([T + 60, T + 3660], unit="s", utc=True)})
    result = client.historical_features(entity, ["user_history:event_count"]).sort_values("event_timestamp")
    assert list(result["event_count"]) == [1, 2]


def test_latest_offline_rows_per_entity(client):
    client.write_offline("item_metadata", item_metadata_frame([ItemMetadata("m1", "Old", [], None, None, T)]), "m-1")
    client.write_offline("item_metadata", item_metadata_frame([
        ItemMetadata("m1", "New", ["t"], None, None, T + 5), ItemMetadata("m2", "Other", [], 0, None, T)]), "m-2")
    latest = client.latest_offline("item_metadata").set_index("item_id")
    assert latest.loc["m1", "title"] == "New" and latest.loc["m2", "title"] == "Other"


def test_unknown_view_and_missing_repo_are_clear_errors(tmp_path, client):
    with pytest.raises(FeatureStoreError, match="Unknown feature view 'user_hist'"):
        client.read_online("user_hist", ["u1"])
    with pytest.raises(FeatureStoreError, match="run `plum stack up`"):
        FeatureStoreClient(tmp_path / "nothing", FeastConfig()).read_online("user_history", ["u1"])


@pytest.fixture
def redis_server(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_is_open("127.0.0.1", port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process.pid, process=process)


def test_redis_online_store_is_configuration_only(tmp_path, redis_server):
    cfg = FeastConfig(online_store=OnlineStoreConfig(type="redis", connection_string=redis_server))
    client = FeatureStoreClient(tmp_path / "feast", cfg)
    client.apply()
    client.push_online("user_history", user_history_frame([user("r1", ["a", "b"], 2)]))
    history = client.read_online("user_history", ["r1"])
    assert list(history["history_item_ids"][0]) == ["a", "b"]
    assert history["event_count"][0] == 2
