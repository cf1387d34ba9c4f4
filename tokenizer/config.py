"""Configuration of the tokenizer jobs (the `tokenizer:` section of the project config)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MODALITY_NAMES = ("text", "metadata", "collaborative")


class TokenizeSettings(BaseModel):
    """What `plum tokenize fit` trains; every SID-v2 part stays switchable through `rqvae`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: tuple[str, ...] = MODALITY_NAMES
    max_tags: int = Field(256, ge=1)
    collaborative_dim: int = Field(32, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    # Overrides of RQVAEConfig: codebook_sizes, latent_dim, fusion, multi_resolution,
    # progressive_masking, contrastive, contrastive_weight, temperature, commitment, seed.
    rqvae: dict[str, Any] = Field(default_factory=dict)
