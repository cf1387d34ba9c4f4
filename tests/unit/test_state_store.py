from datetime import datetime, timedelta, timezone

import pytest

from ingest.config import RewardConfig
from ingest.folds import UserFoldSettings
from ingest.producer import new_event
from ingest.state_store import PipelineStateStore, ReadPosition

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def ev(user, item, minutes, kind="click"):
    return new_event("t", user_id=user, item_id=item, event_type=kind, event_time=T0 + timedelta(minutes=minutes))


@pytest.fixture
def store(tmp_path):
    s = PipelineStateStore(tmp_path / "state.db", UserFoldSettings(RewardConfig(), history_length=3, cooccurrence_window=2))
    yield s
    s.close()


def apply(store, events):
    store.begin()
    changes = store.apply_events(events)
    store.commit()
    return changes


def test_events_delivered_twice_count_once(store):
    events = [ev("u1", "a", 1), ev("u1", "b", 2)]
    first = apply(store, events + [events[0]])
    assert len(first.new_events) == 2 and first.duplicates == 1
    again = apply(store, events)
    assert again.new_events == [] and again.duplicates == 2
    assert store.load_users(["u1"])["u1"].event_count == 2
    assert store.load_items(["a"])["a"].event_count == 1


def test_history_keeps_the_last_n_in_event_time_order_even_when_late(store):
    apply(store, [ev("u1", "a", 1), ev("u1", "c", 3)])
    apply(store, [ev("u1", "b", 2), ev("u1", "d", 4)])  # b arrives late
    history = store.load_users(["u1"])["u1"]
    assert history.item_ids == ["b", "c", "d"]
    assert history.event_count == 4
    assert history.times == sorted(history.times)


def test_cooccurrence_counts_pairs_within_the_window(store):
    apply(store, [ev("u1", "a", 1), ev("u1", "b", 2), ev("u1", "c", 3), ev("u2", "a", 1), ev("u2", "b", 2)])
    pairs = {(a, b): n for a, b, n in store.cooccurrence()}
    assert pairs[("a", "b")] == 2
    assert pairs[("b", "c")] == 1
    assert pairs[("a", "c")] == 1
    apply(store, [ev("u1", "d", 4)])  # window 2: pairs with b and c only
    pairs = {(a, b): n for a, b, n in store.cooccurrence()}
    assert ("a", "d") not in pairs and pairs[("c", "d")] == 1


def test_read_position_moves_only_over_a_gap_free_prefix(store):
    store.begin()
    store.record_batch("t", 0, 100, 200, 0)  # committed before the batch that precedes it
    store.commit()
    assert store.read_position("t", 0) == 0
    store.begin()
    store.record_batch("t", 0, 0, 100, 0)
    store.commit()
    assert store.read_position("t", 0) == 200


def test_rollback_leaves_no_trace(store):
    store.begin()
    store.apply_events([ev("u1", "a", 1)])
    store.rollback()
    assert store.load_users(["u1"]) == {}
    assert len(apply(store, [ev("u1", "a", 1)]).new_events) == 1


def test_item_stats_accumulate_rewards(store):
    apply(store, [ev("u1", "a", 1, "like"), ev("u2", "a", 2, "click"), ev("u3", "a", 3, "impression")])
    stats = store.load_items(["a"])["a"]
    assert (stats.impressions, stats.clicks, stats.event_count) == (1, 1, 3)
    assert stats.mean_reward == pytest.approx((1.0 + 0.3 + 0.0) / 3)


def test_each_users_latest_context_value_per_key_is_kept(store):
    def ctx(user, minutes, item="a", **context):
        return ev(user, item, minutes).model_copy(update={"context": context})

    changes = apply(store, [ctx("u1", 5, device="tv", hour=7), ctx("u1", 9, device="phone"), ev("u2", "b", 1)])
    assert [c.user_id for c in changes.contexts] == ["u1"]  # u2 carried no context
    assert changes.contexts[0].latest() == {"device": "phone", "hour": 7}
    late = apply(store, [ctx("u1", 7, device="web"), ctx("u1", 10, hour=8)])  # an older event arrives late
    assert late.contexts[0].latest() == {"device": "phone", "hour": 8}
    stored = store.load_contexts(["u1", "u2"])
    assert list(stored) == ["u1"] and stored["u1"].latest() == {"device": "phone", "hour": 8}
    assert stored["u1"].last_event_time == int((T0 + timedelta(minutes=10)).timestamp())
    assert [[c.user_id for c in chunk] for chunk in store.contexts_with({"hour"})] == [["u1"]]
    assert list(store.contexts_with({"surface"})) == []
    # A user's rows never share a timestamp: a restatement (a feature's fill) comes a microsecond later.
    at_10 = int((T0 + timedelta(minutes=10)).timestamp()) * 1_000_000
    assert stored["u1"].written_us == at_10
    [restated] = store.restate_contexts([stored["u1"]])
    assert store.load_contexts(["u1"])["u1"].written_us == restated.written_us == at_10 + 1
    assert apply(store, [ctx("u1", 10, "b", hour=9)]).contexts[0].written_us == at_10 + 2  # same second again
    assert apply(store, [ctx("u1", 11, "c", hour=9)]).contexts[0].written_us == at_10 + 60_000_000


def test_a_reread_range_that_straddles_the_position_still_moves_it(store):
    # A runner replaying from a checkpoint cuts other batch boundaries: [50, 150) re-reads half of
    # [0, 100) and goes on; the position must not stay at 100 for good.
    store.begin()
    store.record_batch("t", 0, 0, 100, 0, last_record="r99")
    store.record_batch("t", 0, 50, 150, 0, last_record="r149")
    store.commit()
    assert store.read_position("t", 0) == 150
    assert store.positions()["t", 0].last_record == "r149"
    store.begin()
    store.record_batch("t", 0, 200, 300, 0, last_record="r299")  # after a gap: waits
    store.record_batch("t", 0, 120, 130, 0, last_record="r129")  # inside what was read: no move
    store.commit()
    assert store.read_position("t", 0) == 150
    store.begin()
    store.record_batch("t", 0, 140, 210, 0, last_record="r209")  # closes the gap, straddling both ends
    store.commit()
    assert store.read_position("t", 0) == 300 and store.positions()["t", 0].last_record == "r299"


def test_a_new_log_epoch_restarts_the_position_and_refuses_batches_of_the_old_one(store):
    from ingest.state_store import EpochMismatchError

    store.begin()
    store.record_batch("t", 0, 0, 100, 0, last_record="r99")
    store.record_batch("t", 0, 150, 200, 0)  # beyond a gap
    store.record_batch("t", 1, 0, 10, 0)
    store.commit()
    assert store.start_epoch("t", 0) == 1
    assert store.positions()["t", 0] == ReadPosition(0, 1, None, 0)  # the old log's ranges are gone
    assert store.epoch("t", 1) == 0
    store.begin()
    with pytest.raises(EpochMismatchError, match="epoch 0 reached a state store in epoch 1"):
        store.record_batch("t", 0, 0, 40, 0, epoch=0)
    store.rollback()
    store.begin()
    store.record_batch("t", 0, 0, 40, 0, epoch=1, last_record="e1-r39")
    store.commit()
    assert store.positions()["t", 0] == ReadPosition(40, 1, "e1-r39", 40)
    # A new broker: every partition read from in its current epoch begins the next one.
    store.start_epoch("t", 2)  # epoch 1 of t[2], nothing read in it yet: keeps it
    assert store.start_new_epochs() == {("t", 0): 2, ("t", 1): 1}
    assert store.epoch("t", 2) == 1


def test_a_state_store_from_before_log_epochs_opens_at_epoch_0(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript("""
        CREATE TABLE read_positions (topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
            PRIMARY KEY (topic, partition)) WITHOUT ROWID;
        CREATE TABLE applied_ranges (topic TEXT NOT NULL, partition INTEGER NOT NULL, start_offset INTEGER NOT NULL,
            next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition, start_offset)) WITHOUT ROWID;
        INSERT INTO read_positions VALUES ('t', 0, 70);
        INSERT INTO applied_ranges VALUES ('t', 0, 90, 95);""")
    db.close()
    store = PipelineStateStore(tmp_path / "state.db")
    try:
        assert store.positions() == {("t", 0): ReadPosition(70, 0, None, 95)}
        store.begin()
        store.record_batch("t", 0, 70, 90, 0, last_record="r89")
        store.commit()
        assert store.read_position("t", 0) == 95
    finally:
        store.close()


def test_commits_are_synced_to_disk_unless_durability_is_off(tmp_path):
    durable = PipelineStateStore(tmp_path / "a.db")
    fast = PipelineStateStore(tmp_path / "b.db", durable=False)
    try:
        assert durable.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is synced per commit
        assert fast.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        durable.close()
        fast.close()


def test_the_seen_ids_stay_within_the_retention_and_an_older_event_comes_back_expired(tmp_path):
    folding = UserFoldSettings(RewardConfig(), retention_s=3600)
    store = PipelineStateStore(tmp_path / "state.db", folding)
    first = ev("u1", "a", 0)
    apply(store, [first, ev("u2", "a", 0)])
    apply(store, [ev("u1", "b", 120)])  # two hours on: u1 forgets the first id, u2 keeps its own
    rows = dict(store.db.execute("SELECT user_id, COUNT(*) FROM seen_event_ids GROUP BY user_id"))
    assert rows == {"u1": 1, "u2": 1}
    again = apply(store, [first])
    assert again.expired == [first] and again.new_events == [] and again.duplicates == 0
    assert store.counters()["events_expired"] == 1
    assert store.load_users(["u1"])["u1"].event_count == 2
    store.close()
