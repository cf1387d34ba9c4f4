"""A benchmark result's recorded command line repeats the run that produced it."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from ops.bench import QualityRun
from ops.bench.freshness import FreshnessRun
from ops.bench.serve import ServeRun
from ops.cli import cli

pytestmark = pytest.mark.unit


def _parsed(command: str, run_type: type, fixed: dict | None = None):
    """The run that `plum bench NAME ...` would build from `command`'s options."""
    args = shlex.split(command)
    assert args[:2] == ["plum", "bench"]
    ctx = cli.commands["bench"].commands[args[2]].make_context(args[2], args[3:])
    params = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in ctx.params.items() if k != "output"}
    assert set(params) == {f.name for f in dataclasses.fields(run_type)}, "an option the run does not record"
    return run_type(**params)


def test_bench_quality_command_names_every_changed_option():
    changed = QualityRun(datasets=("amazon-beauty",), variants=("cr2", "sasrec"), sft_steps=7, cpt_steps=0,
                         model_size="base", keep_layers=3, learning_rate=2e-3, dropout=0.05, weight_decay=0.3,
                         validate_every=9, patience=4, validation_users=11, ema_decay=0.99, beam_width=12,
                         sid_init="codebook", target_sampling="all", label_smoothing=0.1, batch_size=256,
                         sasrec_epochs=3, sid_steps=30, seeds=(1, 2), sasrec_trials=3)
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(QualityRun))
    assert _parsed(changed.command(), QualityRun) == changed
    assert _parsed(QualityRun().command(), QualityRun) == QualityRun()


def test_bench_quality_command_reads_as_the_recorded_rows_do():
    # The MovieLens-100K R1 row's command as the table records it: options at their defaults since
    # the first runs are named, the later ones only when changed.
    assert QualityRun(datasets=("movielens-100k",), variants=("r1",), target_sampling="all").command() == (
        "plum bench quality --dataset movielens-100k --variant r1 --sft-steps 3000 --cpt-steps 1000 "
        "--model-size small --keep-layers 2 --learning-rate 0.001 --dropout 0.2 --weight-decay 0.1 "
        "--validate-every 250 --patience 3 --validation-users 1000 --target-sampling all")
    assert "--batch-size 256" in dataclasses.replace(QualityRun(), batch_size=256).command()


def test_bench_serve_and_freshness_commands_repeat_their_runs():
    serve = ServeRun(model_size="tiny", sft_steps=5, sid_steps=7, sasrec_epochs=2, seconds=1.5, concurrency=(2, 4),
                     swaps=3, swap_concurrency=2)
    assert _parsed(serve.command(), ServeRun) == serve
    fresh = FreshnessRun(history_events=5000, order="interleaved", rate=50.0, live_seconds=5, wait_seconds=6,
                         model_size="tiny", batch_size=8, sid_steps=9, cpt_steps=2, checkpoint_every_s=0.5,
                         min_eval_examples=3, eval_examples=4, idle_after_steps=1)
    assert _parsed(fresh.command(), FreshnessRun) == fresh
