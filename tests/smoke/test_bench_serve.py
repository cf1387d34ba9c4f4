"""`plum bench serve` runs end to end on a reduced configuration (tiny decoder, short levels, two swaps)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_serve_measures_both_models_batching_and_swaps_without_failures(tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(cli, ["bench", "serve", "--model-size", "tiny", "--sft-steps", "3", "--sid-steps", "30",
                                      "--sasrec-epochs", "1", "--seconds", "2", "--concurrency", "1",
                                      "--concurrency", "4", "--swaps", "2", "--swap-concurrency", "2",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["beam_width"] == 10 and report["settings"]["k"] == 10
    for model in ("plum", "sasrec"):
        levels = report["levels"][model]
        assert [row["clients"] for row in levels] == [1, 4]
        for row in levels:
            assert row["requests"] > 0 and row["failures"] == 0 and row["requests_per_s"] > 0
            assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert report["profile"][model]["recommend_p50_ms"] > 0
    batching = report["batching"]
    assert batching["clients"] == 4 and batching["unbatched"]["requests"] > 0 and batching["throughput_ratio"] > 0
    swaps = report["swaps"]
    assert [(s["from"], s["to"]) for s in swaps["swaps"]] == [(1, 2), (2, 3)]
    assert swaps["failed_requests"] == 0 and swaps["versions_answering"] == [1, 2, 3]
    assert swaps["inside_swap_windows"]["requests"] > 0 and swaps["outside_swap_windows"]["requests"] > 0
    assert set(report["targets"]) == {"p99_at_1", "throughput_at_32", "swap_failures"}
    assert not report["targets"]["throughput_at_32"]["met"]  # no level of 32 clients was run
