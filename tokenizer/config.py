"""Configuration of the tokenizer jobs (the `tokenizer:` section of the project config)."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, BaseModel, Field
from typing_extensions import TypedDict  # pydantic validates typing.TypedDict only from Python 3.12

MODALITY_NAMES = ("text", "metadata", "collaborative")


class RQVAEOverrides(TypedDict, total=False):
    """The `tokenizer.rqvae` section: overrides of tokenizer.rqvae.RQVAEConfig (every field but
    modality_dims, which the jobs derive from the content). A dict of the keys given, so that a
    key left out keeps RQVAEConfig's default (codebook_sizes: sized to the catalogue); an unknown
    key is refused when the config is loaded."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    modality_hidden: Annotated[int, Field(ge=1)]
    latent_dim: Annotated[int, Field(ge=1)]
    codebook_sizes: Annotated[tuple[Annotated[int, Field(ge=2)], ...], Field(min_length=1)]
    fusion: bool
    multi_resolution: bool
    progressive_masking: bool
    contrastive: bool
    contrastive_weight: Annotated[float, Field(ge=0)]
    temperature: Annotated[float, Field(gt=0)]
    commitment: Annotated[float, Field(ge=0)]
    seed: int


class TokenizeSettings(BaseModel):
    """What `plum tokenize fit` trains; every SID-v2 part stays switchable through `rqvae`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: tuple[str, ...] = MODALITY_NAMES
    max_tags: int = Field(256, ge=1)
    collaborative_dim: int = Field(32, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    rqvae: RQVAEOverrides = Field(default_factory=lambda: RQVAEOverrides())
