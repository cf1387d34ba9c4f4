"""FeatureStoreClient against a real Feast repo (SQLite online store, file offline store) in a
temporary directory: the value types that cross Feast, the one-file-per-batch offline writes,
and the repairs of Feast's historical retrieval. One applied repo serves the whole module; each
test uses its own entity and batch ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import VIEW_COLUMNS, FeatureStoreClient, FeatureStoreError
from features.config import FeastConfig
from features.repo import VIEW_SCHEMAS
from features.store import SCHEMA_FILE

pytestmark = pytest.mark.integration

T = 1_700_000_000


def at(*seconds: int) -> pd.DatetimeIndex:
    return pd.to_datetime(list(seconds), unit="s", utc=True)


def histories(rows: list[tuple[str, list[str], list, list, int, int]]) -> pd.DataFrame:
    """(user_id, item ids, rewards, times, event_count, event time) per row."""
    return pd.DataFrame(
        [(u, items, rewards, times, count) for u, items, rewards, times, count, _ in rows],
        columns=VIEW_COLUMNS["user_history"][:-1],
    ).assign(event_timestamp=at(*(row[-1] for row in rows)))


def stats(item_id: str, clicks: int, when: int) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [item_id], "impressions": [10], "clicks": [clicks], "event_count": [10 + clicks],
                         "mean_reward": [0.25], "last_event_time": [when], "event_timestamp": at(when)})


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> FeatureStoreClient:
    store = FeatureStoreClient(tmp_path_factory.mktemp("feast"), FeastConfig())
    store.apply()
    return store


def test_online_reads_give_python_values_of_the_declared_types(client):
    client.push_online("user_history", histories([
        ("py-1", ["a", "b"], [1, 0], [T - 2, T - 1], 2, T),  # int rewards into Array(Float32)
        ("py-2", np.array(["c"]), np.array([0.5], dtype=np.float32), np.array([T], dtype=np.int64), 1, T),
        ("py-3", [], [], [], 0, T),
    ]))
    client.push_online("item_metadata", pd.DataFrame({
        "item_id": ["py-m1", "py-m2"], "title": ["Alpha", "Beta"], "tags": [["x", "y"], []],
        "published_at": pd.array([None, T], dtype="Int64"), "event_timestamp": at(T, T)}))
    client.push_online("item_stats", stats("py-s1", 3, T))

    users = client.read_online("user_history", ["py-2", "nobody", "py-1", "py-3"])
    assert list(users["user_id"]) == ["py-2", "nobody", "py-1", "py-3"]
    first = users.iloc[2]
    assert first["history_item_ids"] == ["a", "b"] and first["history_rewards"] == [1.0, 0.0]
    assert first["history_times"] == [T - 2, T - 1] and type(first["history_times"][0]) is int
    assert type(first["event_count"]) is int and first["event_count"] == 2
    assert users.iloc[0]["history_rewards"] == [0.5] and users.iloc[0]["history_item_ids"] == ["c"]
    assert users.iloc[3]["history_item_ids"] == [] and users.iloc[3]["event_count"] == 0
    assert users.iloc[1].drop("user_id").isna().all()  # unknown entity: a row of None

    meta = client.read_online("item_metadata", ["py-m1", "py-m2"])
    assert meta.to_dict("records") == [
        {"item_id": "py-m1", "title": "Alpha", "tags": ["x", "y"], "published_at": None},
        {"item_id": "py-m2", "title": "Beta", "tags": [], "published_at": T},
    ]
    row = client.read_online("item_stats", ["py-s1"]).iloc[0]
    assert (row["clicks"], row["event_count"], row["last_event_time"]) == (3, 13, T)
    assert type(row["last_event_time"]) is int and row["mean_reward"] == pytest.approx(0.25)

    empty = client.read_online("item_stats", [])
    assert len(empty) == 0 and list(empty.columns) == VIEW_COLUMNS["item_stats"][:-1]


def test_a_frame_without_a_view_column_is_refused_and_writes_nothing(client):
    frame = stats("bad-s1", 1, T).drop(columns=["clicks"])
    with pytest.raises(ValueError, match=r"missing: \['clicks'\]"):
        client.push_online("item_stats", frame)
    with pytest.raises(ValueError, match=r"missing: \['clicks'\]"):
        client.write_offline("item_stats", frame, "bad-1")
    assert client.read_online("item_stats", ["bad-s1"])["clicks"].isna().all()
    assert not (client.offline_dir / "item_stats" / "bad-1.parquet").exists()
    assert client.pending_offline() == []


def test_write_offline_twice_with_one_batch_id_keeps_one_file_and_the_first_rows(client):
    assert client.write_offline("item_stats", stats("once-s1", 1, T), "once-1")
    assert not client.write_offline("item_stats", stats("once-s1", 99, T + 5), "once-1")
    files = [p.name for p in (client.offline_dir / "item_stats").iterdir() if p.name.startswith("once-")]
    assert files == ["once-1.parquet"]
    assert pq.read_table(client.offline_dir / "item_stats" / "once-1.parquet").column("clicks").to_pylist() == [1]
    assert client.publish_offline("item_stats", "once-1") is False  # nothing staged: a no-op


def test_a_discarded_batch_never_becomes_visible(client):
    client.stage_offline("item_stats", stats("gone-s1", 4, T), "gone-1")
    client.stage_offline("item_stats", stats("kept-s1", 5, T), "kept-1")
    assert client.pending_offline(("item_stats",)) == [("item_stats", "gone-1"), ("item_stats", "kept-1")]
    client.discard_offline("item_stats", "gone-1")
    client.discard_offline("item_stats", "gone-1")  # idempotent
    assert client.publish_offline("item_stats", "gone-1") is False
    assert client.publish_offline("item_stats", "kept-1") is True
    assert client.pending_offline() == []
    entity = pd.DataFrame({"item_id": ["gone-s1", "kept-s1"], "event_timestamp": at(T + 1, T + 1)})
    found = client.historical_features(entity, ["item_stats:clicks"])
    assert found["clicks"].isna().tolist() == [True, False] and found["clicks"][1] == 5


def test_historical_retrieval_keeps_every_entity_row_in_order(client):
    client.write_offline("user_history", histories([("pit-u1", ["a"], [1.0], [T], 1, T)]), "pit-1")
    client.write_offline("user_history", histories([("pit-u1", ["a", "b"], [1.0, 0.5], [T, T + 3600], 2, T + 3600)]),
                         "pit-2")
    entity = pd.DataFrame({
        "user_id": ["pit-u1", "pit-u1", "pit-u1", "pit-u1", "pit-nobody"],
        # before the first value (Feast alone drops this row), between, and twice the same row
        # (Feast alone collapses the two), and an unknown user
        "event_timestamp": at(T - 60, T + 60, T + 7200, T + 7200, T + 7200),
        "label": [10, 11, 12, 13, 14],
    }, index=[5, 4, 3, 2, 1])
    found = client.historical_features(entity, ["user_history:event_count", "user_history:history_item_ids"])
    assert list(found.columns) == ["user_id", "event_timestamp", "label", "event_count", "history_item_ids"]
    assert list(found["label"]) == [10, 11, 12, 13, 14]
    assert found["event_count"].tolist()[1:4] == [1, 2, 2]
    assert found["event_count"].isna().tolist() == [True, False, False, False, True]
    assert [None if v is None else list(v) for v in found["history_item_ids"]] == [
        None, ["a"], ["a", "b"], ["a", "b"], None]


def test_unknown_entities_beside_many_batch_files_get_empty_values(client):
    # Asked directly, Feast's dask store raises "Divisions calculation failed" for this request.
    for k in range(4):
        client.write_offline("item_stats", stats(f"many-s{k}", k, T + k), f"many-{k}")
    entity = pd.DataFrame({"item_id": [f"many-s{k}" for k in range(4)] + [f"many-unknown-{k}" for k in range(4)],
                           "event_timestamp": at(*[T + 10] * 8)})
    found = client.historical_features(entity, ["item_stats:clicks", "item_stats:mean_reward"])
    assert found["clicks"].tolist()[:4] == [0, 1, 2, 3] and found["clicks"][4:].isna().all()
    assert found["mean_reward"][:4].tolist() == pytest.approx([0.25] * 4)


def test_views_in_one_historical_call_do_not_blank_each_other(client):
    client.write_offline("item_stats", stats("mix-s1", 7, T), "mix-1")
    client.write_offline("user_history", histories([("mix-u1", ["z"], [1.0], [T + 100], 1, T + 100)]), "mix-2")
    # At T + 50 the user has no history yet but the item has stats; item_sid has no batch at all.
    entity = pd.DataFrame({"user_id": ["mix-u1"], "item_id": ["mix-s1"], "event_timestamp": at(T + 50)})
    found = client.historical_features(entity, ["user_history:history_item_ids", "item_stats:clicks",
                                                "item_sid:sid_codes"])
    assert found.loc[0, "clicks"] == 7
    assert found.loc[0, "history_item_ids"] is None and found.loc[0, "sid_codes"] is None
    with pytest.raises(FeatureStoreError, match="full_feature_names=True"):
        client.historical_features(entity, ["user_history:event_count", "item_stats:event_count"])
    both = client.historical_features(entity, ["user_history:event_count", "item_stats:event_count"],
                                      full_feature_names=True)
    assert both.loc[0, "item_stats__event_count"] == 17 and pd.isna(both.loc[0, "user_history__event_count"])
    with pytest.raises(FeatureStoreError, match="needs a 'user_id' column"):
        client.historical_features(entity.drop(columns=["user_id"]), ["user_history:event_count"])


def test_apply_again_keeps_the_data_and_restores_the_schema_file(client):
    client.push_online("item_stats", stats("again-s1", 2, T))
    client.write_offline("item_stats", stats("again-s1", 2, T), "again-1")
    schema_file = client.offline_dir / "item_sid" / SCHEMA_FILE
    pq.write_table(pa.table({"item_id": pa.array([], pa.string())}), schema_file)  # as an older repo had it

    again = FeatureStoreClient(client.repo_dir, client.cfg)
    again.apply()
    assert pq.read_schema(schema_file).equals(VIEW_SCHEMAS["item_sid"])
    assert again.read_online("item_stats", ["again-s1"])["clicks"].tolist() == [2]
    entity = pd.DataFrame({"item_id": ["again-s1"], "event_timestamp": at(T + 1)})
    assert again.historical_features(entity, ["item_stats:clicks"])["clicks"].tolist() == [2]
