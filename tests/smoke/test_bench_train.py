"""`plum bench train` times the training step against a matmul peak of the same run (tiny budget)."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_train_measures_mfu_and_records_the_command(tmp_path):
    out = tmp_path / "train.json"
    args = ["bench", "train", "--size", "tiny", "--vocab", "64", "--batch", "2", "--length", "16", "--steps", "2",
            "--peak-size", "256"]
    result = CliRunner().invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["matmul_peak_flops_per_s"] > 0
    [row] = report["rows"]
    assert row["size"] == "tiny" and row["config"]["vocab_size"] == 64 and row["batch"] == 2 and row["length"] == 16
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_seconds"])
    assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / report["matmul_peak_flops_per_s"])
    assert row["achieved_flops_per_s"] > 0 and row["params"] > 0
    assert shlex.split(report["command"]) == ["plum", *args]  # the recorded command repeats this run
