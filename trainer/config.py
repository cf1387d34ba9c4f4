"""Configuration of the trainer (the `trainer:` section of the project config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ContinuousSettings(BaseModel):
    """`plum train --continuous`: the long-running SFT loop on the stream (trainer/continuous.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fresh_share: float = Field(0.5, ge=0.0, le=1.0)  # share of a batch's rows that end at a fresh event
    learning_rate: float = Field(3e-4, gt=0)  # constant after warm-up: the loop never ends
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_every_s: float = Field(60.0, gt=0)
    keep_checkpoints: int = Field(3, ge=1)
    poll_interval_s: float = Field(2.0, gt=0)
    idle_after_steps: int = Field(500, ge=0)  # history-only steps after the last fresh example, then wait
    eval_examples: int = Field(300, ge=1)  # newest held-out events evaluated per checkpoint (one per user)
    min_eval_examples: int = Field(50, ge=1)  # fewer held-out events than this: no comparison, no export
    # The search the gates judge and serving runs: recorded in each exported version's manifest
    # ("search": {"beam_width": N}); serving.beam_width may only cap it.
    beam_width: int = Field(10, ge=1, le=256)
    export_margin: float = Field(0.01, ge=0.0)  # Recall@10 / NDCG@10 may trail the served version by this much
    # ...unless it is established at this one-sided confidence over the same held-out users that the
    # candidate trails by more (0.5: compare the point estimates, however few the users).
    export_confidence: float = Field(0.95, ge=0.5, lt=1.0)
    # Export only a checkpoint whose Recall@10 beats recent popularity's on the same held-out users.
    # Off only for runs too small to learn anything (`plum demo --no-popularity-floor`); the manifest
    # then says the floor was not applied.
    popularity_floor: bool = True
    report_every_s: float = Field(10.0, gt=0)
    metrics_port: int = Field(0, ge=0, le=65535)  # Prometheus metrics over HTTP; 0 = off
    migrate_sid_versions: bool = True  # adopt a refitted SID version at the next checkpoint boundary

    @model_validator(mode="after")
    def _eval_sizes(self) -> "ContinuousSettings":
        if self.min_eval_examples > self.eval_examples:
            raise ValueError(f"min_eval_examples ({self.min_eval_examples}) cannot exceed eval_examples "
                             f"({self.eval_examples}): no evaluation could ever pass the gate")
        return self


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
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # residual dropout of `plum train cpt` / `sft` steps
    weight_decay: float = Field(0.01, ge=0.0)
    max_history: int = Field(20, ge=1)
    seed: int = 0
    continuous: ContinuousSettings = Field(default_factory=ContinuousSettings)
