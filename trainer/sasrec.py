"""SASRec (Kang & McAuley 2018), the embedding-table baseline trained and evaluated on the same split.

Item embedding (shared with the output layer) + learned positional embedding, pre-LN causal
self-attention blocks, dropout. Trained by next-item prediction at every position of every
training sequence: each sequence is tiled from its end into windows of max_len + 1 items that
overlap by one item, so every item after a sequence's first is a target of exactly one window
(as PLUM's SFT tiles its windows). Two losses: a full softmax over the catalogue ("ce"), which
beats the paper's loss by a wide margin in tuned re-implementations, and the paper's binary
cross-entropy with one sampled negative per position ("bce"), the SASRec that TIGER-era papers
compare against. Early stopping on validation Recall@10; the best parameters are kept.

Sequences are left-padded with a reserved pad item (index n_items), so the newest item always
sits at the last position and positional embeddings count back from it. Training batches are
bucketed by length (a few static widths, so a few compilations): a short sequence padded to a
narrow bucket gives the same outputs as padded to max_len, because padding is masked out of
attention and positions are aligned to the right.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trainer.evaluate import Split, Which, effective_vocabulary, rank_metrics, top_k_excluding

Progress = Callable[[dict[str, float]], None]
EARLY_STOPPING_METRIC = "recall@10"
LOSSES = ("ce", "bce")


@dataclass(frozen=True)
class SASRecConfig:
    """Model sizes and training settings.

    max_len: the longest input: the training windows' width and how many of the items before a
    target ranking reads (from the user's whole prefix, so it may exceed the split's history cap;
    the benchmark keeps it within the protocol's cap where the protocol has one). loss: "ce"
    (full softmax) or "bce" (one uniformly sampled negative per position, never the target).
    eval_every: epochs between validation runs; patience: validation runs without a better
    Recall@10 before training stops. exclude_seen: whether ranking removes the user's earlier
    items (see trainer.evaluate).
    The learning rate is three times the paper's 1e-3: with 1e-3 a model needs many more epochs
    than fit in a few minutes on 2 CPU cores (10 epochs are about 1,800 steps on Amazon Beauty).
    """

    n_items: int
    max_len: int = 50
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    ffn_dim: int = 256
    dropout: float = 0.3
    learning_rate: float = 3e-3
    loss: str = "ce"
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    eval_every: int = 2
    patience: int = 3
    exclude_seen: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_items < 10:
            raise ValueError(f"n_items must be at least 10 (early stopping ranks a top 10), got {self.n_items}")
        if min(self.max_len, self.dim, self.n_heads, self.ffn_dim, self.batch_size, self.epochs) < 1:
            raise ValueError("max_len, dim, n_heads, ffn_dim, batch_size and epochs must all be at least 1")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.eval_every < 1 or self.patience < 1:
            raise ValueError("eval_every and patience must be at least 1")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def pad_item(self) -> int:
        """The reserved input index of padding (one past the last item)."""
        return self.n_items


class Block(nnx.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + FFN(LN(x)); x [batch, length, dim]."""

    def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs) -> None:
        self.attention_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            cfg.n_heads, cfg.dim, dropout_rate=cfg.dropout, decode=False, keep_rngs=False, rngs=rngs,
        )
        self.ffn_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.up = nnx.Linear(cfg.dim, cfg.ffn_dim, rngs=rngs)
        self.down = nnx.Linear(cfg.ffn_dim, cfg.dim, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """mask: [batch, 1, length, length] (causal and not padding); rngs None = no dropout."""
        deterministic = rngs is None
        attended = self.attention(self.attention_norm(x), mask=mask, deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(attended, deterministic=deterministic, rngs=rngs)
        hidden = self.dropout(jax.nn.gelu(self.up(self.ffn_norm(x))), deterministic=deterministic, rngs=rngs)
        return x + self.dropout(self.down(hidden), deterministic=deterministic, rngs=rngs)


class SASRec(nnx.Module):
    """items [batch, length] (left-padded with cfg.pad_item) -> hidden states [batch, length, dim]."""

    def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        init = nnx.initializers.normal(stddev=cfg.dim ** -0.5)
        self.item_embed = nnx.Embed(cfg.n_items + 1, cfg.dim, embedding_init=init, rngs=rngs)
        self.position_embed = nnx.Embed(cfg.max_len, cfg.dim, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_blocks)])
        self.final_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, items: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Hidden state after each position; rngs (stream 'dropout') switches dropout on."""
        length = items.shape[1]
        if length > self.cfg.max_len:
            raise ValueError(f"input length {length} exceeds max_len {self.cfg.max_len}")
        valid = items != self.cfg.pad_item
        # Positions count back from the newest item, so a narrower padding changes nothing.
        positions = self.position_embed.embedding[self.cfg.max_len - length:]
        x = self.item_embed(items) * self.cfg.dim ** 0.5 + positions
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs) * valid[..., None]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        mask = (causal[None] & valid[:, None, :])[:, None]
        for block in self.blocks:
            x = block(x, mask, rngs) * valid[..., None]
        return self.final_norm(x)

    def item_scores(self, hidden: jax.Array) -> jax.Array:
        """Dot products with every item embedding: hidden [..., dim] -> [..., n_items]."""
        return hidden @ self.item_embed.embedding[: self.cfg.n_items].T


def _loss(model: SASRec, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """Mean loss of the next item over positions whose target is >= 0: softmax cross-entropy over
    the catalogue ("ce"), or binary cross-entropy of the target against one sampled negative ("bce")."""
    dropout_key, negative_key = jax.random.split(key)
    hidden = model(batch["inputs"], rngs=nnx.Rngs(dropout=dropout_key))
    targets = jnp.maximum(batch["targets"], 0)
    if model.cfg.loss == "ce":
        losses = optax.softmax_cross_entropy_with_integer_labels(model.item_scores(hidden), targets)
    else:
        n_items = model.cfg.n_items
        # Uniform over the other n_items - 1 items: a draw from [0, n - 1) shifted past the target.
        negatives = jax.random.randint(negative_key, targets.shape, 0, n_items - 1)
        negatives = negatives + (negatives >= targets)
        embeddings = model.item_embed.embedding[:n_items]
        positive = (hidden * embeddings[targets]).sum(-1)
        negative = (hidden * embeddings[negatives]).sum(-1)
        losses = jax.nn.softplus(-positive) + jax.nn.softplus(negative)
    weight = (batch["targets"] >= 0).astype(losses.dtype)
    return (losses * weight).sum() / jnp.maximum(weight.sum(), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
    state: tuple[nnx.State, optax.OptState], batch: dict[str, jax.Array], key: jax.Array,
) -> tuple[tuple[nnx.State, optax.OptState], jax.Array]:
    """(params, optimizer state), batch, dropout key -> updated state, loss; the state is donated.

    graphdef and optimizer are static: equal configs reuse one compilation.
    """
    params, opt_state = state
    loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), batch, key))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss


def _pad_left(sequences: Sequence[np.ndarray], width: int, pad: int) -> np.ndarray:
    """The last `width` items of each sequence, left-padded: [n, width] int32."""
    out = np.full((len(sequences), width), pad, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        tail = sequence[-width:]
        if len(tail):
            out[row, width - len(tail):] = tail
    return out


def _bucket_widths(max_len: int) -> list[int]:
    """Padded widths for training batches: powers of two from 4 below max_len, then max_len."""
    widths = []
    width = 4
    while width < max_len:
        widths.append(width)
        width *= 2
    return widths + [max_len]


def training_windows(sequence: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The sequence tiled from its end into windows of at most max_len + 1 items, consecutive windows
    sharing one item, so that every item but the first is a target of exactly one window; newest first."""
    windows = []
    stop = len(sequence)
    while stop >= 2:
        start = max(0, stop - (max_len + 1))
        windows.append(sequence[start:stop])
        stop = start + 1
    return windows


def _training_buckets(train: Sequence[np.ndarray], cfg: SASRecConfig) -> list[dict[str, np.ndarray]]:
    """Inputs and targets [n_b, width] per length bucket over every training window; target -1 marks padding."""
    usable = [window for s in train for window in training_windows(s, cfg.max_len)]
    if not usable:
        raise ValueError("no training sequence has two or more items; there is nothing to learn from")
    lengths = np.array([len(s) - 1 for s in usable])
    widths = _bucket_widths(cfg.max_len)
    which = np.searchsorted(widths, lengths)
    buckets = []
    for index, width in enumerate(widths):
        members = [usable[i] for i in np.flatnonzero(which == index)]
        if members:
            inputs = _pad_left([s[:-1] for s in members], width, cfg.pad_item)
            targets = _pad_left([s[1:] for s in members], width, -1)
            buckets.append({"inputs": inputs, "targets": targets})
    return buckets


def _epoch_batches(
    buckets: list[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator, pad: int
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled fixed-size batches from within buckets, in shuffled order; a short last batch is padded."""
    batches = []
    for bucket in buckets:
        order = rng.permutation(len(bucket["inputs"]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {name: array[rows] for name, array in bucket.items()}
            missing = batch_size - len(rows)
            if missing:
                batch["inputs"] = np.pad(batch["inputs"], ((0, missing), (0, 0)), constant_values=pad)
                batch["targets"] = np.pad(batch["targets"], ((0, missing), (0, 0)), constant_values=-1)
            batches.append(batch)
    for index in rng.permutation(len(batches)):
        yield batches[index]


@nnx.jit
def _last_scores(model: SASRec, items: jax.Array) -> jax.Array:
    """items [batch, max_len] -> scores [batch, n_items] after the newest item."""
    return model.item_scores(model(items)[:, -1])


def _score_batches(
    model: SASRec, histories: Sequence[np.ndarray], batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, scores [rows, n_items]) per batch; the last batch is padded to keep one shape."""
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        items = _pad_left(list(chunk) + [np.zeros(0, np.int32)] * (batch_size - len(chunk)),
                          model.cfg.max_len, model.cfg.pad_item)
        yield start, np.asarray(_last_scores(model, jnp.asarray(items)))[: len(chunk)]


def score_users(model: SASRec, histories: Sequence[np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """Scores [n_users, n_items] of every item after each history (its last max_len items).

    An empty history scores from the position embeddings alone.
    """
    if not histories:
        raise ValueError("there are no histories to score")
    return np.concatenate([scores for _, scores in _score_batches(model, histories, batch_size)])


def rank_users(
    model: SASRec, split: Split, which: Which, k: int, exclude_seen: bool, batch_size: int = 1024
) -> np.ndarray:
    """Top-k items [n_users, k] for the validation or test users of split, seen items removed if asked.

    Each user is scored from the last max_len items before the target (of the whole prefix: the
    same as the split's capped history when max_len is at most the cap)."""
    eval_set = split.eval_set(which)
    if not eval_set.histories:
        raise ValueError(f"the split has no {which} users (every user has fewer than 3 items)")
    ranked = []
    for start, scores in _score_batches(model, eval_set.seen, batch_size):
        exclude = eval_set.seen[start:start + len(scores)] if exclude_seen else None
        ranked.append(top_k_excluding(scores, k, exclude))
    return np.concatenate(ranked)


def evaluate_sasrec(
    model: SASRec, split: Split, which: Which = "test", ks: Sequence[int] = (5, 10),
    exclude_seen: bool | None = None,
) -> dict[str, float]:
    """Recall@K, NDCG@K and the effective vocabulary of the top max(ks) on the split's validation or test users.

    exclude_seen None follows the model's config.
    """
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    exclude = model.cfg.exclude_seen if exclude_seen is None else exclude_seen
    ranked = rank_users(model, split, which, max(ks), exclude)
    metrics = rank_metrics(ranked, split.eval_set(which).targets, ks)
    metrics["effective_vocabulary"] = effective_vocabulary(ranked)
    return metrics


@functools.lru_cache(maxsize=8)
def _optimizer(cfg: SASRecConfig) -> optax.GradientTransformation:
    """AdamW; weight decay on matrices only (embeddings, projections), not on norms and biases.

    Cached so that equal configs get the same (hashable) transformation and share compilations.
    """
    return optax.adamw(
        cfg.learning_rate, weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )


def train_sasrec(
    split: Split, cfg: SASRecConfig, progress: Progress | None = None
) -> tuple[SASRec, list[dict[str, float]]]:
    """Train on split.train with early stopping on validation Recall@10; returns the best model and per-epoch rows.

    Each row: epoch, loss (mean over batches), seconds (the epoch's training time), and on
    validation epochs the validation metrics prefixed "valid_".
    """
    if cfg.n_items != split.n_items:
        raise ValueError(f"the config has n_items={cfg.n_items} but the split's catalogue has {split.n_items}")
    buckets = _training_buckets(split.train, cfg)
    model = SASRec(cfg, nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    optimizer = _optimizer(cfg)
    state = (params, optimizer.init(params))
    rng = np.random.default_rng(cfg.seed)
    # rbg rather than threefry: threefry's dropout masks cost seconds of XLA compile time on CPU.
    key = jax.random.key(cfg.seed, impl="rbg")
    best_params, best_score, stale = None, -1.0, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        total, batches = jnp.zeros(()), 0
        for batch in _epoch_batches(buckets, cfg.batch_size, rng, cfg.pad_item):
            key, dropout_key = jax.random.split(key)
            state, loss = _train_step(graphdef, optimizer, state, batch, dropout_key)
            total, batches = total + loss, batches + 1
        row = {"epoch": epoch, "loss": float(total) / batches, "seconds": time.perf_counter() - started}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics = evaluate_sasrec(nnx.merge(graphdef, state[0]), split, "valid")
            row.update({f"valid_{name}": value for name, value in metrics.items()})
            if metrics[EARLY_STOPPING_METRIC] > best_score:
                # A copy: the training step donates (frees) the live parameter buffers.
                best_params, best_score, stale = jax.tree.map(jnp.copy, state[0]), metrics[EARLY_STOPPING_METRIC], 0
            else:
                stale += 1
        history.append(row)
        if progress is not None:
            progress(row)
        if stale >= cfg.patience:
            break
    return nnx.merge(graphdef, best_params), history
