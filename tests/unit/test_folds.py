import random
from datetime import datetime, timedelta, timezone

import pytest

from ingest.config import RewardConfig
from ingest.folds import (ItemStats, UserFoldSettings, UserState, fold_user, item_contributions, merge_into,
                          merge_item_stats)
from ingest.producer import new_event

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
DAY = 86400
SETTINGS = UserFoldSettings(RewardConfig(), history_length=3, cooccurrence_window=2, retention_s=2 * DAY)


def ev(item, minutes, user="u1", kind="click", **fields):
    return new_event("t", user_id=user, item_id=item, event_type=kind, event_time=T0 + timedelta(minutes=minutes),
                     **fields)


def fold_all(batches, settings=SETTINGS, user="u1"):
    state = UserState.empty(user)
    folds = []
    for batch in batches:
        fold = fold_user(state, batch, settings)
        folds.append(fold)
        state = fold.state
    return state, folds


def test_an_event_delivered_twice_counts_once_within_and_across_folds():
    a, b = ev("a", 1), ev("b", 2)
    state, (first, second) = fold_all([[a, b, a], [b]])
    assert [e.item_id for e in first.new_events] == ["a", "b"] and first.duplicates == 1
    assert second.new_events == [] and second.duplicates == 1
    assert state.history.event_count == 2


def test_history_keeps_the_last_n_in_event_time_order_even_when_late():
    state, _ = fold_all([[ev("a", 1), ev("c", 3)], [ev("b", 2), ev("d", 4)]])
    assert state.history.item_ids == ["b", "c", "d"]
    assert state.history.times == sorted(state.history.times)
    assert state.history.event_count == 4


def test_history_is_a_function_of_the_event_set_whatever_the_batching():
    events = [ev(f"i{k}", minutes=random.Random(k).randint(0, 50)) for k in range(12)]
    one, _ = fold_all([events])
    rng = random.Random(7)
    shuffled = events[:]
    rng.shuffle(shuffled)
    split, _ = fold_all([shuffled[:5], shuffled[5:9], shuffled[9:]])
    assert split.history == one.history


def test_pairs_count_items_within_the_window_of_the_history():
    state, (first,) = fold_all([[ev("a", 1), ev("b", 2), ev("c", 3)]])
    assert first.pairs == {("a", "b"): 1, ("a", "c"): 1, ("b", "c"): 1}
    second = fold_user(state, [ev("d", 4)], SETTINGS)
    assert second.pairs == {("b", "d"): 1, ("c", "d"): 1}  # window 2: "a" is out of reach


def test_an_event_older_than_the_retention_is_expired_not_applied_nor_dropped():
    state, _ = fold_all([[ev("a", 0)], [ev("b", 3 * DAY // 60)]])
    late = ev("old", 1)  # 3 days behind the newest event; the retention is 2 days
    fold = fold_user(state, [late, ev("c", 3 * DAY // 60 + 1)], SETTINGS)
    assert fold.expired == [late]
    assert [e.item_id for e in fold.new_events] == ["c"]
    assert "old" not in fold.state.history.item_ids and fold.state.history.event_count == 3


def test_the_seen_set_forgets_ids_beyond_the_retention_and_keeps_those_within():
    a = ev("a", 0)
    state, _ = fold_all([[a, ev("b", 60)]])
    assert set(state.seen) == {a.event_id, ev("b", 60).event_id}
    within = fold_user(state, [ev("c", DAY // 60)], SETTINGS)  # a day on: both ids still remembered
    assert a.event_id in within.state.seen
    assert fold_user(within.state, [a], SETTINGS).duplicates == 1
    beyond = fold_user(within.state, [ev("d", 3 * DAY // 60)], SETTINGS)  # three days on
    assert a.event_id not in beyond.state.seen and len(beyond.state.seen) == 2
    assert beyond.retain_from == beyond.state.history.last_event_time - 2 * DAY
    resent = fold_user(beyond.state, [a], SETTINGS)  # forgotten, and too old to apply: a dead letter
    assert resent.expired == [a] and resent.new_events == []


def test_context_keeps_each_keys_latest_value_by_event_time():
    state, (first, second, third) = fold_all([
        [ev("a", 10, context={"device": "tv", "country": "FR"})],
        [ev("b", 5, context={"device": "phone"})],  # late: older than the tv value
        [ev("c", 20)],
    ])
    assert first.context_changed and second.context_changed and not third.context_changed
    assert state.context.latest() == {"device": "tv", "country": "FR"}
    assert second.state.context.written_us > first.state.context.written_us


def test_a_fold_leaves_the_state_it_was_given_unchanged():
    state, _ = fold_all([[ev("a", 1, context={"device": "tv"})]])
    before = (list(state.history.item_ids), dict(state.seen), dict(state.context.values))
    fold_user(state, [ev("b", 2, context={"device": "phone"})], SETTINGS)
    assert (state.history.item_ids, state.seen, state.context.values) == before


def test_item_stats_merge_in_any_grouping_to_the_same_totals():
    rng = random.Random(3)
    kinds = ["click", "impression", "like"]
    events = [ev(rng.choice("xyz"), rng.randint(0, 100), user=f"u{k}", kind=rng.choice(kinds)) for k in range(40)]
    rewards = [e.reward(RewardConfig()) for e in events]
    times = [int(e.event_time.timestamp()) for e in events]
    whole = item_contributions(events, rewards, times)
    running: dict[str, ItemStats] = {}
    for start in range(0, 40, 7):
        running = {**running, **merge_into(running, item_contributions(events[start:start + 7], rewards[start:start + 7],
                                                                          times[start:start + 7]))}
    for item, stats in whole.items():
        assert running[item].event_count == stats.event_count == sum(e.item_id == item for e in events)
        assert running[item].clicks == sum(e.item_id == item and e.event_type.value == "click" for e in events)
        assert running[item].reward_sum == pytest.approx(stats.reward_sum)
        assert running[item].last_event_time == max(t for e, t in zip(events, times) if e.item_id == item)
    a, b = whole["x"], whole["y"]
    assert merge_item_stats(a, b).event_count == merge_item_stats(b, a).event_count == a.event_count + b.event_count
