"""`plum bench freshness` runs the whole embedded loop on a reduced configuration (tiny model, a short
live phase at a low rate, 5 s checkpoints) and reports both delays."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_freshness_measures_feature_and_version_delays(tmp_path, monkeypatch):
    out = tmp_path / "freshness.json"
    # A tiny model after 20 CPT steps beats recent popularity on a handful of users only by luck, so
    # with the floor on this run exported nothing in one of three runs here; this test measures the delays,
    # not the model (the floor has its own tests), so the trainer reports the floor as not applied.
    monkeypatch.setenv("PLUM_TRAINER__CONTINUOUS__POPULARITY_FLOOR", "false")
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
    # No probe can reach a version later than the bench looked: sent within the live window, seen by the end of the wait.
    assert version["max_s"] <= report["settings"]["live_seconds"] + report["live"]["waited_after_last_probe_s"] + 2
    assert report["versions"] and report["versions"][-1]["watermark_events"] > 5000
    assert report["target"]["met"] is (version["probes_not_reached"] == 0 and version["max_s"] <= 300)

    # (b''): the first version that trained on each probe, from the event ids each manifest lists by
    # outcome, against the watermarks of the same versions (two records the trainer writes apart).
    record = report["fresh_examples_record"]
    assert record["recorded"] and record["chain_complete"]
    ledger = report["versions"][-1]["fresh_examples"]["ledger"]  # the trainer's own counts
    assert record["listed"] == {o: ledger[o] for o in ("trained", "dropped_by_reward", "without_sid")}
    assert ledger["taken"] == sum(record["listed"].values()) >= 300 - version["probes_not_taken"]
    assert version["probes_trained"] + version["probes_dropped_by_reward"] + version["probes_without_sid"] \
        + version["probes_not_taken"] == 300
    assert 1 <= version["probes_trained"] <= ledger["trained"]
    # Reward sampling keeps a rating r with probability r / 5: MovieLens' mean rating (about 3.5) drops
    # about 30% of the taken probes (at least 100 of them here: the 3-sigma band is about 0.15-0.45).
    taken = version["probes_trained"] + version["probes_dropped_by_reward"]
    assert taken >= 100 and 0.15 < version["probes_dropped_by_reward"] / taken < 0.45
    # A version cannot have trained on a probe its watermark excludes: per prefix of versions, the probes
    # first trained are at most those first covered, so each probe's trained delay is at least its (b).
    covered = trained = 0
    for seen in report["versions"]:
        covered += seen["probes_reached_first"]
        trained += seen["probes_trained_first"]
        assert trained <= covered, seen
    assert (covered, trained) == (version["probes_reached"], version["probes_trained"])
    assert version["delay_to_trained_version_max_s"] >= min(version["max_s"], version["delay_to_trained_version_p50_s"])
    assert version["delay_to_trained_version_p50_s"] <= version["delay_to_trained_version_p99_s"] \
        <= version["delay_to_trained_version_max_s"] <= version["max_s"] + 0.001 or version["probes_not_reached"]

    throughput = report["trainer_throughput"]
    assert set(throughput) == {"alone", "beside_live_pipeline", "ratio"}
    time = report["trainer_time_while_load_offered"]  # the trainer's own seconds by activity
    assert time["wall_s"] > 0 and time["evaluating_s"] > 0  # 5 s checkpoints: several evaluations
    assert 0 < time["evaluating_share"] <= time["boundaries_share"] and time["training_share"] > 0
    assert time["training_share"] + time["boundaries_share"] <= 1.05

    # Every checkpoint the export refused is counted under a gate the trainer knows (none unclassified).
    from trainer.continuous import EXPORT_GATES

    refusals = report["export_refusals"]
    assert isinstance(refusals, dict) and all(n >= 1 for n in refusals.values())
    assert set(refusals) <= set(EXPORT_GATES), refusals
