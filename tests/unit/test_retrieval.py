"""Generative retrieval on a tiny model: SFT learns a pattern, beam search returns distinct real
items, and its scores are the model's teacher-forced log-probabilities of those SIDs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.data import RewardedSequences, history_tokens, sft_batches
from trainer.evaluate import EvalSet
from trainer.model import DECODER_SIZES, Decoder
from trainer.retrieval import (
    Recommender, RetrievalSettings, Validation, codebook_rows, evaluate, init_model, make_catalogue, top_k_unseen,
    train_stages,
)
from trainer.train import OptimConfig, TrainLoop
from trainer.vocab import VocabLayout

pytestmark = pytest.mark.unit

N_ITEMS = 30


def _setup():
    rng = np.random.default_rng(0)
    codes = rng.permutation([(a, b) for a in range(6) for b in range(6)])[:N_ITEMS]
    sids = np.concatenate([codes, np.zeros((N_ITEMS, 1), int)], 1)
    layout = VocabLayout((6, 6), 1, text_ids=())
    catalogue = make_catalogue(layout, sids, [[] for _ in range(N_ITEMS)])
    # Item i is always followed by item (i + 1) mod N: a pattern only the history reveals.
    starts = rng.integers(N_ITEMS, size=120)
    items = tuple((s + np.arange(6)) % N_ITEMS for s in starts)
    return layout, catalogue, RewardedSequences(items, tuple(np.ones(6) for _ in items))


@pytest.fixture(scope="module")
def trained():
    layout, catalogue, sequences = _setup()
    settings = RetrievalSettings(model_size="tiny", sft_steps=300, batch_size=32, learning_rate=1e-2, warmup_steps=20,
                                 max_history=4, beam_width=8, eval_batch=16)
    model = Decoder(DECODER_SIZES["tiny"].replace(vocab_size=layout.size), __import__("flax").nnx.Rngs(0))
    model, history = train_stages(model, settings, layout, catalogue, sequences, say=lambda m: None)
    return layout, catalogue, model, settings, history


def test_sft_learns_the_next_item_and_beams_are_distinct_real_items(trained):
    layout, catalogue, model, settings, history = trained
    assert history["sft"][-1]["loss"] < 0.5 * history["sft"][0]["loss"]
    histories = tuple(np.array([(s + k) % N_ITEMS for k in range(4)]) for s in range(N_ITEMS))
    targets = np.array([(s + 4) % N_ITEMS for s in range(N_ITEMS)], np.int32)
    eval_set = EvalSet(np.arange(N_ITEMS), histories, targets, histories)
    rec = Recommender(model, layout, catalogue, settings.max_history)
    metrics, ranked = evaluate(rec, eval_set, [np.ones(4)] * N_ITEMS, settings.beam_width, settings.eval_batch, k=5,
                               invalid_rate_users=N_ITEMS)
    assert metrics["recall@5"] > 0.8
    # Unconstrained beams of a model that learned the catalogue are mostly real items (the toy run: 17% invalid).
    assert metrics["invalid_sid_rate_unconstrained"] < 0.5
    for row, seen in zip(ranked, histories):
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real) and not set(real.tolist()) & set(seen.tolist())


def test_beam_scores_are_teacher_forced_log_probabilities(trained):
    layout, catalogue, model, settings, _ = trained
    rec = Recommender(model, layout, catalogue, settings.max_history)
    history = [3, 4, 5]
    beams, scores = rec.search([history], [np.ones(3)], beam_width=N_ITEMS, batch_size=1)
    assert sorted(beams[0].tolist()) == list(range(N_ITEMS))  # beam >= catalogue: every item, once
    prompt = history_tokens(layout, catalogue, history, [1.0] * 3)
    for item, score in zip(beams[0][:5], scores[0][:5]):
        sid = catalogue.item_sids[item].tolist()
        tokens = jnp.asarray([prompt + sid])
        logits, _ = model(tokens, jnp.ones_like(tokens, bool))  # the whole vocabulary's logits
        # each SID token's log-probability is a softmax over its own SID position's tokens
        forced = sum(float(jax.nn.log_softmax(logits[0, len(prompt) - 1 + d, o:o + w])[t - o])
                     for d, (t, (o, w)) in enumerate(zip(sid, layout.sid_levels)))
        assert score == pytest.approx(forced, abs=1e-4)
    assert list(scores[0]) == sorted(scores[0], reverse=True)


def test_validation_selection_keeps_the_best_checked_model():
    """SFT checked on validation targets every few steps: it stops after `patience` checks without a
    better Recall@10 (NDCG@10 breaking ties) and the returned model is the best check's, not the
    last: the same parameters as a plain run stopped at the selected step."""
    layout, catalogue, sequences = _setup()
    histories = tuple(np.array([(s + k) % N_ITEMS for k in range(4)]) for s in range(N_ITEMS))
    targets = np.array([(s + 4) % N_ITEMS for s in range(N_ITEMS)], np.int32)
    validation = Validation(EvalSet(np.arange(N_ITEMS), histories, targets, histories), [np.ones(4)] * N_ITEMS)
    settings = RetrievalSettings(model_size="tiny", sft_steps=400, batch_size=32, learning_rate=1e-2, warmup_steps=20,
                                 max_history=4, beam_width=8, eval_batch=16, validate_every=40, patience=2)
    fresh = lambda: Decoder(DECODER_SIZES["tiny"].replace(vocab_size=layout.size), nnx.Rngs(0))  # noqa: E731
    model, history = train_stages(fresh(), settings, layout, catalogue, sequences, say=lambda m: None,
                                  validation=validation)
    checks, selection = history["sft_selection"][:-1], history["sft_selection"][-1]
    best = max((c["recall@10"], c["ndcg@10"]) for c in checks)
    assert (selection["recall@10"], selection["ndcg@10"]) == best and best[0] > 0.5
    assert [c["step"] for c in checks] == [40 * (i + 1) for i in range(len(checks))]
    later = [(c["recall@10"], c["ndcg@10"]) for c in checks if c["step"] > selection["selected_step"]]
    assert selection["steps_run"] == checks[-1]["step"] < 400  # this run's curve flattens: it stops early
    assert len(later) == settings.patience and max(later) <= best
    # The same batches and schedule without checks, stopped at the selected step and at the last one.
    batches = sft_batches(layout, catalogue, sequences, settings.batch_size, settings.max_history,
                          settings.buckets(layout), np.random.default_rng(settings.seed))
    plain = TrainLoop(fresh(), OptimConfig(settings.learning_rate, settings.warmup_steps, settings.sft_steps),
                      sid_levels=layout.sid_levels)
    tokens = jnp.asarray([history_tokens(layout, catalogue, h, np.ones(4)) for h in histories])
    mask = jnp.ones(tokens.shape, bool)
    plain.run(batches, selection["selected_step"])
    at_selected = np.asarray(plain.model()(tokens, mask)[0])  # before the next step donates the state
    plain.run(batches, selection["steps_run"] - selection["selected_step"])
    logits = np.asarray(model(tokens, mask)[0])
    np.testing.assert_allclose(logits, at_selected, atol=1e-4)
    assert np.abs(logits - np.asarray(plain.model()(tokens, mask)[0])).max() > 1e-2


def test_stages_with_weight_averaging_return_the_average():
    """With ema_decay the stages return the moving average of the weights, not the last step's."""
    layout, catalogue, sequences = _setup()
    settings = RetrievalSettings(model_size="tiny", sft_steps=30, batch_size=16, learning_rate=1e-2, warmup_steps=5,
                                 max_history=4, ema_decay=0.9)
    fresh = lambda: Decoder(DECODER_SIZES["tiny"].replace(vocab_size=layout.size), nnx.Rngs(0))  # noqa: E731
    model, _ = train_stages(fresh(), settings, layout, catalogue, sequences, say=lambda m: None)
    batches = sft_batches(layout, catalogue, sequences, settings.batch_size, settings.max_history,
                          settings.buckets(layout), np.random.default_rng(settings.seed))
    loop = TrainLoop(fresh(), OptimConfig(settings.learning_rate, settings.warmup_steps, settings.sft_steps),
                     sid_levels=layout.sid_levels, ema_decay=settings.ema_decay)
    loop.run(batches, settings.sft_steps)
    tokens = jnp.asarray([history_tokens(layout, catalogue, [0, 1, 2], np.ones(3))])
    mask = jnp.ones(tokens.shape, bool)
    logits = np.asarray(model(tokens, mask)[0])
    np.testing.assert_allclose(logits, np.asarray(loop.averaged_model()(tokens, mask)[0]), atol=1e-5)
    assert np.abs(logits - np.asarray(loop.model()(tokens, mask)[0])).max() > 1e-3


def test_top_k_unseen_skips_seen_and_invalid_items():
    beams = np.array([[4, -1, 2, 7, 1]])
    assert top_k_unseen(beams, [np.array([2])], 3).tolist() == [[4, 7, 1]]
    assert top_k_unseen(beams, None, 6).tolist() == [[4, 2, 7, 1, -1, -1]]


def test_codebook_init_places_each_levels_codebook_geometry_in_the_sid_rows():
    """sid_init="codebook": the SID code rows are the codebooks projected to the model width, so
    distances between codes of a level keep their order; other rows stay as the random init."""
    layout, _, _ = _setup()
    rng = np.random.default_rng(1)
    codebooks = [rng.normal(size=(6, 8)) for _ in layout.codebook_sizes]
    codebooks[0][3] = codebooks[0][2] + 1e-3  # two near-identical codes of level 0
    random = init_model(RetrievalSettings(model_size="tiny"), layout)
    model = init_model(RetrievalSettings(model_size="tiny", sid_init="codebook"), layout, codebooks=codebooks)
    table, before = np.asarray(model.embed.embedding[...]), np.asarray(random.embed.embedding[...])
    lo = layout.sid_offsets[0]
    rows = table[lo:lo + 12]
    np.testing.assert_allclose(rows, codebook_rows(codebooks, table.shape[1]), atol=1e-6)
    np.testing.assert_allclose(np.delete(table, np.arange(lo, lo + 12), 0), np.delete(before, np.arange(lo, lo + 12), 0))
    for level, codebook in enumerate(codebooks):
        part = rows[6 * level:6 * level + 6]
        assert abs(part.std() - 0.02) < 1e-4
        near = np.linalg.norm(codebook[:, None] - codebook[None], axis=-1)[np.triu_indices(6, 1)]
        far = np.linalg.norm(part[:, None] - part[None], axis=-1)[np.triu_indices(6, 1)]
        assert np.corrcoef(near, far)[0, 1] > 0.9
    assert np.linalg.norm(rows[2] - rows[3]) < 0.05 * np.linalg.norm(rows[2] - rows[4])
    with pytest.raises(ValueError, match="one codebook per SID level"):
        init_model(RetrievalSettings(model_size="tiny", sid_init="codebook"), layout, codebooks=codebooks[:1])
