"""SASRec: learns a deterministic next-item pattern, its loss falls, and a seed fixes the result."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.evaluate import leave_one_out, sequences_from_events
from trainer.sasrec import SASRec, SASRecConfig, evaluate_sasrec, score_users, train_sasrec, training_windows

pytestmark = pytest.mark.unit

N_ITEMS = 24


def successor_split(n_users=160, seed=0):
    """Every user walks the catalogue in steps of +1 (mod N_ITEMS) from a random start."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(n_users):
        start, length = rng.integers(N_ITEMS), rng.integers(5, 10)
        users += [user] * length
        items += [(start + step) % N_ITEMS for step in range(length)]
    return leave_one_out(sequences_from_events(users, items, catalogue=list(range(N_ITEMS))), max_history=4)


CFG = SASRecConfig(
    n_items=N_ITEMS, max_len=4, dim=16, n_heads=2, ffn_dim=32, dropout=0.1, learning_rate=1e-2,
    batch_size=32, epochs=8, eval_every=4, patience=2,
)


@pytest.fixture(scope="module")
def trained():
    split = successor_split()
    rows = []
    model, history = train_sasrec(split, CFG, progress=rows.append)
    return split, model, history, rows


def test_sasrec_learns_the_successor_pattern(trained):
    split, model, _, _ = trained
    metrics = evaluate_sasrec(model, split, "test", ks=(1, 5))
    assert metrics["recall@1"] > 0.9  # chance is about 1 / N_ITEMS
    assert metrics["ndcg@5"] > 0.9


def test_loss_goes_down_and_progress_reports_every_epoch(trained):
    _, _, history, rows = trained
    assert rows == history
    assert [row["epoch"] for row in history] == list(range(1, CFG.epochs + 1))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert all(row["seconds"] > 0 for row in history)
    assert "valid_recall@10" in history[CFG.eval_every - 1] and "valid_recall@10" not in history[0]


def test_same_seed_gives_the_same_model(trained):
    split, model, history, _ = trained
    again, again_history = train_sasrec(split, CFG)
    histories = split.test.histories
    np.testing.assert_array_equal(score_users(model, histories), score_users(again, histories))
    assert [row["loss"] for row in history] == [row["loss"] for row in again_history]


def test_scores_cover_the_catalogue_in_batches(trained):
    split, model, _, _ = trained
    scores = score_users(model, split.test.histories, batch_size=64)
    assert scores.shape == (len(split.test.histories), N_ITEMS)
    np.testing.assert_allclose(scores[:3], score_users(model, split.test.histories[:3]), rtol=1e-5, atol=1e-5)


def test_bad_config_and_mismatched_split_are_value_errors():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(n_items=10, dim=10, n_heads=3)
    with pytest.raises(ValueError, match="catalogue"):
        train_sasrec(successor_split(), dataclasses.replace(CFG, n_items=N_ITEMS + 1))


def test_input_longer_than_max_len_is_rejected():
    model = SASRec(CFG, nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, CFG.max_len + 1), jnp.int32))


@pytest.mark.parametrize("length", [1, 2, 5, 6, 11, 23])
def test_training_windows_make_every_position_a_target_exactly_once(length):
    sequence = np.arange(100, 100 + length, dtype=np.int32)
    windows = training_windows(sequence, max_len=5)
    assert all(2 <= len(w) <= 6 for w in windows)
    targets = sorted(int(t) for w in windows for t in w[1:])
    assert targets == list(range(101, 100 + length))  # every item after the first, once
    # each window is a contiguous run of the sequence, the newest first
    assert all(np.array_equal(w, np.arange(w[0], w[0] + len(w))) for w in windows)
    assert not windows or windows[0][-1] == sequence[-1]


def test_long_sequences_train_on_every_position_not_only_the_last_window():
    """A pattern that only a sequence's early part shows is learnt: the old last-window training never saw it."""
    users, items = [], []
    for user in range(60):
        early = [(user + step) % N_ITEMS for step in range(12)]  # +1 steps
        late = [int(i) for i in np.random.default_rng(user).integers(0, N_ITEMS, 12)]  # noise
        users += [user] * 24
        items += early + late
    split = leave_one_out(sequences_from_events(users, items, catalogue=list(range(N_ITEMS))), max_history=4)
    cfg = dataclasses.replace(CFG, epochs=12, eval_every=12, dropout=0.0)
    model, _ = train_sasrec(split, cfg)
    histories = [np.array([(u + s) % N_ITEMS for s in range(4)], np.int32) for u in range(20)]
    top = score_users(model, histories).argmax(-1)
    hits = np.mean([t == (u + 4) % N_ITEMS for u, t in enumerate(top)])
    assert hits > 0.8  # only the early +1 walks teach this; the late items are random


def test_bce_sasrec_learns_the_successor_pattern():
    split = successor_split()
    model, history = train_sasrec(split, dataclasses.replace(CFG, loss="bce", epochs=16, eval_every=16))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert evaluate_sasrec(model, split, "test", ks=(1, 5))["recall@5"] > 0.9


def test_unknown_loss_is_a_value_error():
    with pytest.raises(ValueError, match="loss must be one of ce, bce"):
        SASRecConfig(n_items=10, loss="bpr")
