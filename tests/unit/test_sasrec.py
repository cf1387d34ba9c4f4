"""SASRec: learns a deterministic next-item pattern, its loss falls, and a seed fixes the result."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.evaluate import leave_one_out, sequences_from_events
from trainer.sasrec import SASRec, SASRecConfig, evaluate_sasrec, score_users, train_sasrec

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
    assert all(row["seconds"] >= 0 for row in history)
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
