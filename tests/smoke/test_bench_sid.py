"""`plum bench sid` measures chosen ablation rows and keeps the others from earlier runs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_sid_measures_only_the_chosen_rows(tmp_path):
    out = tmp_path / "sid.json"
    result = CliRunner().invoke(cli, ["bench", "sid", "--dataset", "movielens-100k", "--steps", "20",
                                      "--row", "4", "--row", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["datasets"]["movielens-100k"]["rows"]
    assert [r["row"] for r in rows] == ["SIDv1 (plain RQ-VAE, text)", "+ multi-modal fusion"]
    assert rows[1]["modalities"] == ["text", "metadata", "collaborative"] and rows[1]["flags"]["fusion"]
    assert all(r["command"] == report["command"] for r in rows)
    assert report["command"].endswith("--row 1 --row 4")
    # Uniqueness is distinct SIDs / items: 20 steps already spread 1,682 items (a collapsed codebook
    # leaves few distinct SIDs), and a collision group of g items leaves at most 1,682 - g + 1 distinct.
    unique, largest = rows[0]["uniqueness_before_suffix"], rows[0]["largest_collision_group"]
    assert unique > 0.5 and (largest == 1) == (unique == 1.0)
    assert unique <= 1 - (largest - 1) / 1682 + 1e-4


def test_bench_sid_refuses_a_row_that_does_not_exist():
    result = CliRunner().invoke(cli, ["bench", "sid", "--dataset", "movielens-100k", "--row", "6"])
    assert result.exit_code == 2 and "--row" in result.output and "Traceback" not in result.output


def test_the_sid_table_keeps_the_rows_a_run_did_not_measure(tmp_path):
    from ops.bench.report import with_earlier_rows
    from ops.bench.sid import ROWS, readme_table

    labels = [label for label, _, _ in ROWS]

    def row(label: str, recall: float | None) -> dict:
        made = {"row": label, "uniqueness_before_suffix": .9, "utilisation": [1.0, .8],
                "cooccurring_pairs_sharing_first_code": .2, "random_pairs_sharing_first_code": .01}
        return {**made, "retrieval": {"metrics": {"recall@10": recall}}} if recall is not None else made

    old_run = {"measured_at": "2026-01-01T00:00:00+00:00", "commit": "aaa"}
    earlier = tmp_path / "sid.json"
    earlier.write_text(json.dumps({"command": "plum bench sid", "machine": old_run, "datasets": {"amazon-beauty": {
        "command": "plum bench sid", "machine": old_run, "settings": {"steps": 1}, "cooccurrences_from": "every event",
        "rows": [row(label, None) for label in labels]}}}))
    new_run = {"measured_at": "2026-02-01T00:00:00+00:00", "commit": "bbb"}
    command = "plum bench sid --dataset amazon-beauty --row 2 --recall-steps 500"
    fresh = {"amazon-beauty": {"command": command, "machine": new_run, "rows": [
        {**row(labels[1], .05), "command": command, "machine": new_run, "cooccurrences_from": "training part"}]}}
    keys = ("command", "machine", "settings", "cooccurrences_from")
    merged = with_earlier_rows(earlier, fresh, "row", labels, keys)["amazon-beauty"]["rows"]
    assert [r["row"] for r in merged] == labels
    assert merged[1]["retrieval"]["metrics"]["recall@10"] == .05 and merged[1]["machine"] == new_run
    assert merged[0]["cooccurrences_from"] == "every event" and merged[0]["settings"] == {"steps": 1}
    table = readme_table({"command": command, "machine": new_run, "datasets": {"amazon-beauty": {"rows": merged}}})
    assert f"amazon-beauty, {labels[1]}: measured 2026-02-01T00:00:00+00:00 (commit bbb) with `{command}`." in table
    assert "| 0.0500 |" in table and table.count("not measured") == 4
