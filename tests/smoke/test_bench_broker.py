"""`plum bench broker` measures the three broker candidates on a few events, restarts included."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ops.cli import cli

pytestmark = pytest.mark.smoke


def test_bench_broker_finds_which_candidates_remember_their_log(tmp_path):
    out = tmp_path / "broker.json"
    result = CliRunner().invoke(cli, ["bench", "broker", "--events", "1000", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["events"] == 1000 and list(report["candidates"]) == ["tansu-memory", "tansu-s3", "apache-kafka"]
    for name, figures in report["candidates"].items():
        assert figures["startup_s"] > 0 and figures["rss_mb"] > 0, name
        assert figures["produce_events_per_s"] > 0 and figures["raw_consume_records_per_s"] > 0, name
    memory = report["candidates"]["tansu-memory"]
    assert memory["kept_after_restart"] == memory["kept_after_kill_9"] == 0 and not memory["remembers"]
    for name in ("tansu-s3", "apache-kafka"):
        figures = report["candidates"][name]
        assert figures["kept_after_restart"] == figures["kept_after_kill_9"] == 1000 and figures["remembers"], name
