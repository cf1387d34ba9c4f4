"""The decoder LM: a Llama-style transformer in Flax NNX, with an optional mixture-of-experts FFN.

Pre-norm residual blocks of RMSNorm -> grouped-query attention with rotate-half RoPE (as HF
Llama, so SmolLM2's weights load unchanged) and RMSNorm -> SwiGLU (or top-k MoE of SwiGLU
experts), a final RMSNorm and a tied or untied output head. A KV cache serves decoding.

Shape letters: B batch, T tokens in this call, S key slots (T, or the cache length), V vocabulary,
D model width, H query heads, K key/value heads, Dh head width, F feed-forward width, E experts.

Initialisation: embeddings and every linear kernel draw from normal(0, 0.02) (GPT-2 and Llama's
initializer_range), RMSNorm weights start at 1. A warm start (trainer/warm_start.py) overwrites it.

Dropout is a property of a training step, not of the model: `Decoder.__call__` takes an optional
`Dropout` (rate and key) and drops units of the embeddings and of each attention and feed-forward
output before its residual add (GPT-2's residual dropout). Decoding never drops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_STD = 0.02  # standard deviation of every randomly initialised weight
_INIT = nnx.initializers.normal(INIT_STD)
# A large finite negative rather than -inf: a padded query that sees no real key then gets a
# uniform (unused) softmax instead of NaNs that could leak into gradients.
_MASKED = -1e30


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder; variants via `cfg.replace(...)`. dtype names params/activations."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    moe_experts: int = 0  # 0: a dense SwiGLU feed-forward in every block
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01
    max_len: int = 2048
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                             "choose a width that is a multiple of the number of heads.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim // n_heads = {self.head_dim} must be even for rotary embeddings.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}; "
                             "each key/value head must serve a whole group of query heads.")
        if self.moe_experts < 0 or self.moe_experts == 1:
            raise ValueError(f"moe_experts must be 0 (dense feed-forward) or at least 2, got {self.moe_experts}.")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"moe_top_k {self.moe_top_k} must lie between 1 and moe_experts {self.moe_experts}.")
        if self.moe_aux_weight < 0:
            raise ValueError(f"moe_aux_weight must not be negative, got {self.moe_aux_weight}.")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(_DTYPES)}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def param_dtype(self) -> jnp.dtype:
        """The jnp dtype of parameters and activations (logits are always float32)."""
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> DecoderConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Dropout:
    """Residual dropout for one training forward pass: `rate` of units zeroed, the rest scaled by
    1 / (1 - rate); `key` draws the masks (split per use, so every layer draws its own)."""

    rate: float
    key: jax.Array

    def __call__(self, x: jax.Array, use: int) -> jax.Array:
        if self.rate <= 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, use), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


# vocab_size is a placeholder: the trainer sets the real vocabulary with cfg.replace(vocab_size=n).
DECODER_SIZES: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64),
    "small": DecoderConfig(vocab_size=64, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "base": DecoderConfig(vocab_size=64, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=768),
    # SmolLM2-135M's shape (the warm start reads the real values from its GGUF); for benchmarks
    # and abstract shape checks, usually with fewer layers via cfg.replace(n_layers=k).
    "smollm2-135m": DecoderConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                  rope_theta=100000.0, max_len=8192),
}


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    Every leaf with ndim >= 1 has the batch on axis 0, so a beam search may reorder rows with
    `jax.tree.map(lambda a: a[idx] if a.ndim else a, cache)`.
    k, v: [B, n_layers, S, K, Dh]; key_mask: bool [B, S], True where a slot holds a real token;
    position: int32 [B], the RoPE position of the row's next real token;
    filled: int32 [], slots written so far (shared by all rows).
    """

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    position: jax.Array
    filled: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots per row."""
        return self.k.shape[2]


@struct.dataclass
class BeamCache:
    """The cache of a beam search that shares each user's prompt among its beams.

    prefix: the prompts' KVCache [B, ...] (written once by the prefill, never copied per beam);
    k, v: [B, W, n_layers, S, K, Dh] the keys and values of the tokens each beam generated;
    filled: int32 [], generated tokens so far. Reordering beams touches only k and v, so a decoding
    step moves W * S slots per user instead of W copies of the whole prompt.
    """

    prefix: KVCache
    k: jax.Array
    v: jax.Array
    filled: jax.Array


def _linear(d_in: int, d_out: int, cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = cfg.param_dtype
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=_INIT, dtype=dtype, param_dtype=dtype, rngs=rngs)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by positions int [B, T]; rotate-half pairs (i, i + Dh/2) as HF Llama."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """q [B, T, H, Dh], k/v [B, S, K, Dh], allowed bool [B, T, S] -> [B, T, H * Dh].

    Query head h reads key/value head h // (H // K), the grouping of HF's repeat_kv.
    """
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    q = q.reshape(b, t, k.shape[2], groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h * d)


class RMSNorm(nnx.Module):
    """x [..., D] -> x / rms(x) * weight, normalised in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; H query heads share K key/value heads."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        dh = cfg.head_dim
        self.q_proj = _linear(cfg.dim, cfg.n_heads * dh, cfg, rngs)
        self.k_proj = _linear(cfg.dim, cfg.n_kv_heads * dh, cfg, rngs)
        self.v_proj = _linear(cfg.dim, cfg.n_kv_heads * dh, cfg, rngs)
        self.o_proj = _linear(cfg.n_heads * dh, cfg.dim, cfg, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        allowed: jax.Array,
        past: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        beams: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, D], positions [B, T], allowed [B, T, S] -> (out [B, T, D], keys and values attended).

        Without `past`, S = T and the keys are this call's. With past = (k, v, start), k/v
        [B, S, K, Dh], this call's keys/values are first written into slots start..start+T and all
        S slots are attended. With beams = (prefix k, prefix v [B, P, K, Dh], beam k, beam v
        [B, T, G, K, Dh], filled): the T tokens are one per beam, each written into its beam's slot
        `filled`; the keys attended are the prefix's then every beam's (`allowed` [B, T, P + T * G]
        keeps a beam to its own), and the beam keys and values are returned.
        """
        b, t, _ = x.shape
        cfg = self.cfg
        q = apply_rope(self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = apply_rope(self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        if past is not None:
            k_past, v_past, start = past
            k = jax.lax.dynamic_update_slice(k_past, k.astype(k_past.dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(v_past, v.astype(v_past.dtype), (0, start, 0, 0))
        if beams is not None:
            k_prefix, v_prefix, k_beam, v_beam, filled = beams
            k_beam = jax.lax.dynamic_update_slice(k_beam, k[:, :, None].astype(k_beam.dtype), (0, 0, filled, 0, 0))
            v_beam = jax.lax.dynamic_update_slice(v_beam, v[:, :, None].astype(v_beam.dtype), (0, 0, filled, 0, 0))
            flat = (b, -1, cfg.n_kv_heads, cfg.head_dim)
            keys = jnp.concatenate([k_prefix, k_beam.reshape(flat)], axis=1)
            values = jnp.concatenate([v_prefix, v_beam.reshape(flat)], axis=1)
            return self.o_proj(grouped_attention(q, keys, values, allowed)), (k_beam, v_beam)
        return self.o_proj(grouped_attention(q, k, v, allowed)), (k, v)


class FeedForward(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.gate_proj = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
        self.up_proj = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
        self.down_proj = _linear(cfg.ffn_dim, cfg.dim, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def load_balancing_loss(probs: jax.Array, dispatch: jax.Array, mask: jax.Array) -> jax.Array:
    """Switch-Transformer auxiliary loss E * sum_e(fraction_e * mean_prob_e) over real tokens.

    probs [B, T, E] router softmax; dispatch [B, T, E] 1 where a token chose an expert (k per
    token); mask [B, T]. fraction_e is expert e's share of all k * n_tokens choices, so a perfectly
    balanced router scores 1 whatever k is, and a collapsed one up to E / k.
    """
    real = mask.astype(jnp.float32)[..., None]
    n_tokens = jnp.maximum(real.sum(), 1.0)
    choices = (dispatch * real).sum((0, 1))
    fraction = choices / jnp.maximum(choices.sum(), 1.0)
    mean_prob = (probs * real).sum((0, 1)) / n_tokens
    return probs.shape[-1] * jnp.sum(fraction * mean_prob)


class MoEFeedForward(nnx.Module):
    """E SwiGLU experts behind a top-k router with renormalised softmax gates.

    Every expert runs densely and the sparse gates combine them: with a handful of experts on CPU
    this is simpler and not slower than gathering tokens per expert.
    """

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.top_k = cfg.moe_top_k
        self.router = nnx.Linear(cfg.dim, cfg.moe_experts, use_bias=False, kernel_init=_INIT,
                                 dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs)
        e, d, f, dtype = cfg.moe_experts, cfg.dim, cfg.ffn_dim, cfg.param_dtype
        self.gate = nnx.Param(_INIT(rngs.params(), (e, d, f), dtype))
        self.up = nnx.Param(_INIT(rngs.params(), (e, d, f), dtype))
        self.down = nnx.Param(_INIT(rngs.params(), (e, f, d), dtype))

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> (gates, dispatch, probs), each float32 [B, T, E].

        gates: the top-k router probabilities renormalised to sum to 1, zero elsewhere;
        dispatch: 1 for the k chosen experts; probs: the full router softmax.
        """
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        chosen = jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.float32)  # [B, T, k, E]
        gates = jnp.einsum("btk,btke->bte", top / top.sum(-1, keepdims=True), chosen)
        return gates, chosen.sum(-2), probs

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], mask [B, T] -> (y [B, T, D], load-balancing loss [] over real tokens)."""
        gates, dispatch, probs = self.route(x)
        hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", x, self.gate[...])) \
            * jnp.einsum("btd,edf->btef", x, self.up[...])
        experts = jnp.einsum("btef,efd->bted", hidden, self.down[...])
        y = jnp.einsum("bted,bte->btd", experts, gates.astype(experts.dtype))
        return y, load_balancing_loss(probs, dispatch, mask)


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); x [B, T, D]."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.param_dtype)
        self.ffn = MoEFeedForward(cfg, rngs) if cfg.moe_experts else FeedForward(cfg, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        allowed: jax.Array,
        mask: jax.Array,
        past: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        beams: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
        dropout: Dropout | None = None,
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """-> (x [B, T, D], MoE load-balancing loss [] (0 when dense), keys and values attended).

        past, beams: as in Attention, this layer's cached (k, v, start) when extending a KVCache,
        or its slices of a BeamCache. dropout: drops units of both residual branches (training).
        """
        attended, kv = self.attn(self.attn_norm(x), positions, allowed, past, beams)
        x = x + (attended if dropout is None else dropout(attended, 0))
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFeedForward):
            y, aux = self.ffn(h, mask)
        else:
            y, aux = self.ffn(h), jnp.zeros((), jnp.float32)
        return x + (y if dropout is None else dropout(y, 1)), aux, kv


class Decoder(nnx.Module):
    """The decoder LM: tokens int32 [B, T] with mask bool [B, T] -> logits float32 [B, T, V]."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        dtype = cfg.param_dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, embedding_init=_INIT, dtype=dtype,
                               param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderBlock(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array, dropout: Dropout | None = None,
                 rows: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B, T], mask bool [B, T] (True = real; left or right padding) ->
        (logits float32 [B, T, V], aux_loss float32 [] = moe_aux_weight * summed MoE loss).

        RoPE positions count real tokens only; attention is causal and skips padded keys.
        `dropout` (training only): residual dropout of the embeddings and every block's branches.
        `rows=(lo, hi)`: logits of vocabulary rows lo..hi-1 only, [B, T, hi - lo] (the SFT loss and
        the beam search read only the SID tokens' logits, a fraction of the output head's work).
        """
        x, aux = self.hidden(tokens, mask, dropout)
        return self.head(x, rows), aux

    def hidden(self, tokens: jax.Array, mask: jax.Array, dropout: Dropout | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """`__call__` without the output head: (the last block's output [B, T, D], aux_loss); `head`
        turns any subset of its positions into logits."""
        t = self._check(tokens, mask)
        if t > self.cfg.max_len:
            raise ValueError(f"{t} tokens exceed max_len {self.cfg.max_len}; truncate the sequences.")
        mask = mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        slots = jnp.arange(t)
        allowed = (slots[None, :, None] >= slots[None, None, :]) & mask[:, None, :]
        x = self.embed(tokens)
        if dropout is not None:
            x = dropout(x, 0)
        aux = jnp.zeros((), jnp.float32)
        for i, layer in enumerate(self.layers):
            layer_dropout = None if dropout is None else Dropout(dropout.rate, jax.random.fold_in(dropout.key, i + 1))
            x, layer_aux, _ = layer(x, positions, allowed, mask, dropout=layer_dropout)
            aux = aux + layer_aux
        return x, aux * self.cfg.moe_aux_weight

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache of max_len slots per row (layout in KVCache's docstring)."""
        cfg = self.cfg
        if not 1 <= max_len <= cfg.max_len:
            raise ValueError(f"cache max_len {max_len} must lie between 1 and the model's max_len {cfg.max_len}.")
        shape = (batch_size, cfg.n_layers, max_len, cfg.n_kv_heads, cfg.head_dim)
        return KVCache(
            k=jnp.zeros(shape, cfg.param_dtype),
            v=jnp.zeros(shape, cfg.param_dtype),
            key_mask=jnp.zeros((batch_size, max_len), bool),
            position=jnp.zeros((batch_size,), jnp.int32),
            filled=jnp.zeros((), jnp.int32),
        )

    def extend(self, tokens: jax.Array, mask: jax.Array, cache: KVCache, last_only: bool = False,
               rows: tuple[int, int] | None = None) -> tuple[jax.Array, KVCache]:
        """Append tokens int32 [B, T] with mask bool [B, T] to the cache -> (logits [B, T, V], new cache);
        `last_only`: logits of the last position only, [B, 1, V] (a prefill needs no more); `rows` as
        in `__call__`.

        Writes slots filled..filled+T (the caller sizes the cache: under jit a write past the
        end cannot be detected). Padded tokens are stored but never attended to and do not
        advance their row's position: prefill left-padded prompts, then feed one token at a time.
        """
        t = self._check(tokens, mask)
        if tokens.shape[0] != cache.k.shape[0] or t > cache.max_len:
            raise ValueError(f"tokens {tokens.shape} do not fit a cache of batch {cache.k.shape[0]} "
                             f"and {cache.max_len} slots; build it with init_cache(batch, max_len).")
        mask = mask.astype(bool)
        start = cache.filled
        positions = jnp.maximum(cache.position[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, start))
        slots = jnp.arange(cache.max_len)
        query_slots = start + jnp.arange(t)
        allowed = (slots[None, None, :] <= query_slots[None, :, None]) & key_mask[:, None, :]
        x = self.embed(tokens)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, _, (k, v) = layer(x, positions, allowed, mask, (cache.k[:, i], cache.v[:, i], start))
            keys.append(k)
            values.append(v)
        new_cache = KVCache(
            k=jnp.stack(keys, axis=1),
            v=jnp.stack(values, axis=1),
            key_mask=key_mask,
            position=cache.position + mask.sum(axis=1, dtype=jnp.int32),
            filled=start + t,
        )
        return self.head(x[:, -1:] if last_only else x, rows), new_cache

    def start_beams(self, cache: KVCache, beam_width: int, steps: int) -> BeamCache:
        """A BeamCache over prefilled prompts for `beam_width` beams of up to `steps` generated tokens."""
        b, layers, _, heads, dh = cache.k.shape
        empty = jnp.zeros((b, beam_width, layers, steps, heads, dh), cache.k.dtype)
        return BeamCache(prefix=cache, k=empty, v=empty, filled=jnp.zeros((), jnp.int32))

    def extend_beams(self, tokens: jax.Array, parent: jax.Array, cache: BeamCache,
                     rows: tuple[int, int] | None = None) -> tuple[jax.Array, BeamCache]:
        """One token per beam, tokens int32 [B, W], continuing beams `parent` int [B, W] (each new beam's
        beam index in `cache`) -> (logits [B, W, V], new cache). Same numbers as `extend` on a cache with
        each prompt copied W times, without the copies; `rows` as in `__call__`."""
        b, w = tokens.shape
        prefix = cache.prefix
        steps = cache.k.shape[3]
        users = jnp.arange(b)[:, None]
        k_beams, v_beams = cache.k[users, parent], cache.v[users, parent]  # follow the parents
        positions = prefix.position[:, None] + cache.filled + jnp.zeros((1, w), jnp.int32)
        own = (jnp.eye(w, dtype=bool)[:, :, None] & (jnp.arange(steps) <= cache.filled)[None, None]).reshape(w, -1)
        allowed = jnp.concatenate([jnp.broadcast_to(prefix.key_mask[:, None, :], (b, w, prefix.max_len)),
                                   jnp.broadcast_to(own[None], (b, w, w * steps))], axis=-1)
        x = self.embed(tokens)
        mask = jnp.ones((b, w), bool)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, _, (k, v) = layer(x, positions, allowed, mask,
                                 beams=(prefix.k[:, i], prefix.v[:, i], k_beams[:, :, i], v_beams[:, :, i], cache.filled))
            keys.append(k)
            values.append(v)
        new = BeamCache(prefix=prefix, k=jnp.stack(keys, axis=2), v=jnp.stack(values, axis=2), filled=cache.filled + 1)
        return self.head(x, rows), new

    def _check(self, tokens: jax.Array, mask: jax.Array) -> int:
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [batch, length].")
        return tokens.shape[1]

    def head(self, x: jax.Array, rows: tuple[int, int] | None = None) -> jax.Array:
        """Final norm and output head in float32: x [B, T, D] -> [B, T, V], or [B, T, hi - lo] for rows=(lo, hi)."""
        lo, hi = rows if rows is not None else (0, self.cfg.vocab_size)
        if not 0 <= lo < hi <= self.cfg.vocab_size:
            raise ValueError(f"logit rows {lo}..{hi} do not lie inside the vocabulary of {self.cfg.vocab_size}.")
        h = self.final_norm(x).astype(jnp.float32)
        if self.cfg.tie_embeddings:
            return jnp.einsum("btd,vd->btv", h, self.embed.embedding[lo:hi].astype(jnp.float32))
        return h @ self.lm_head.kernel[:, lo:hi].astype(jnp.float32)
