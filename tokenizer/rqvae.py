"""The RQ-VAE of Semantic IDs (SID-v2), every part behind a flag for ablations.

Multi-modal fusion (one encoder per modality, concatenated, projected into one latent space),
residual quantisation over multi-resolution codebooks (first level widest), progressive masking
of deeper levels during training, and an in-batch InfoNCE loss that pulls co-occurring items
together. Loss = reconstruction + quantisation (codebook + commitment) + contrastive.

Shapes: B batch, D = sum of modality dims, M modalities, H latent_dim, L levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Sized for catalogues of 1k-20k items: 256*128*64 = 2M code tuples keeps full-tuple collisions
# rare, while every first-level code still sees tens of items and the deepest level's 64 codes
# all get data (the paper's 2048/2^(l-1) is sized for YouTube's hundreds of millions of items).
SMALL_CATALOGUE_CODEBOOK_SIZES = (256, 128, 64)


@dataclass(frozen=True)
class RQVAEConfig:
    """Sizes and SID-v2 switches; variants via `dataclasses.replace(cfg, ...)`."""

    modality_dims: tuple[tuple[str, int], ...]
    modality_hidden: int = 256
    latent_dim: int = 64
    codebook_sizes: tuple[int, ...] = SMALL_CATALOGUE_CODEBOOK_SIZES
    fusion: bool = True
    multi_resolution: bool = True
    progressive_masking: bool = True
    contrastive: bool = True
    contrastive_weight: float = 0.1
    temperature: float = 0.1
    commitment: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.modality_dims or any(int(d) < 1 for _, d in self.modality_dims):
            raise ValueError(f"modality_dims needs at least one (name, dim) with dim >= 1, got {self.modality_dims}")
        names = [name for name, _ in self.modality_dims]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be distinct, got {names}")
        if not self.codebook_sizes or any(n < 2 for n in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be at least one level of size >= 2, got {self.codebook_sizes}")
        if self.multi_resolution and any(a < b for a, b in zip(self.codebook_sizes, self.codebook_sizes[1:])):
            raise ValueError(f"multi-resolution codebooks must not grow with depth (first level widest), "
                             f"got {self.codebook_sizes}; reorder them or set multi_resolution=False")
        if self.modality_hidden < 1 or self.latent_dim < 1:
            raise ValueError(f"modality_hidden and latent_dim must be >= 1, got {self.modality_hidden}, "
                             f"{self.latent_dim}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.commitment < 0 or self.contrastive_weight < 0:
            raise ValueError(f"commitment and contrastive_weight must be >= 0, got {self.commitment}, "
                             f"{self.contrastive_weight}")

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Codebook size per level: as given, or the first level's size everywhere without multi-resolution."""
        return self.codebook_sizes if self.multi_resolution else (self.codebook_sizes[0],) * self.levels

    @property
    def input_dim(self) -> int:
        return sum(int(d) for _, d in self.modality_dims)

    @property
    def column_modality(self) -> np.ndarray:
        """Modality index of every input column: [D] int."""
        return np.repeat(np.arange(len(self.modality_dims)), [int(d) for _, d in self.modality_dims])


class MLP(nnx.Module):
    """[B, d_in] -> Linear -> GELU -> Linear -> [B, d_out]."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.down = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class RQVAE(nnx.Module):
    """Modality vectors x [B, D] with presence mask [B, M] -> latent [B, H] -> codes [B, L] -> x_hat [B, D]."""

    def __init__(self, cfg: RQVAEConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        dims = [int(d) for _, d in cfg.modality_dims]
        if cfg.fusion:
            self.encoders = nnx.List([MLP(d, cfg.modality_hidden, cfg.modality_hidden, rngs) for d in dims])
            self.project = nnx.Linear(cfg.modality_hidden * len(dims), cfg.latent_dim, rngs=rngs)
        else:
            self.encoder = MLP(cfg.input_dim, cfg.modality_hidden, cfg.latent_dim, rngs)
        # Placeholders: training sets every level from k-means of that level's residuals.
        self.codebooks = nnx.List([nnx.Param(0.1 * jax.random.normal(rngs.params(), (n, cfg.latent_dim)))
                                   for n in cfg.level_sizes])
        self.decoder = MLP(cfg.latent_dim, cfg.modality_hidden, cfg.input_dim, rngs)

    def column_mask(self, mask: jax.Array) -> jax.Array:
        """Presence per modality [B, M] -> presence per input column [B, D]."""
        return mask[:, self.cfg.column_modality]

    def latent(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """z [B, H]. Absent modalities enter as zeros (whatever x holds there, NaN included)."""
        x = jnp.where(self.column_mask(mask) > 0, x, 0.0)
        if not self.cfg.fusion:
            return self.encoder(x)
        parts, start = [], 0
        for k, (encoder, (_, d)) in enumerate(zip(self.encoders, self.cfg.modality_dims)):
            parts.append(encoder(x[:, start:start + d]) * mask[:, k:k + 1])
            start += d
        return self.project(jnp.concatenate(parts, axis=1))

    def quantise(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Residual quantisation of z [B, H] -> codes [B, L] int32, chosen codewords [L, B, H], residuals [L, B, H].

        Level l picks the nearest codeword (squared distance) of codebook l to residual l;
        residual l+1 = residual l - codeword (codewords enter later levels as constants).
        """
        residual = z
        codes, quantised, residuals = [], [], []
        for codebook in self.codebooks:
            table = codebook[...]
            distances = (residual ** 2).sum(-1, keepdims=True) - 2 * residual @ table.T + (table ** 2).sum(-1)
            index = jnp.argmin(distances, axis=-1)
            codeword = table[index]
            codes.append(index)
            quantised.append(codeword)
            residuals.append(residual)
            residual = residual - jax.lax.stop_gradient(codeword)
        return jnp.stack(codes, axis=1).astype(jnp.int32), jnp.stack(quantised), jnp.stack(residuals)

    def encode(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Semantic ID codes [B, L] int32: deterministic, every level, no masking."""
        return self.quantise(self.latent(x, mask))[0]


def info_nce(z: jax.Array, pos: jax.Array, temperature: float) -> jax.Array:
    """In-batch InfoNCE on cosine similarity. z [B, H]; pos [B] row of each item's partner or -1.

    Each anchor must pick its partner among all other rows of the batch; rows without a partner
    do not count. Returns the mean over anchors (0 when there are none).
    """
    unit = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
    logits = unit @ unit.T / temperature
    logits = jnp.where(jnp.eye(len(z), dtype=bool), -jnp.inf, logits)  # an item is not its own partner
    log_p = jax.nn.log_softmax(logits, axis=-1)
    valid = pos >= 0
    losses = -jnp.take_along_axis(log_p, jnp.maximum(pos, 0)[:, None], axis=1)[:, 0]
    return jnp.where(valid, losses, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def code_usage(codes: jax.Array, level_sizes: tuple[int, ...]) -> jax.Array:
    """How often each code is used: codes [B, L] -> counts [L, max(level_sizes)] (padding columns 0)."""
    width = max(level_sizes)
    return jnp.stack([jnp.bincount(codes[:, level], length=width) for level in range(len(level_sizes))])


def loss_fn(model: RQVAE, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SID-v2 objective; pure, so it can be differentiated and jitted.

    batch: x [B, D] (modalities concatenated in config order), mask [B, M] presence per modality,
    pos [B] int32 row of a co-occurring partner in the batch or -1. rng drives progressive masking.
    Returns (loss, metrics): scalars, plus code_usage [L, max codebook size] counts for dead-code tracking.
    """
    cfg = model.cfg
    x, mask = batch["x"], batch["mask"]
    z = model.latent(x, mask)
    codes, quantised, residuals = model.quantise(z)
    # VQ-VAE: codewords move to the residuals, the encoder commits to its codewords.
    codebook_loss = ((jax.lax.stop_gradient(residuals) - quantised) ** 2).sum(-1).mean(-1).sum()
    commitment_loss = ((residuals - jax.lax.stop_gradient(quantised)) ** 2).sum(-1).mean(-1).sum()
    quant_loss = codebook_loss + cfg.commitment * commitment_loss

    if cfg.progressive_masking:  # reconstruct from a random prefix of r in {1..L} levels
        prefix = jax.random.randint(rng, (x.shape[0], 1), 1, cfg.levels + 1)
    else:
        prefix = jnp.full((x.shape[0], 1), cfg.levels)
    keep = (jnp.arange(cfg.levels)[None, :] < prefix).astype(z.dtype)  # [B, L]
    z_q = jnp.einsum("bl,lbh->bh", keep, jax.lax.stop_gradient(quantised))
    z_q = z + jax.lax.stop_gradient(z_q - z)  # straight-through: decoder gradients reach the encoder
    recon = model.decoder(z_q)
    # Squared error summed within a modality, averaged over present (item, modality) blocks: each
    # modality weighs the same whatever its width, and absent ones count for nothing.
    column_error = jnp.where(model.column_mask(mask) > 0, (recon - jnp.nan_to_num(x)) ** 2, 0.0)
    block_error = jax.ops.segment_sum(column_error.T, jnp.asarray(cfg.column_modality),
                                      num_segments=len(cfg.modality_dims))  # [M, B]
    recon_loss = block_error.sum() / jnp.maximum(mask.sum(), 1.0)

    contrastive = info_nce(z, batch["pos"], cfg.temperature)  # reported even when off, for ablations
    loss = recon_loss + quant_loss
    if cfg.contrastive:
        loss = loss + cfg.contrastive_weight * contrastive

    usage = code_usage(codes, cfg.level_sizes)
    metrics = {"loss": loss, "recon": recon_loss, "quant": quant_loss, "codebook": codebook_loss,
               "commitment": commitment_loss, "contrastive": contrastive, "levels_kept": keep.sum(1).mean(),
               "code_usage": usage}
    for level, size in enumerate(cfg.level_sizes):
        p = usage[level, :size] / codes.shape[0]
        metrics[f"utilisation_{level}"] = (p > 0).mean()
        metrics[f"perplexity_{level}"] = jnp.exp(-jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-12)), 0.0).sum())
    return loss, metrics
