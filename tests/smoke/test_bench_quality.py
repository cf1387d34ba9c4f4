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
                                      "--sasrec-epochs", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["datasets"]["movielens-100k"]["rows"]
    assert [r["variant"] for r in rows] == ["sasrec", "r1"]
    for row in rows:
        assert 0.0 <= row["metrics"]["recall@10"] <= 1.0 and row["metrics"]["effective_vocabulary"] >= 1
    assert rows[1]["metrics"]["users"] == 943  # every test user, as the protocol says
