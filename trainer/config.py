"""Configuration of the trainer (the `trainer:` section of the project config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainerSettings(BaseModel):
    """What `plum train cpt` and `plum train sft` train: the model, its initialisation, the stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init: Literal["random", "smollm2"] = "random"
    model_size: Literal["tiny", "small", "base"] = "small"
    keep_layers: int = Field(2, ge=1, le=30)  # SmolLM2 layers kept by a warm start
    cpt_steps: int = Field(1000, ge=1)
    sft_steps: int = Field(1000, ge=1)
    eval_users: int = Field(2000, ge=1)  # held-out users evaluated after SFT (beam search is the slow part)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    max_history: int = Field(20, ge=1)
    seed: int = 0
