"""The evaluation protocol: sequences, leave-one-out, Recall/NDCG, seen-item exclusion, effective vocabulary."""

import math

import numpy as np
import pytest

from trainer.evaluate import effective_vocabulary, leave_one_out, rank_metrics, sequences_from_events, top_k_excluding

pytestmark = pytest.mark.unit


def as_lists(arrays):
    return [list(map(int, a)) for a in arrays]


def test_sequences_are_time_ordered_per_user_with_ties_in_given_order():
    users = ["u2", "u1", "u2", "u1", "u2", "u1"]
    items = ["c", "a", "b", "b", "a", "c"]
    times = [5.0, 3.0, 1.0, 3.0, 5.0, 2.0]
    seqs = sequences_from_events(users, items, times)
    assert list(seqs.user_ids) == ["u1", "u2"]
    assert list(seqs.item_ids) == ["a", "b", "c"]
    # u1: c@2, then a@3 and b@3 tied in the given order; u2: b@1, then c@5 and a@5 tied.
    assert as_lists(seqs.sequences) == [[2, 0, 1], [1, 2, 0]]


def test_sequences_use_the_catalogue_order_and_reject_unknown_items():
    seqs = sequences_from_events(["u", "u"], ["x", "y"], catalogue=["y", "z", "x"])
    assert seqs.n_items == 3
    assert as_lists(seqs.sequences) == [[2, 0]]
    with pytest.raises(ValueError, match="not in the catalogue"):
        sequences_from_events(["u"], ["q"], catalogue=["y"])
    with pytest.raises(ValueError, match="no events"):
        sequences_from_events([], [])


def test_leave_one_out_targets_histories_and_cap():
    seqs = sequences_from_events(
        ["a"] * 6 + ["b"] * 3 + ["c"] * 2, [0, 1, 2, 3, 4, 5] + [7, 8, 9] + [6, 5],
        catalogue=list(range(10)),
    )
    split = leave_one_out(seqs, max_history=2)
    assert as_lists(split.train) == [[0, 1, 2, 3], [7], [6, 5]]  # c has 2 items: training only
    assert list(split.valid.users) == [0, 1] and list(split.test.users) == [0, 1]
    assert list(split.valid.targets) == [4, 8] and list(split.test.targets) == [5, 9]
    assert as_lists(split.valid.histories) == [[2, 3], [7]]  # capped at the last 2
    assert as_lists(split.test.histories) == [[3, 4], [7, 8]]  # includes the validation item
    assert as_lists(split.valid.seen) == [[0, 1, 2, 3], [7]]  # uncapped, for exclusion
    assert as_lists(split.test.seen) == [[0, 1, 2, 3, 4], [7, 8]]
    with pytest.raises(ValueError, match="which"):
        split.eval_set("train")


def test_rank_metrics_hit_at_rank_1_and_3_a_miss_and_padding():
    ranked = np.array([
        [7, 1, 2, 3, 4],     # target 7 at rank 1
        [1, 2, 7, 3, 4],     # target 7 at rank 3
        [1, 2, 3, 4, 5],     # miss
        [1, -1, -1, -1, -1],  # padding never hits
    ])
    targets = np.array([7, 7, 7, 7])
    got = rank_metrics(ranked, targets, ks=(1, 3, 5))
    assert got["recall@1"] == pytest.approx(1 / 4)
    assert got["recall@3"] == pytest.approx(2 / 4)
    assert got["recall@5"] == pytest.approx(2 / 4)
    assert got["ndcg@1"] == pytest.approx(1 / 4)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert got["ndcg@5"] == pytest.approx((1 + 0.5) / 4)


def test_rank_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="between 1 and"):
        rank_metrics(np.zeros((2, 5), int), np.zeros(2, int), ks=(10,))
    with pytest.raises(ValueError, match="no users"):
        rank_metrics(np.zeros((0, 5), int), np.zeros(0, int))
    with pytest.raises(ValueError, match="targets"):
        rank_metrics(np.zeros((2, 5), int), np.array([0, -1]))


def test_top_k_is_best_first_with_ties_by_lower_index():
    scores = np.array([[0.1, 0.5, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3, 0.3]])
    assert top_k_excluding(scores, 3).tolist() == [[4, 1, 2], [0, 1, 2]]


def test_top_k_excludes_seen_items_and_pads_when_too_few_remain():
    scores = np.array([[0.1, 0.5, 0.4, 0.2, 0.9], [0.9, 0.8, 0.7, 0.6, 0.5]])
    ranked = top_k_excluding(scores, 4, exclude=[np.array([4, 1]), np.array([0, 1, 2])])
    assert ranked.tolist() == [[2, 3, 0, -1], [3, 4, -1, -1]]
    assert top_k_excluding(scores, 2, exclude=None).tolist() == [[4, 1], [0, 1]]


def test_top_k_rejects_bad_input():
    with pytest.raises(ValueError, match="catalogue size"):
        top_k_excluding(np.zeros((1, 3)), 4)
    with pytest.raises(ValueError, match="one item array per user"):
        top_k_excluding(np.zeros((2, 3)), 1, exclude=[np.array([0])])
    with pytest.raises(ValueError, match="NaN"):
        top_k_excluding(np.array([[0.0, np.nan]]), 1)


def test_effective_vocabulary_counts_items_filling_95_percent_of_slots():
    # 40 slots: item 0 x20, item 1 x10, item 2 x8, items 3 and 4 once each; 95% of 40 = 38.
    ranked = np.array([0] * 20 + [1] * 10 + [2] * 8 + [3, 4]).reshape(10, 4)
    assert effective_vocabulary(ranked) == 3
    assert effective_vocabulary(ranked, coverage=1.0) == 5
    assert effective_vocabulary(ranked, coverage=0.5) == 1
    # Padding is not a slot: 39 slots, 95% = 37.05 still needs items 0-2.
    padded = ranked.copy()
    padded[9, 3] = -1
    assert effective_vocabulary(padded) == 3
    with pytest.raises(ValueError, match="no items"):
        effective_vocabulary(np.full((2, 3), -1))
