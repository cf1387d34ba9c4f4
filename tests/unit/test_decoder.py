"""The decoder LM on tiny configs: shapes, causality, padding, KV cache, GQA, MoE, config checks."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.model import DECODER_SIZES, Decoder, KVCache, MoEFeedForward

pytestmark = pytest.mark.unit

TINY = DECODER_SIZES["tiny"]
TINY_MOE = TINY.replace(moe_experts=4, moe_top_k=2)


def _tokens(rows: int = 2, length: int = 8, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (rows, length)), jnp.int32)


def _ones(tokens: jnp.ndarray) -> jnp.ndarray:
    return jnp.ones(tokens.shape, bool)


# Plain jax.jit with the graph definition static: compiled once per config and shape, which keeps
# this file fast (eager dispatch compiles every operation per new shape); most tests use [2, 8].
@partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)


@partial(jax.jit, static_argnums=0)
def _jit_extend(graphdef, state, tokens, mask, cache):
    return nnx.merge(graphdef, state).extend(tokens, mask, cache)


def forward(model: Decoder, tokens: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return _jit_forward(*nnx.split(model), tokens, mask)


def extend(model: Decoder, tokens: jnp.ndarray, mask: jnp.ndarray, cache: KVCache) -> tuple[jnp.ndarray, KVCache]:
    return _jit_extend(*nnx.split(model), tokens, mask, cache)


@pytest.fixture(scope="module")
def model() -> Decoder:
    return Decoder(TINY, nnx.Rngs(0))


@pytest.fixture(scope="module")
def moe_model() -> Decoder:
    return Decoder(TINY_MOE, nnx.Rngs(1))

def test_logits_are_float32_per_position_and_vocabulary(model):
    tokens = _tokens()
    logits, aux = forward(model, tokens, _ones(tokens))
    assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == jnp.float32
    assert aux.shape == () and float(aux) == 0.0
    assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_untied_variant_keeps_its_own_head_and_float32_logits():
    model = Decoder(TINY.replace(dtype="bfloat16", tie_embeddings=False), nnx.Rngs(0))
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    assert model.lm_head.kernel[...].shape == (TINY.dim, TINY.vocab_size)
    tokens = _tokens()
    logits, _ = forward(model, tokens, _ones(tokens))
    assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_changing_a_later_token_leaves_earlier_logits_unchanged(model):
    tokens = _tokens()
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % TINY.vocab_size)
    before, _ = forward(model, tokens, _ones(tokens))
    after, _ = forward(model, changed, _ones(changed))
    np.testing.assert_array_equal(np.asarray(before[:, :5]), np.asarray(after[:, :5]))
    assert np.abs(np.asarray(before[:, 5:] - after[:, 5:])).max() > 1e-4


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_left_right_and_no_padding_give_the_same_logits_and_aux_loss(cfg):
    model = Decoder(cfg, nnx.Rngs(2))
    tokens = _tokens(seed=1)
    seq, pad = tokens[:, :5], jnp.full((2, 3), 7, jnp.int32)  # any pad id: it must not matter
    real, none = jnp.ones((2, 5), bool), jnp.zeros((2, 3), bool)
    # Unpadded: the 5 tokens followed by 3 more real ones, which by causality cannot change them.
    plain, _ = forward(model, tokens, _ones(tokens))
    left, left_aux = forward(model, jnp.concatenate([pad, seq], 1), jnp.concatenate([none, real], 1))
    right, right_aux = forward(model, jnp.concatenate([seq, pad], 1), jnp.concatenate([real, none], 1))
    np.testing.assert_allclose(left[:, 3:], plain[:, :5], atol=1e-5)
    np.testing.assert_allclose(right[:, :5], plain[:, :5], atol=1e-5)
    # Pads see different things on either side: equal losses mean they are not counted.
    np.testing.assert_allclose(left_aux, right_aux, rtol=1e-5)


def _decode_incrementally(model: Decoder, tokens, mask, prompt_len: int = 5, cache_len: int = 16):
    """Prefill the first prompt_len columns, then feed the rest one token at a time, under jax.jit."""
    cache = model.init_cache(tokens.shape[0], cache_len)
    logits, cache = extend(model, tokens[:, :prompt_len], mask[:, :prompt_len], cache)
    steps = [logits]
    for i in range(prompt_len, tokens.shape[1]):
        logits, cache = extend(model, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_prefill_then_token_by_token_matches_one_full_forward(cfg):
    model = Decoder(cfg, nnx.Rngs(3))
    tokens = _tokens(seed=4)
    mask = jnp.asarray(np.arange(8)[None, :] >= np.array([[0], [3]]))  # prompts of 5 and 2, left-padded
    full, _ = forward(model, tokens, mask)
    incremental, cache = _decode_incrementally(model, tokens, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5)
    assert int(cache.filled) == 8
    np.testing.assert_array_equal(cache.position, real.sum(1))
    np.testing.assert_array_equal(cache.key_mask[:, :8], real)
    assert not np.asarray(cache.key_mask[:, 8:]).any()


def test_padded_decoding_steps_are_never_attended_to(model):
    tokens = _tokens(seed=5)
    mask = _ones(tokens).at[0, 5].set(False)  # row 0 skips step 5, e.g. a finished beam
    incremental, _ = _decode_incrementally(model, tokens, mask)
    # The same row with the skipped token moved to the end as right padding.
    order = jnp.array([0, 1, 2, 3, 4, 6, 7, 5])
    reference, _ = forward(model, tokens[:, order], mask[:, order])
    np.testing.assert_allclose(incremental[0, order[:7]], reference[0, :7], atol=1e-5)


def test_cache_rows_can_be_reordered_like_a_beam_search(model):
    tokens = _tokens(seed=6)
    mask = _ones(tokens)
    cache = model.init_cache(2, 16)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache) if leaf.ndim)
    _, cache = extend(model, tokens[:, :5], mask[:, :5], cache)
    order = jnp.array([1, 1])  # both beams continue from row 1
    cache = jax.tree.map(lambda a: a[order] if a.ndim else a, cache)
    logits, _ = extend(model, tokens[order, 5:6], mask[:, 5:6], cache)
    full, _ = forward(model, tokens[order], mask)
    np.testing.assert_allclose(logits[:, 0], full[:, 5], atol=1e-5)


def test_cache_and_inputs_of_the_wrong_size_are_rejected(model):
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, TINY.max_len + 1)
    cache = model.init_cache(2, 4)
    tokens = _tokens()
    with pytest.raises(ValueError, match="init_cache"):
        model.extend(tokens, _ones(tokens), cache)
    with pytest.raises(ValueError, match="batch, length"):
        model(tokens, jnp.ones((2, 4), bool))


def test_grouped_query_attention_equals_multi_head_with_repeated_key_value_heads(model):
    mha = Decoder(TINY.replace(n_kv_heads=TINY.n_heads), nnx.Rngs(1))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kv, groups, head_dim = TINY.n_kv_heads, TINY.n_heads // TINY.n_kv_heads, TINY.head_dim
    for layer in state["layers"].values():
        for name in ("k_proj", "v_proj"):
            kernel = layer["attn"][name]["kernel"].reshape(TINY.dim, kv, 1, head_dim)
            # Query head h reads key/value head h // groups: repeat each kv head groups times.
            repeated = jnp.broadcast_to(kernel, (TINY.dim, kv, groups, head_dim))
            layer["attn"][name]["kernel"] = repeated.reshape(TINY.dim, TINY.n_heads * head_dim)
    mha_state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(mha_state, state)
    nnx.update(mha, mha_state)
    tokens = _tokens()
    np.testing.assert_allclose(forward(mha, tokens, _ones(tokens))[0], forward(model, tokens, _ones(tokens))[0],
                               atol=1e-5)


def test_moe_gates_pick_top_k_experts_and_sum_to_one(moe_model):
    x = jax.random.normal(jax.random.key(0), (2, 8, TINY.dim))
    gates, dispatch, probs = moe_model.layers[0].ffn.route(x)
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
    assert ((gates > 0).sum(-1) == TINY_MOE.moe_top_k).all()
    np.testing.assert_array_equal(dispatch, (gates > 0).astype(np.float32))
    # The chosen experts are the ones with the highest router probabilities.
    top = np.sort(np.argsort(-np.asarray(probs), axis=-1)[..., :2], axis=-1)
    np.testing.assert_array_equal(top, np.sort(np.argsort(-np.asarray(gates), axis=-1)[..., :2], axis=-1))


def test_moe_aux_loss_is_positive_and_grows_when_routing_collapses(moe_model):
    tokens = _tokens()
    _, aux = forward(moe_model, tokens, _ones(tokens))
    # A near-uniform router scores about 1 per layer (times the weight), a collapsed one E / k.
    per_layer = float(aux) / (TINY_MOE.n_layers * TINY_MOE.moe_aux_weight)
    assert 0.9 < per_layer < 1.2

    block = MoEFeedForward(TINY_MOE, nnx.Rngs(5))
    x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 8, TINY.dim)))  # positive: one column decides
    mask = jnp.ones((2, 8), bool)
    _, balanced = block(x, mask)
    block.router.kernel[...] = jnp.zeros_like(block.router.kernel[...]).at[:, 0].set(5.0)
    _, collapsed = block(x, mask)
    assert float(balanced) == pytest.approx(1.0, abs=0.1)
    assert float(collapsed) == pytest.approx(TINY_MOE.moe_experts / TINY_MOE.moe_top_k, abs=0.05)


@pytest.mark.parametrize("changes, message", [
    ({"dim": 30}, "divisible by n_heads"),
    ({"n_kv_heads": 3}, "divisible by n_kv_heads"),
    ({"moe_experts": 2, "moe_top_k": 3}, "moe_top_k"),
    ({"moe_experts": 1}, "moe_experts"),
    ({"n_layers": 0}, "positive integer"),
    ({"dim": 20, "n_heads": 4}, "even"),
    ({"dtype": "float16"}, "not supported"),
])
def test_bad_configs_raise_value_errors_that_say_what_is_wrong(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_base_config_with_a_50k_vocabulary_traces_without_allocating():
    cfg = DECODER_SIZES["base"].replace(vocab_size=50_000)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    n_params = sum(leaf.size for leaf in jax.tree.leaves(state))
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (2 * cfg.dim + 2 * kv + 3 * cfg.ffn_dim) + 2 * cfg.dim
    assert n_params == 50_000 * cfg.dim + cfg.n_layers * per_layer + cfg.dim
    tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    mask = jax.ShapeDtypeStruct((4, 128), jnp.bool_)
    logits, aux = jax.eval_shape(lambda s, t, m: nnx.merge(graphdef, s)(t, m), state, tokens, mask)
    assert logits.shape == (4, 128, 50_000) and logits.dtype == jnp.float32 and aux.shape == ()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_beam_search_with_shared_prompt_caches_matches_copied_caches(model, moe_model, moe):
    """BeamSteps (one prompt cache per user, per-beam caches for the SID tokens only) must give the same
    beams and scores as the generic search that copies each prompt's cache per beam."""
    from trainer.decoding import BeamSteps, SIDTrie, beam_search

    chosen = moe_model if moe else model
    rng = np.random.default_rng(3)
    ranges = ((10, 4), (14, 4), (18, 3))
    sids = sorted({tuple(int(o + rng.integers(w)) for o, w in ranges) for _ in range(30)})
    trie = SIDTrie(sids, ranges)
    tokens = _tokens(rows=3, length=9, seed=7)
    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3], [6]]))  # left padding of 0, 3 and 6 tokens
    banned = jnp.asarray(rng.random((3, len(sids))) < 0.3)

    @partial(jax.jit, static_argnums=(0, 4))
    def search(graphdef, state, tokens, mask, shared, banned):
        m = nnx.merge(graphdef, state)
        steps = BeamSteps(m.start_beams, m.extend_beams) if shared else None
        return beam_search(partial(m.extend, last_only=shared), m.init_cache, tokens, mask, trie, 5, banned=banned,
                           beams=steps)

    graphdef, state = nnx.split(chosen)
    copied = search(graphdef, state, tokens, mask, False, banned)
    shared = search(graphdef, state, tokens, mask, True, banned)
    np.testing.assert_array_equal(shared.items, copied.items)
    np.testing.assert_allclose(shared.scores, copied.scores, rtol=1e-5, atol=1e-5)
    # The comparison covers real beams: every row fills min(5, its allowed items) beams.
    allowed = (~np.asarray(banned)).sum(axis=1)
    assert ((np.asarray(copied.items) >= 0).sum(axis=1) == np.minimum(5, allowed)).all()
    assert not np.asarray(banned)[np.arange(3)[:, None], np.maximum(np.asarray(shared.items), 0)][
        np.asarray(shared.items) >= 0].any()
