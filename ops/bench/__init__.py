"""`plum bench ...`: benchmarks that write JSON under ops/bench/results/ and tables in docs/benchmarks.md."""

from __future__ import annotations

import dataclasses

from ops.bench.report import command_line

# The PLUM rows' SFT recipe: `plum bench quality`'s defaults and the Recall@10 column of
# `plum bench sid` (measured on MovieLens-100K: residual dropout and weight decay against
# overfitting the training windows, and the best of the validation checks kept).
SFT_RECIPE = {"dropout": 0.2, "weight_decay": 0.1, "validate_every": 250, "patience": 3, "ema_decay": 0.0}


@dataclasses.dataclass(frozen=True)
class QualityRun:
    """What one `plum bench quality` invocation trains; the defaults are the command's (kept here, light
    to import, so that the CLI and the recorded command line share them), and the field order is the
    recorded command line's."""

    datasets: tuple[str, ...] = ("movielens-100k", "amazon-beauty")
    variants: tuple[str, ...] = ("sasrec", "sasrec-bce", "r1", "cr1", "cr2")
    sft_steps: int = 3000
    cpt_steps: int = 1000
    model_size: str = "small"
    keep_layers: int = 2
    learning_rate: float = 1e-3
    dropout: float = SFT_RECIPE["dropout"]
    weight_decay: float = SFT_RECIPE["weight_decay"]
    validate_every: int = SFT_RECIPE["validate_every"]
    patience: int = SFT_RECIPE["patience"]
    validation_users: int = 1000
    ema_decay: float = SFT_RECIPE["ema_decay"]
    beam_width: int = 20
    sid_init: str = "random"
    target_sampling: str = "reward"
    label_smoothing: float = 0.0
    batch_size: int = 64
    sasrec_epochs: int = 200
    sid_steps: int | None = None  # RQ-VAE steps; None: the config's
    # the models' initialisation, dropout and example order, one model per seed (the SIDs keep the config's seed)
    seeds: tuple[int, ...] = (0,)
    sasrec_trials: int = 12  # most runs of each SASRec row's search on validation

    def command(self) -> str:
        """The command line that repeats this run (the options added after the first recorded runs
        appear only when changed, so that runs on the same settings read the same)."""
        return command_line("plum bench quality", self,
                            option_names={"datasets": "dataset", "variants": "variant", "seeds": "seed"},
                            when_changed=("ema_decay", "beam_width", "sid_init", "target_sampling", "label_smoothing",
                                          "batch_size", "sasrec_epochs", "seeds", "sasrec_trials"))

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must name at least one seed, each once, got {list(self.seeds)}")
