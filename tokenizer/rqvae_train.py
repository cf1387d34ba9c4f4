"""Training the RQ-VAE: k-means codebook initialisation, one jitted step, dead-code reset,
batched code assignment, and parameter (de)serialisation for SID tables."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tokenizer.rqvae import RQVAE, RQVAEConfig, loss_fn

Progress = Callable[[int, float, dict[str, float]], None]


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """Lloyd's k-means with k-means++-style seeding by distance; empty clusters reseeded."""
    n = len(points)
    centres = points[rng.choice(n, size=min(k, n), replace=False)]
    if len(centres) < k:  # fewer points than codes: duplicate with jitter
        extra = centres[rng.integers(len(centres), size=k - len(centres))]
        centres = np.concatenate([centres, extra + rng.normal(0, 1e-3, extra.shape)])
    for _ in range(iterations):
        d = (points ** 2).sum(1)[:, None] - 2 * points @ centres.T + (centres ** 2).sum(1)[None]
        nearest = d.argmin(1)
        for c in range(k):
            members = points[nearest == c]
            centres[c] = members.mean(0) if len(members) else points[rng.integers(n)]
    return centres.astype(np.float32)


def init_codebooks(model: RQVAE, x: np.ndarray, presence: np.ndarray, seed: int, sample: int = 4096) -> None:
    """Set each level's codebook to k-means centres of that level's residuals, level by level."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(sample, len(x)), replace=False)
    residual = np.asarray(model.encode_latent(jnp.asarray(x[rows]), jnp.asarray(presence[rows])))
    for codebook in model.codebooks:
        centres = kmeans(residual, codebook[...].shape[0], rng)
        codebook[...] = jnp.asarray(centres)
        d = (residual ** 2).sum(1)[:, None] - 2 * residual @ centres.T + (centres ** 2).sum(1)[None]
        residual = residual - centres[d.argmin(1)]


def reset_dead_codes(model: RQVAE, x: np.ndarray, presence: np.ndarray, seed: int) -> int:
    """Codes no item uses get the residual of a random item at that level; returns how many."""
    rng = np.random.default_rng(seed)
    z = model.encode_latent(jnp.asarray(x), jnp.asarray(presence))
    codes, _, residuals = model.quantise(z)
    codes, residuals = np.asarray(codes), np.asarray(residuals)
    revived = 0
    for level, codebook in enumerate(model.codebooks):
        table = np.array(codebook[...])
        dead = np.setdiff1d(np.arange(len(table)), codes[:, level])
        if len(dead):
            table[dead] = residuals[level][rng.integers(len(x), size=len(dead))] + rng.normal(0, 1e-3, (len(dead), table.shape[1]))
            codebook[...] = jnp.asarray(table)
            revived += len(dead)
    return revived


def _batch(rng: np.random.Generator, x: np.ndarray, presence: np.ndarray, pairs: np.ndarray, size: int
           ) -> dict[str, np.ndarray]:
    """Half the batch anchors of co-occurring pairs with their partners, the rest random items."""
    n_pairs = min(len(pairs), size // 4)
    chosen = pairs[rng.integers(len(pairs), size=n_pairs)] if n_pairs else np.zeros((0, 2), np.int64)
    rest = rng.integers(len(x), size=size - 2 * n_pairs)
    rows = np.concatenate([chosen[:, 0], chosen[:, 1], rest]).astype(np.int64)
    pos = np.full(size, -1, np.int32)
    pos[:n_pairs] = np.arange(n_pairs, 2 * n_pairs)
    return {"x": x[rows], "presence": presence[rows], "pos": pos}


def train(cfg: RQVAEConfig, x: np.ndarray, presence: np.ndarray, pairs: np.ndarray, steps: int, batch_size: int,
          learning_rate: float, progress: Progress | None = None, reset_every: int = 100
          ) -> tuple[RQVAE, list[dict[str, float]]]:
    """Train from k-means-initialised codebooks; returns the model and per-report metrics."""
    if len(x) < 2:
        raise ValueError("training needs at least two items")
    model = RQVAE(cfg, nnx.Rngs(cfg.seed))
    init_codebooks(model, x, presence, cfg.seed)
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model: RQVAE, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], rng: jax.Array):
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rng)
        optimizer.update(model, grads)
        return metrics

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    size = min(batch_size, len(x))
    history: list[dict[str, float]] = []
    for i in range(1, steps + 1):
        key, sub = jax.random.split(key)
        metrics = step(model, optimizer, _batch(rng, x, presence, pairs, size), sub)
        if reset_every and i % reset_every == 0 and i < steps:
            metrics = {**metrics, "dead_codes_reset": reset_dead_codes(model, x, presence, cfg.seed + i)}
        if progress is not None or i == steps:
            row = {k: float(v) for k, v in metrics.items()}
            if progress is not None:
                progress(i, row["loss"], row)
            if i == steps or i % max(1, steps // 20) == 0:
                history.append({"step": i, **row})
    return model, history


def assign_codes(model: RQVAE, x: np.ndarray, presence: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Codes [n_items, L] for every row, in fixed-size batches (one compilation)."""
    codes_fn = nnx.jit(lambda m, xb, pb: m.codes(xb, pb))
    out = []
    for start in range(0, len(x), batch_size):
        xb, pb = x[start:start + batch_size], presence[start:start + batch_size]
        pad = batch_size - len(xb)
        if pad:
            xb, pb = np.pad(xb, ((0, pad), (0, 0))), np.pad(pb, ((0, pad), (0, 0)))
        out.append(np.asarray(codes_fn(model, xb, pb))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, model.cfg.levels), np.int32)


def model_params(model: RQVAE) -> dict[str, np.ndarray]:
    """The parameters as a flat {path: array} mapping (for rqvae.npz in a SID table)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(p) for p in path): np.asarray(v[...]) for path, v in flat}


def restore_model(cfg: RQVAEConfig, params: dict[str, np.ndarray]) -> RQVAE:
    """A model of `cfg` with the saved parameters; a mismatch is a ValueError."""
    model = RQVAE(cfg, nnx.Rngs(cfg.seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in flat:
        key = "/".join(str(p) for p in path)
        if key not in params or params[key].shape != variable[...].shape:
            raise ValueError(f"saved RQ-VAE parameters do not match the config at {key}")
        variable[...] = jnp.asarray(params[key])
    nnx.update(model, nnx.from_flat_state(flat))
    return model
