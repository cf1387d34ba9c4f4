"""`plum bench quality` runs end to end on a reduced configuration (MovieLens-100K, tiny budgets)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_quality_writes_comparable_rows(tmp_path):
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(cli, ["bench", "quality", "--dataset", "movielens-100k", "--variant", "sasrec",
                                      "--variant", "r1", "--sft-steps", "3", "--sid-steps", "30",
                                      "--sasrec-epochs", "2", "--sasrec-trials", "2", "--beam-width", "12",
                                      "--sid-init", "codebook", "--target-sampling", "all", "--label-smoothing",
                                      "0.1", "--seed", "3", "--seed", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["datasets"]["movielens-100k"]["rows"]
    assert [r["variant"] for r in rows] == ["sasrec", "r1"]
    for row in rows:
        assert row["seeds"] == [3, 4] and [r["seed"] for r in row["per_seed"]] == [3, 4]
        per_seed = [r["metrics"]["recall@10"] for r in row["per_seed"]]
        # the row's figure is the mean of its seeds' test figures, the spread their standard deviation
        assert row["metrics"]["recall@10"] == pytest.approx(sum(per_seed) / 2)
        assert row["spread"]["recall@10"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
        assert [r["settings"]["seed"] for r in row["per_seed"]] == [3, 4]  # each seed reached its trainer
    sasrec = rows[0]
    # the search ran its two trials on validation, the first seed's model is the chosen trial's
    assert sasrec["tuning"]["runs"] == 2 and len(sasrec["tuning"]["trials"]) == 2
    chosen = max(sasrec["tuning"]["trials"], key=lambda t: t["valid_recall@10"])
    assert sasrec["tuning"]["chosen"] == chosen["point"]
    assert {k: sasrec["per_seed"][1]["settings"][k] for k in chosen["point"]} == chosen["point"]
    assert rows[1]["metrics"]["users"] == 943  # every test user, as the protocol says
    # Model selection on the validation targets is on by default: one check at the run's only chunk.
    assert [c["step"] for c in rows[1]["per_seed"][0]["validation"][:-1]] == [3]
    assert rows[1]["per_seed"][0]["validation"][-1]["selected_step"] == 3
    assert report["datasets"]["movielens-100k"]["command"] == report["command"]  # each data set's provenance
    assert rows[1]["settings"]["beam_width"] == 12 and "--beam-width 12" in report["command"]
    assert rows[1]["settings"]["sid_init"] == "codebook" and "--sid-init codebook" in report["command"]
    assert rows[1]["settings"]["target_sampling"] == "all" and "--target-sampling all" in report["command"]
    assert rows[1]["settings"]["label_smoothing"] == 0.1 and "--label-smoothing 0.1" in report["command"]
    assert "--sid-steps 30" in report["command"] and "--sasrec-epochs 2" in report["command"]  # repeats the run
    assert "--seed 3 --seed 4" in report["command"] and "--sasrec-trials 2" in report["command"]
    assert rows[1]["tokenizer"]["steps"] == 30 and rows[1]["tokenizer"]["rqvae"] == {}  # the SID config too


def test_the_default_result_keeps_the_rows_and_data_sets_a_run_did_not_train(tmp_path):
    from ops.bench.quality import VARIANTS, readme_table
    from ops.bench.report import with_earlier_datasets, with_earlier_rows

    order = ["sasrec", *VARIANTS]

    earlier = tmp_path / "quality.json"
    metrics = {"recall@5": .1, "recall@10": .2, "ndcg@5": .05, "ndcg@10": .08}
    sasrec = {"row": "SASRec", "variant": "sasrec", "metrics": metrics, "train_seconds": 9}
    r1 = {"row": "PLUM R1", "variant": "r1", "metrics": {**metrics, "recall@10": .3}, "train_seconds": 99}
    old_run = {"measured_at": "2026-01-01T00:00:00+00:00", "commit": "aaa"}
    old_command = "plum bench quality --dataset amazon-beauty --dataset movielens-100k"
    earlier.write_text(json.dumps({"command": old_command, "machine": old_run, "run": {"sft_steps": 1},
                                   "datasets": {"amazon-beauty": {"rows": [sasrec, r1]},
                                                "movielens-100k": {"rows": [sasrec, r1]}}}))
    new_run = {"measured_at": "2026-02-01T00:00:00+00:00", "commit": "bbb"}
    command = "plum bench quality --dataset amazon-beauty --variant cr1 --variant sasrec"
    fresh_rows = [{**row, "command": command, "machine": new_run} for row in
                  ({"row": "PLUM CR1", "variant": "cr1", "metrics": metrics, "train_seconds": 5}, sasrec)]
    fresh = {"amazon-beauty": {"rows": fresh_rows, "command": command, "machine": new_run}}
    rows_merged = with_earlier_rows(earlier, fresh, "variant", order)
    merged = with_earlier_datasets(earlier, rows_merged, ("command", "machine", "run"))
    assert list(merged) == ["movielens-100k", "amazon-beauty"]  # the known data sets' order
    beauty = merged["amazon-beauty"]["rows"]
    assert [r["variant"] for r in beauty] == ["sasrec", "r1", "cr1"]  # this run's SASRec, the earlier R1
    assert beauty[0]["machine"] == new_run and beauty[1]["machine"] == old_run
    assert beauty[1]["command"] == old_command and beauty[1]["metrics"]["recall@10"] == .3
    assert merged["movielens-100k"]["run"] == {"sft_steps": 1}
    table = readme_table({"command": command, "machine": new_run, "datasets": merged})
    assert f"amazon-beauty, SASRec; PLUM CR1: measured 2026-02-01T00:00:00+00:00 (commit bbb) with `{command}`." in table
    assert f"amazon-beauty, PLUM R1: measured 2026-01-01T00:00:00+00:00 (commit aaa) with `{old_command}`." in table
    assert f"movielens-100k: measured 2026-01-01T00:00:00+00:00 (commit aaa) with `{old_command}`." in table
    assert with_earlier_datasets(tmp_path / "missing.json", fresh, ("command",)) == fresh
    alone = with_earlier_rows(tmp_path / "missing.json", fresh, "variant", order)["amazon-beauty"]["rows"]
    assert [r["variant"] for r in alone] == ["sasrec", "cr1"]  # nothing earlier: this run's rows, in order
