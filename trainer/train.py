"""The one train step of CPT and SFT, the optimizer, and the device mesh.

The step is a pure function `(state, batch) -> (state, metrics)` over the split NNX state of
(model, optimizer), jitted in exactly one place (`TrainLoop`) with the state donated. CPT and SFT
differ only in their batches: `weights` says which next-token predictions carry loss.

Sharding: a `jax.sharding.Mesh` with axes ("data", "fsdp"). Batches are split over both axes;
every parameter (and its optimizer moments) is split over "fsdp" along its largest dimension that
divides evenly, otherwise replicated. On one device both axes have size 1 and nothing changes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.model import Dropout

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient clipping."""

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    end_lr_fraction: float = 0.1
    decay: bool = True  # False: constant after warm-up (a loop with no last step)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be positive, total_steps >= 1 and warmup_steps >= 0")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if not cfg.decay:
        schedule = optax.warmup_constant_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                           optax.adamw(schedule, weight_decay=cfg.weight_decay))
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(warmup, 1), max(cfg.total_steps, max(warmup, 1) + 1),
        cfg.learning_rate * cfg.end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def next_token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted mean NLL of tokens[:, 1:] given logits[:, :-1]; returns (loss, total weight).

    logits: [B, T, V]; tokens, weights: [B, T] (weights[t] weighs the prediction of tokens[t+1]).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, :-1]
    total = w.sum()
    return (nll * w).sum() / jnp.maximum(total, 1.0), total


SIDLevels = tuple[tuple[int, int], ...]  # (first token id, width) per SID position: VocabLayout.sid_levels


def sid_rows(levels: SIDLevels) -> tuple[int, int]:
    """The vocabulary rows (lo, hi) that hold every SID position's tokens."""
    return min(o for o, _ in levels), max(o + w for o, w in levels)


def smoothed_nll(log_normaliser: jax.Array, target_logit: jax.Array, mean_logit: jax.Array,
                 smoothing: float) -> jax.Array:
    """Cross-entropy against the target smoothed with `smoothing` spread uniformly over the softmax's
    tokens: (1 - s) * (logZ - target logit) + s * (logZ - mean logit); s = 0 is the plain NLL."""
    nll = log_normaliser - target_logit
    return nll if not smoothing else (1 - smoothing) * nll + smoothing * (log_normaliser - mean_logit)


def sid_level_loss(logits: jax.Array, lo: int, tokens: jax.Array, weights: jax.Array, levels: SIDLevels,
                   smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Weighted mean NLL of the target SID tokens tokens[:, 1:] given logits[:, :-1] of vocabulary rows
    lo.., each target's softmax taken over the tokens of its own SID position; returns (loss, total weight).
    `smoothing` > 0: label smoothing over that position's tokens (`smoothed_nll`).

    logits: [B, T, C] for token ids lo..lo+C-1; weighted targets must be SID tokens (TrainLoop checks).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    local = jnp.clip(tokens[:, 1:] - lo, 0, logits.shape[-1] - 1)
    level_of = np.full(logits.shape[-1], 0, np.int32)
    for level, (offset, width) in enumerate(levels):
        level_of[offset - lo:offset - lo + width] = level
    own_level = jnp.asarray(level_of)[local][..., None]

    def own(per_level: list[jax.Array]) -> jax.Array:  # each position's value for its target's level
        return jnp.take_along_axis(jnp.stack(per_level, -1), own_level, axis=-1)[..., 0]

    normaliser = own([jax.nn.logsumexp(logits[..., o - lo:o - lo + w], axis=-1) for o, w in levels])
    mean = own([logits[..., o - lo:o - lo + w].mean(-1) for o, w in levels]) if smoothing else 0.0
    nll = smoothed_nll(normaliser, jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0], mean, smoothing)
    w = weights[:, :-1]
    total = w.sum()
    return (nll * w).sum() / jnp.maximum(total, 1.0), total


def sid_phase(tokens: np.ndarray, weights: np.ndarray, levels: SIDLevels) -> int | None:
    """Host side: where a batch's SID targets sit. Behaviour sequences repeat one item every
    len(levels) + 1 tokens (its SID, then its reward), so a position t predicting a level-l token
    usually has (t - l) % (len(levels) + 1) equal to one phase for the whole batch: that phase, or
    None when the weighted targets do not follow it; 0 for a batch without targets (any phase gives
    its zero loss). Raises if a weighted target is not a SID token."""
    pos = np.nonzero(np.asarray(weights)[:, :-1] > 0)
    targets = np.asarray(tokens)[:, 1:][pos]
    level = np.full(len(targets), -1)
    for lv, (offset, width) in enumerate(levels):
        level[(targets >= offset) & (targets < offset + width)] = lv
    if (level < 0).any():
        raise ValueError("an SFT batch weighs a target that is not a SID token; the SID-level loss "
                         "covers SID tokens only")
    phases = np.unique((pos[1] - level) % (len(levels) + 1))
    return 0 if not len(phases) else int(phases[0]) if len(phases) == 1 else None


def strided_sid_loss(model: nnx.Module, x: jax.Array, tokens: jax.Array, weights: jax.Array, levels: SIDLevels,
                     phase: int, smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """`sid_level_loss` for a batch whose targets follow `phase` (see `sid_phase`): each level's
    logits are taken only at the positions that predict that level (a static strided slice of the
    hidden states x [B, T, D]) over that level's rows, about (levels + 1) times less head work than
    every position against every SID row. Same value as `sid_level_loss` on such a batch."""
    step, t = len(levels) + 1, tokens.shape[1]
    summed = jnp.zeros((), jnp.float32)
    for lv, (offset, width) in enumerate(levels):
        start = (phase + lv) % step
        h = x[:, start:t - 1:step]
        if h.shape[1] == 0:
            continue
        logits = model.head(h, (offset, offset + width))  # [B, positions, width]
        target = jnp.clip(tokens[:, start + 1::step][:, :h.shape[1]] - offset, 0, width - 1)
        target_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        nll = smoothed_nll(jax.nn.logsumexp(logits, axis=-1), target_logit, logits.mean(-1) if smoothing else 0.0,
                           smoothing)
        summed = summed + (nll * weights[:, start:t - 1:step]).sum()
    total = weights[:, :-1].sum()
    return summed / jnp.maximum(total, 1.0), total


def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], dropout: Dropout | None = None,
            sid_levels: SIDLevels | None = None, sid_phase: int | None = None, label_smoothing: float = 0.0
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token loss on the weighted positions plus the model's auxiliary (MoE balance) loss; with
    `sid_levels`, the SFT loss over each target's own SID position (`sid_level_loss`, label-smoothed
    over that position by `label_smoothing`), computed per level at the strided positions when the
    batch's targets follow `sid_phase`."""
    if sid_levels and sid_phase is not None:
        x, aux = model.hidden(batch["tokens"], batch["mask"], dropout)
        nll, total = strided_sid_loss(model, x, batch["tokens"], batch["weights"], sid_levels, sid_phase,
                                      label_smoothing)
    elif sid_levels:
        rows = sid_rows(sid_levels)
        logits, aux = model(batch["tokens"], batch["mask"], dropout, rows=rows)
        nll, total = sid_level_loss(logits, rows[0], batch["tokens"], batch["weights"], sid_levels, label_smoothing)
    else:
        logits, aux = model(batch["tokens"], batch["mask"], dropout)
        nll, total = next_token_loss(logits, batch["tokens"], batch["weights"])
    return nll + aux, {"loss": nll, "aux_loss": aux, "target_tokens": total}


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array],
               dropout_key: jax.Array | None = None, dropout_rate: float = 0.0, sid_levels: SIDLevels | None = None,
               sid_phase: int | None = None, label_smoothing: float = 0.0) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One optimizer step on (model, optimizer) state; pure, so it jits and shards cleanly.
    With dropout_rate > 0, `dropout_key` draws this step's residual-dropout masks; `sid_levels`,
    `sid_phase` and `label_smoothing` select the SFT loss (see `loss_fn`)."""
    model, optimizer = nnx.merge(graphdef, state)
    dropout = Dropout(dropout_rate, dropout_key) if dropout_rate > 0 else None
    loss = functools.partial(loss_fn, sid_levels=sid_levels, sid_phase=sid_phase, label_smoothing=label_smoothing)
    (_, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(model, batch, dropout)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return nnx.state((model, optimizer)), metrics


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[Any] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh; data=-1 takes every device not used by fsdp."""
    devices = devices if devices is not None else jax.devices()
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp groups of {fsdp}")
        data = len(devices) // fsdp
    if data * fsdp > len(devices):
        raise ValueError(f"a {data}x{fsdp} mesh needs {data * fsdp} devices; {len(devices)} are available")
    return Mesh(np.array(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest evenly divisible dimension over "fsdp"; replicate what does not divide."""
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp)), state)


@jax.jit
def _ema_update(average: nnx.State, current: nnx.State, decay: jax.Array) -> nnx.State:
    return jax.tree.map(lambda a, c: (decay * a + (1 - decay) * c).astype(a.dtype), average, current)


class TrainLoop:
    """Owns the jitted step, the sharded state and progress output for one model and optimizer.
    `dropout`: the residual-dropout rate of training steps (0: none); step n's masks come from
    the key `seed` folded with n, so a run repeats exactly. `sid_levels` (SFT): each target SID
    token's softmax runs over its own SID position's tokens (`sid_level_loss`); None: CPT's
    next-token loss over the whole vocabulary. `ema_decay` > 0 also keeps an exponential moving
    average of the model's weights (`averaged_model`), updated after every step with the decay
    min(ema_decay, (1 + n) / (10 + n)) so that early steps do not drag the random init along.
    `label_smoothing` (SFT only) spreads that share of each SID target over its position's tokens."""

    def __init__(self, model: nnx.Module, optim: OptimConfig, mesh: Mesh | None = None, dropout: float = 0.0,
                 seed: int = 0, sid_levels: SIDLevels | None = None, ema_decay: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if label_smoothing and not sid_levels:
            raise ValueError("label_smoothing applies to the SFT loss over SID positions only (give sid_levels)")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.sid_levels = tuple((int(o), int(w)) for o, w in sid_levels) if sid_levels else None
        self.mesh = mesh or make_mesh()
        optimizer = nnx.Optimizer(model, make_optimizer(optim), wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, optimizer))
        self.state_sharding = state_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_sharding)
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self._step = jax.jit(functools.partial(train_step, dropout_rate=dropout, sid_levels=self.sid_levels,
                                               label_smoothing=label_smoothing),
                             static_argnums=0, static_argnames="sid_phase", donate_argnums=1,
                             out_shardings=(self.state_sharding, None))
        self._dropout_key = jax.random.key(seed) if dropout > 0 else None
        self.step_count = 0
        self.ema_decay = ema_decay
        self.ema = jax.tree.map(jnp.copy, self.state[0]) if ema_decay > 0 else None  # the model half of the state

    @property
    def devices(self) -> int:
        return self.mesh.size

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        rows = len(batch["tokens"])
        if rows % self.mesh.size:
            raise ValueError(f"batch of {rows} rows does not split over {self.mesh.size} devices")
        phase = sid_phase(batch["tokens"], batch["weights"], self.sid_levels) if self.sid_levels else None
        batch = {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}
        key = None if self._dropout_key is None else jax.random.fold_in(self._dropout_key, self.step_count)
        self.state, metrics = self._step(self.graphdef, self.state, batch, key, sid_phase=phase)
        self.step_count += 1
        if self.ema is not None:
            decay = min(self.ema_decay, (1 + self.step_count) / (10 + self.step_count))
            self.ema = _ema_update(self.ema, self.state[0], jnp.float32(decay))
        return {k: float(v) for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state as a pure dict of host arrays (what a checkpoint stores); with
        weight averaging on, the average too under "ema"."""
        pure = jax.device_get(nnx.to_pure_dict(self.state))
        if self.ema is not None:
            pure["ema"] = jax.device_get(nnx.to_pure_dict(self.ema))
        return pure

    def load_state_dict(self, pure: dict[str, Any]) -> None:
        """Replace model and optimizer state with a checkpoint's (same structure and shapes). A loop
        that averages takes the checkpoint's average, or starts a new one at its weights when the
        checkpoint has none (an average of other weights would not belong to them)."""
        pure = dict(pure)
        ema = pure.pop("ema", None)
        state = jax.tree.map(lambda x: x, self.state)
        nnx.replace_by_pure_dict(state, pure)
        self.state = jax.device_put(state, self.state_sharding)
        if self.ema is not None:
            if ema is None:
                self.ema = jax.tree.map(jnp.copy, self.state[0])
            else:
                averaged = jax.tree.map(lambda x: x, self.ema)
                nnx.replace_by_pure_dict(averaged, ema)
                self.ema = jax.device_put(averaged, self.state_sharding[0])

    def model(self) -> nnx.Module:
        """The current model (a view on the trained state)."""
        model, _ = nnx.merge(self.graphdef, self.state)
        return model

    def averaged_model(self) -> nnx.Module:
        """The model with the moving average of its weights (the current model without averaging)."""
        if self.ema is None:
            return self.model()
        state = jax.tree.map(lambda x: x, self.state)
        state[0] = self.ema
        model, _ = nnx.merge(self.graphdef, state)
        return model

    def run(self, batches: Iterator[dict[str, np.ndarray]], steps: int, say: Progress | None = None,
            label: str = "train", report_every: int | None = None) -> list[dict[str, float]]:
        """`steps` steps with a progress line (step, loss, tokens/s, ETA) every `report_every`. Each
        history row has the mean loss and the share of real (not padding) tokens since the row before;
        tokens/s counts real tokens since the start."""
        report_every = report_every or max(1, steps // 20)
        history: list[dict[str, float]] = []
        started = time.monotonic()
        tokens = 0
        window: list[float] = []
        window_real = window_padded = 0
        for i in range(1, steps + 1):
            batch = next(batches)
            real = int(batch["mask"].sum())
            tokens += real
            window_real += real
            window_padded += batch["mask"].size
            metrics = self.step(batch)
            window.append(metrics["loss"])
            if i % report_every == 0 or i == steps:
                elapsed = time.monotonic() - started
                row = {"step": self.step_count, "loss": float(np.mean(window)), "tokens_per_s": tokens / elapsed,
                       "elapsed_s": elapsed, "real_share": window_real / window_padded}
                history.append(row)
                window = []
                window_real = window_padded = 0
                if say is not None:
                    eta = elapsed / i * (steps - i)
                    say(f"{label}: step {i}/{steps} loss {row['loss']:.4f} {row['tokens_per_s']:,.0f} tokens/s "
                        f"ETA {eta:.0f} s")
        return history
