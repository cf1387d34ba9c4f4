"""Constrained beam search against teacher forcing and a hand-written greedy decode, on a toy model with a cache."""

from __future__ import annotations

import functools
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.decoding import BeamResult, SIDTrie, _blocked_children, beam_search, greedy_search, invalid_sid_rate

pytestmark = pytest.mark.equivalence

# 12 text tokens, then four SID depths (three codebook levels and a collision suffix), then one more token
RANGES = ((12, 6), (18, 4), (22, 3), (25, 2))
VOCAB = 28
DEPTH = len(RANGES)
ALL_SIDS = list(itertools.product(*(range(offset, offset + width) for offset, width in RANGES)))


RANK = 8
NODE_BUCKET = 64  # every test catalogue (<= 64 items) gives the same table shapes, so searches compile once


def toy_init_cache(n: int, max_len: int) -> dict:
    """The toy model's cache: per-row recurrent state plus a shared 0-d leaf, like a KV cache's write index."""
    zeros = jnp.zeros((n,), jnp.int32)
    return {"last": zeros, "prev": zeros, "count": zeros, "ctx": jnp.zeros((n, RANK)), "length": jnp.int32(0)}


def toy_step(params: dict, tokens: jax.Array, mask: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """A recurrent toy LM honouring the step_fn contract once `params` are bound.

    Logits depend on the last two real tokens, a decaying per-row sum over everything read so far (so each
    user's prompt lives in the cache) and the count of real tokens; padding (mask False) changes nothing. A
    beam-reordering bug would mix rows up and change every score.
    """

    def read(state, xs):
        token, real = xs
        state = {
            "prev": jnp.where(real, state["last"], state["prev"]),
            "last": jnp.where(real, token, state["last"]),
            "count": state["count"] + real,
            "ctx": jnp.where(real[:, None], 0.7 * state["ctx"] + params["ctx_emb"][token], state["ctx"]),
        }
        hidden = params["last_emb"][state["last"]] + params["prev_emb"][state["prev"]] + state["ctx"]
        pos_bias = params["pos_bias"][jnp.minimum(state["count"], params["pos_bias"].shape[0] - 1)]
        return state, hidden @ params["out"] + pos_bias

    state = {k: v for k, v in cache.items() if k != "length"}
    state, logits = jax.lax.scan(read, state, (tokens.T, mask.T))
    return logits.transpose(1, 0, 2), {**state, "length": cache["length"] + tokens.shape[1]}


toy_forward = jax.jit(toy_step)  # for the references: the same maths, compiled once per shape


class ToyModel:
    """Random toy parameters with `step` / `init_cache` bound as the decoding engine expects."""

    init_cache = staticmethod(toy_init_cache)

    def __init__(self, seed: int, max_pos: int = 32, favour: dict[int, int] | None = None):
        rng = np.random.default_rng(seed)
        pos_bias = rng.normal(size=(max_pos, VOCAB))
        for pos, token in (favour or {}).items():  # a strongly preferred token at a given count of real tokens
            pos_bias[pos, token] += 40.0
        self.params = {
            **{name: jnp.asarray(rng.normal(size=(VOCAB, RANK)), jnp.float32)
               for name in ("last_emb", "prev_emb", "ctx_emb")},
            "out": jnp.asarray(rng.normal(size=(RANK, VOCAB)) * 0.4, jnp.float32),
            "pos_bias": jnp.asarray(pos_bias, jnp.float32),
        }

    def step(self, tokens: jax.Array, mask: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        return toy_step(self.params, tokens, mask, cache)

    def forward(self, tokens: jax.Array, mask: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        return toy_forward(self.params, tokens, mask, cache)


@functools.cache
def compiled_search(beam_width: int, constrained: bool):
    """The search jitted with the parameters as an argument: new toy models reuse the compiled code."""

    def run(params, tokens, mask, trie, banned=None):
        return beam_search(partial(toy_step, params), toy_init_cache, tokens, mask, trie, beam_width, constrained,
                           banned=banned)

    return jax.jit(run)


def search(model: ToyModel, tokens, mask, trie: SIDTrie, beam_width: int, constrained: bool = True,
           banned=None) -> BeamResult:
    run = compiled_search(beam_width, constrained)
    return jax.tree.map(np.asarray, run(model.params, jnp.asarray(tokens), jnp.asarray(mask), trie, banned))


def make_trie(sids: list[tuple[int, ...]]) -> SIDTrie:
    return SIDTrie(sids, RANGES, node_bucket=NODE_BUCKET)


def teacher_forced(model: ToyModel, prompt: np.ndarray, sids: np.ndarray, prompt_mask: np.ndarray | None = None):
    """log p(sid | prompt) for every row of `sids [N, D]`: one forward pass over prompt + SID each, no decoding."""
    n = len(sids)
    prompt_mask = np.ones(prompt.shape, bool) if prompt_mask is None else prompt_mask
    tokens = np.concatenate([np.repeat(prompt[None], n, 0), sids[:, :-1]], axis=1)
    mask = np.concatenate([np.repeat(prompt_mask[None], n, 0), np.ones((n, DEPTH - 1), bool)], axis=1)
    logits, _ = model.forward(jnp.asarray(tokens), jnp.asarray(mask), model.init_cache(n, tokens.shape[1]))
    logits = np.asarray(logits[:, len(prompt) - 1:])
    total = np.zeros(n)
    for d, (offset, width) in enumerate(RANGES):  # each SID token's softmax runs over its own position's tokens
        log_probs = np.asarray(jax.nn.log_softmax(logits[:, d, offset:offset + width], axis=-1))
        total += log_probs[np.arange(n), sids[:, d] - offset]
    return total


def catalogue(seed: int, n: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [ALL_SIDS[i] for i in rng.choice(len(ALL_SIDS), size=n, replace=False)]


def prompts(seed: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Random left-padded prompts [B, max(lengths)] and their mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for row, length in enumerate(lengths):
        tokens[row, width - length:] = rng.integers(0, VOCAB, size=length)
        mask[row, width - length:] = True
    return tokens, mask


def test_trie_children_tables_hold_child_nodes_and_item_indices():
    trie = SIDTrie([(10, 14, 17), (10, 15, 17), (11, 14, 18)], [(10, 4), (14, 3), (17, 2)])
    expected = ([[0, 1, -1, -1]], [[0, 1, -1], [2, -1, -1]], [[0, -1], [1, -1], [-1, 2]])
    for table, want in zip(trie.children, expected):
        assert table.dtype == np.int32
        np.testing.assert_array_equal(table, want)
    assert [trie.item_of(s) for s in [(11, 14, 18), (10, 15, 17), (11, 14, 17), (13, 14, 17), (10, 14)]] == [
        2, 1, -1, -1, -1]
    padded = SIDTrie([(10, 14, 17), (11, 14, 18)], [(10, 4), (14, 3), (17, 2)], node_bucket=8)
    assert [t.shape for t in padded.children] == [(1, 4), (8, 3), (8, 2)]
    assert padded.item_of((11, 14, 18)) == 1 and jax.device_put(padded).item_of((10, 14, 17)) == 0


@pytest.mark.parametrize(
    "sids, message",
    [
        ([(12, 18, 22, 25), (13, 18, 22, 25), (12, 18, 22, 25)], "more than once"),
        ([(12, 18, 22, 27)], "outside"),
        ([(11, 18, 22, 25)], "outside"),
        ([(12, 18, 22)], "4 tokens"),
        ([], "empty"),
    ],
)
def test_trie_rejects_duplicate_and_out_of_range_sids(sids, message):
    with pytest.raises(ValueError, match=message):
        make_trie(sids)


def test_wide_beam_returns_every_item_ranked_by_teacher_forced_log_probability():
    sids = catalogue(0, 30)
    trie, model = make_trie(sids), ToyModel(0)
    tokens, mask = prompts(1, [5, 5, 5])
    result = search(model, tokens, mask, trie, beam_width=32)
    for row in range(len(tokens)):
        reference = teacher_forced(model, tokens[row], np.array(sids))
        order = np.argsort(-reference)
        np.testing.assert_array_equal(result.items[row, :30], order)
        np.testing.assert_allclose(result.scores[row, :30], reference[order], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(result.sequences[row, :30], np.array(sids)[order])
        assert np.all(result.scores[row, 30:] == -np.inf) and np.all(result.items[row, 30:] == -1)


def test_beam_width_one_equals_a_hand_written_greedy_constrained_decode():
    sids = catalogue(2, 40)
    prefixes = {sid[:d] for sid in sids for d in range(DEPTH + 1)}
    trie, model = make_trie(sids), ToyModel(2)
    tokens, mask = prompts(3, [4, 4, 4, 4])
    result = jax.tree.map(np.asarray, jax.jit(partial(greedy_search, model.step, model.init_cache))(tokens, mask, trie))
    for row in range(len(tokens)):
        sequence, score = [], 0.0
        for _ in range(DEPTH):  # re-read the whole sequence each step: no cache to get wrong
            seq = np.concatenate([tokens[row], sequence]).astype(np.int32)[None]
            logits, _ = model.forward(jnp.asarray(seq), jnp.ones(seq.shape, bool), model.init_cache(1, seq.shape[1]))
            offset, width = RANGES[len(sequence)]
            log_probs = np.full(VOCAB, -np.inf)
            log_probs[offset:offset + width] = jax.nn.log_softmax(logits[0, -1, offset:offset + width])
            allowed = [t for t in range(VOCAB) if tuple(sequence) + (t,) in prefixes]
            best = max(allowed, key=lambda t: log_probs[t])
            sequence.append(best)
            score += log_probs[best]
        assert tuple(result.sequences[row, 0]) == tuple(sequence)
        assert result.items[row, 0] == sids.index(tuple(sequence))
        np.testing.assert_allclose(result.scores[row, 0], score, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_constrained_beams_are_valid_distinct_items_best_first(seed):
    sids = catalogue(seed, 50)
    trie, model = make_trie(sids), ToyModel(seed)
    tokens, mask = prompts(seed, [3, 6, 1, 6, 2])
    result = search(model, tokens, mask, trie, beam_width=8)
    assert np.all(np.isfinite(result.scores))  # 50 items >= 8 beams: every beam is live
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    for row in range(len(tokens)):
        assert len(set(result.items[row].tolist())) == 8
        for sequence, item in zip(result.sequences[row], result.items[row]):
            assert trie.item_of(sequence) == item and sids[item] == tuple(sequence)
        np.testing.assert_allclose(
            result.scores[row], teacher_forced(model, tokens[row], result.sequences[row], mask[row]), atol=1e-5)
    assert invalid_sid_rate(result) == 0.0


def test_fewer_items_than_beams_leaves_dead_beams_at_minus_infinity():
    sids = catalogue(4, 3)
    trie, model = make_trie(sids), ToyModel(4)
    tokens, mask = prompts(4, [4, 4, 4])
    result = search(model, tokens, mask, trie, beam_width=4)
    for row in range(len(tokens)):
        reference = teacher_forced(model, tokens[row], np.array(sids))
        np.testing.assert_array_equal(result.items[row], list(np.argsort(-reference)) + [-1])
        np.testing.assert_allclose(result.scores[row, :3], np.sort(reference)[::-1], atol=1e-5)
        assert np.all(result.scores[row, 3:] == -np.inf) and np.all(result.sequences[row, 3:] == -1)


def test_unconstrained_search_reports_invalid_sids_only_when_the_model_prefers_them():
    sids = catalogue(5, 30)
    invalid = next(sid for sid in ALL_SIDS if sid not in set(sids))
    tokens, mask = prompts(5, [4, 4, 4])
    trie = make_trie(sids)

    # after a 4-token prompt, SID token d is predicted with 4 + d real tokens read
    hallucinating = ToyModel(5, favour={4 + d: token for d, token in enumerate(invalid)})
    result = search(hallucinating, tokens, mask, trie, beam_width=4, constrained=False)
    assert np.all(result.items[:, 0] == -1) and np.all(result.sequences[:, 0] == invalid)
    assert invalid_sid_rate(result) > 0
    for row in range(len(tokens)):  # unconstrained scores are still full-vocabulary sequence log-probabilities
        reference = teacher_forced(hallucinating, tokens[row], result.sequences[row])
        np.testing.assert_allclose(result.scores[row], reference, atol=1e-5)
    assert invalid_sid_rate(search(hallucinating, tokens, mask, trie, beam_width=4)) == 0.0

    faithful = ToyModel(5, favour={4 + d: token for d, token in enumerate(sids[7])})
    result = search(faithful, tokens, mask, trie, beam_width=1, constrained=False)
    assert invalid_sid_rate(result) == 0.0 and np.all(result.items[:, 0] == 7)


def test_left_padded_batch_matches_each_prompt_alone():
    sids = catalogue(6, 40)
    trie, model = make_trie(sids), ToyModel(6)
    tokens, mask = prompts(6, [2, 6, 2, 6, 2])  # one unpadded shape per length: fewer compilations
    batch = search(model, tokens, mask, trie, beam_width=8)
    for row in range(len(tokens)):
        prompt = tokens[row][mask[row]][None]
        alone = search(model, prompt, np.ones(prompt.shape, bool), trie, beam_width=8)
        np.testing.assert_array_equal(batch.items[row], alone.items[0])
        np.testing.assert_allclose(batch.scores[row], alone.scores[0], atol=1e-5)


def test_search_compiles_once_per_prompt_shape_and_trie_bucket():
    sids = catalogue(7, 20)
    trie, model = make_trie(sids), ToyModel(7)
    traces = []

    def counting_step(tokens, mask, cache):
        traces.append(tokens.shape)
        return model.step(tokens, mask, cache)

    run = jax.jit(partial(beam_search, counting_step, model.init_cache, beam_width=4))
    for seed in range(3):
        run(*prompts(seed, [3, 5]), trie)
    assert len(traces) == DEPTH  # one prefill and D - 1 decode steps, traced once
    run(*prompts(1, [3, 5]), make_trie(catalogue(9, 25)))  # a grown catalogue within the same node buckets
    assert len(traces) == DEPTH
    run(*prompts(0, [3, 6]), trie)
    assert len(traces) == 2 * DEPTH


def test_bad_arguments_raise_value_errors():
    trie, model = make_trie(catalogue(8, 5)), ToyModel(8)
    tokens, mask = prompts(8, [3])
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model.step, model.init_cache, tokens, mask, trie, 0)
    with pytest.raises(ValueError, match="max_len"):
        beam_search(model.step, model.init_cache, tokens, mask, trie, 2, max_len=4)
    with pytest.raises(ValueError, match="logits"):
        beam_search(model.step, model.init_cache, tokens, mask, SIDTrie([(12, 18, 22, 30)], RANGES[:3] + ((30, 2),)), 2)


def test_a_prefix_is_blocked_exactly_when_every_item_under_it_is_banned():
    sids = catalogue(4, 60)
    trie = make_trie(sids)  # node tables padded to NODE_BUCKET rows: padding holds no item, so it is blocked
    rng = np.random.default_rng(4)
    banned = rng.random((5, len(sids))) < np.array([0.0, 0.3, 0.7, 0.95, 1.0])[:, None]
    blocked = [np.asarray(b) for b in jax.jit(_blocked_children)(trie, jnp.asarray(banned))]
    node_of = np.zeros((len(sids), DEPTH), np.int64)  # each item's node after d + 1 tokens, walked on the host
    for item, sid in enumerate(sids):
        node = 0
        for d, (table, (offset, _)) in enumerate(zip(trie.children, RANGES)):
            node = node_of[item, d] = table[node, sid[d] - offset]
    assert (node_of[:, -1] == np.arange(len(sids))).all()
    for d in range(DEPTH):
        rows = trie.children[d + 1].shape[0] if d < DEPTH - 1 else len(sids)
        expected = np.ones((len(banned), rows), bool)
        for node in range(rows):
            under = node_of[:, d] == node
            if under.any():
                expected[:, node] = banned[:, under].all(axis=1)
        np.testing.assert_array_equal(blocked[d], expected, err_msg=f"depth {d}")


def test_banned_items_are_never_returned_and_the_rest_keep_their_teacher_forced_order():
    sids = catalogue(3, 30)
    trie, model = make_trie(sids), ToyModel(3)
    tokens, mask = prompts(4, [5, 5])
    banned = np.zeros((2, 30), bool)
    banned[0, [0, 5, 7, 29]] = True
    banned[1, :20] = True
    result = search(model, tokens, mask, trie, beam_width=32, banned=jnp.asarray(banned))
    for row in range(2):
        reference = teacher_forced(model, tokens[row], np.array(sids))
        allowed = np.flatnonzero(~banned[row])
        order = allowed[np.argsort(-reference[allowed])]
        np.testing.assert_array_equal(result.items[row, :len(order)], order)
        assert np.all(result.items[row, len(order):] == -1)
