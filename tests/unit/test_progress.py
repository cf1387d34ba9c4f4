"""The streaming pipeline's progress line: totals since the start, rate since the previous line."""

import time

import pytest

from ingest.sinks import ProgressReporter

pytestmark = pytest.mark.unit


def test_the_rate_is_the_recent_one_not_the_average_since_the_start(capsys):
    progress = ProgressReporter(interval=0.05)
    time.sleep(0.06)
    progress.add({"events": 100, "duplicates": 2, "items": 1})
    first = capsys.readouterr().out
    assert first.startswith("pipeline: 100 events applied (") and "2 duplicates, 1 item upserts, 0 to the DLQ" in first
    assert float(first.split("(")[1].split("/s")[0].replace(",", "")) > 0
    time.sleep(0.06)
    progress.add({"events": 0})  # nothing arrived since the last line
    second = capsys.readouterr().out
    assert second.startswith("pipeline: 100 events applied (0.0/s lately)")
