"""`plum bench freshness` runs the whole embedded loop on a reduced configuration (tiny model, a short
live phase at a low rate, 5 s checkpoints) and reports both delays."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_freshness_measures_feature_and_version_delays(tmp_path):
    out = tmp_path / "freshness.json"
    # Interleaved: with MovieLens' own order a 5 s slice holds one or two users, too few to export.
    result = CliRunner().invoke(cli, ["bench", "freshness", "--history-events", "5000", "--order", "interleaved",
                                      "--rate", "10", "--live-seconds", "30", "--wait-seconds", "90", "--model-size", "tiny",
                                      "--sid-steps", "50", "--cpt-steps", "20", "--checkpoint-every-s", "5",
                                      "--min-eval-examples", "3", "--eval-examples", "50",
                                      "--idle-after-steps", "20", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["live"]["probes"] == 300
    online, version = report["to_online_feature"], report["to_servable_version"]
    assert online["probes_seen"] == 300 and 0 < online["p50_s"] <= online["p99_s"] <= online["max_s"]
    assert version["probes_reached"] >= 1 and math.isfinite(version["p50_s"])
    assert version["probes_reached"] + version["probes_not_reached"] == 300
    assert version["p50_s"] > online["p50_s"]  # a version needs the features' events plus training
    assert report["versions"] and report["versions"][-1]["watermark_events"] > 5000
    throughput = report["trainer_throughput"]
    assert set(throughput) == {"alone", "beside_live_pipeline", "ratio"}
    time = report["trainer_time_while_load_offered"]  # the trainer's own seconds by activity
    assert time["wall_s"] > 0 and time["evaluating_s"] > 0  # 5 s checkpoints: several evaluations
    assert 0 < time["evaluating_share"] <= time["boundaries_share"] and time["training_share"] > 0
    assert time["training_share"] + time["boundaries_share"] <= 1.05
    assert isinstance(report["target"]["met"], bool)
