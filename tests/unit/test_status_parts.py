"""The pure parts of `plum status` and the pipeline's metrics: lag, rates, quantiles, the metric
names, the text report and the running-part records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest

from ingest.metrics import PipelineMetrics, PipelineSample, consumer_lag, records_per_second
from ops.config import load_config
from ops.runtime import announce, find
from ops.status import format_status, histogram_quantile, parse_metrics, serving_figures
from ops.status_page import lag_point
from serving.metrics import ServingMetrics

pytestmark = pytest.mark.unit


def test_consumer_lag_is_end_offset_minus_applied_position_per_partition():
    ends = {("ev", 0): 10, ("ev", 1): 7, ("items", 0): 3}
    positions = {("ev", 0): 10, ("ev", 1): 4, ("gone", 0): 9}
    assert consumer_lag(ends, positions) == {("ev", 0): 0, ("ev", 1): 3, ("items", 0): 3}  # never read: all of it
    assert consumer_lag({("ev", 0): 2}, {("ev", 0): 5}) == {("ev", 0): -3}  # topic recreated under the state


def _sample(at: float, applied: int, rejected: int = 0) -> PipelineSample:
    totals = {"events_applied": applied, "events_duplicate": 0, "records_rejected": rejected, "items_upserted": 0}
    return PipelineSample(at, totals, None, {}, None, None)


def test_records_per_second_counts_every_disposed_record_between_samples():
    earlier = _sample(100.0, 1000, 5)
    assert records_per_second(None, earlier.totals, 100.0) is None
    later = {"events_applied": 1900, "events_duplicate": 50, "records_rejected": 5, "items_upserted": 50}
    assert records_per_second(earlier, later, 102.0) == pytest.approx(500.0)
    assert records_per_second(earlier, later, 100.0) is None  # no time between them


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.01, 10.0), (0.05, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.005)  # inside the first bucket, from 0
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.04 * 40 / 80)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.05 + 0.05 * 9 / 10)
    assert histogram_quantile(0.99, [(0.01, 1.0), (float("inf"), 10.0)]) == 0.01  # past the last finite bound
    assert histogram_quantile(0.5, [(0.01, 0.0), (float("inf"), 0.0)]) is None


def _server_scrape(metrics: ServingMetrics, labels: dict[str, int], states: dict[int, str]) -> dict:
    text = generate_latest(metrics.registry).decode()
    text += "".join(f'plum_serving_version_state{{version="{v}",state="{s}"}} 1.0\n' for v, s in states.items())
    text += "".join(f'plum_serving_label_version{{label="{k}"}} {v}\n' for k, v in labels.items())
    return parse_metrics(text)


def test_serving_figures_give_rates_latency_and_traffic_per_label_over_the_window():
    metrics = ServingMetrics()
    for _ in range(4):
        metrics.requests.labels("ok").inc()
        metrics.version_requests.labels("1").inc()
        metrics.latency.observe(0.02)
    before = _server_scrape(metrics, {"stable": 1, "canary": 2}, {1: "AVAILABLE", 2: "AVAILABLE"})
    for version, seconds in ((1, 0.003), (1, 0.003), (2, 0.2)):
        metrics.requests.labels("ok").inc()
        metrics.version_requests.labels(str(version)).inc()
        metrics.latency.observe(seconds)
    metrics.requests.labels("invalid").inc()
    after = _server_scrape(metrics, {"stable": 1, "canary": 2}, {1: "AVAILABLE", 2: "AVAILABLE"})
    figures = serving_figures(before, after, 2.0)
    assert figures["requests"] == {"error": 0, "invalid": 1, "ok": 7}
    assert figures["requests_per_second"] == pytest.approx(2.0)  # 4 calls in 2 s
    assert figures["labels"]["stable"] == {"version": 1, "requests": 6, "requests_per_second": pytest.approx(1.0)}
    assert figures["labels"]["canary"] == {"version": 2, "requests": 1, "requests_per_second": pytest.approx(0.5)}
    latency = figures["latency"]  # the window's three answered calls only, not the four before it
    assert latency["basis"] == "window"
    assert latency["mean_ms"] == pytest.approx((3 + 3 + 200) / 3, abs=1e-3)  # rounded to microseconds
    assert latency["p50_ms"] <= 5.0 < 100.0 < latency["p99_ms"] <= 250.0
    quiet = serving_figures(after, after, 2.0)
    assert quiet["requests_per_second"] == 0.0 and quiet["latency"]["basis"] == "since start"


def test_pipeline_metrics_are_exposed_under_their_documented_names(tmp_path):
    from ingest.config import KafkaConfig

    metrics = PipelineMetrics(KafkaConfig(), tmp_path / "state.db")
    assert generate_latest(metrics.registry) == b""  # nothing before the first sample
    metrics.latest = PipelineSample(1000.0, {"events_applied": 7, "events_duplicate": 1, "records_rejected": 2,
                                             "events_expired": 5, "items_upserted": 3}, 990.0, {("ev", 0): 4, ("ev", 1): 9},
                                    {("ev", 0): 6, ("ev", 1): 9}, 12.5)
    samples = parse_metrics(generate_latest(metrics.registry).decode())
    assert samples == {
        ("plum_pipeline_events_applied_total", ()): 7.0, ("plum_pipeline_events_duplicate_total", ()): 1.0,
        ("plum_pipeline_records_rejected_total", ()): 2.0, ("plum_pipeline_items_upserted_total", ()): 3.0,
        ("plum_pipeline_events_expired_total", ()): 5.0,
        ("plum_pipeline_broker_reachable", ()): 1.0,
        ("plum_pipeline_consumer_lag_records", (("partition", "0"), ("topic", "ev"))): 2.0,
        ("plum_pipeline_consumer_lag_records", (("partition", "1"), ("topic", "ev"))): 0.0,
        ("plum_pipeline_records_per_second", ()): 12.5,
        ("plum_pipeline_last_flush_timestamp_seconds", ()): 990.0,
    }


def _down_status() -> dict:
    return {
        "generated_at": "2026-01-01T00:00:00+00:00", "state_dir": "/s",
        "broker": {"embedded": True, "address": "embedded", "reachable": False, "detail": "No embedded broker"},
        "pipeline": {"running": False, "detail": "no pipeline state store"},
        "dlq": {"topic": "plum.events.dlq", "records": None, "recent": [], "detail": "unknown: broker down"},
        "sid": {"version": None, "catalogue_items": None, "detail": "no SID table"},
        "trainer": {"running": False, "status_file": "/s/trainer/status.json", "detail": "no status file"},
        "versions": {"model_dir": "/s/models/plum", "labels": {}, "versions": []},
        "serving": {"running": False, "detail": "not running"},
    }


def test_text_report_says_not_running_for_every_part_that_is_down():
    text = format_status(_down_status())
    assert text.splitlines()[1] == "broker     NOT reachable: No embedded broker"
    for part in ("pipeline", "trainer", "serving"):
        assert f"{part:<10} not running" in text
    assert "dlq        plum.events.dlq: unknown: broker down" in text
    assert "versions   0 in /s/models/plum; labels none" in text


def test_text_report_of_running_parts_names_every_figure():
    status = _down_status()
    status["broker"] = {"embedded": False, "address": "k:9092", "reachable": True, "topics": {"plum.events": 4}}
    status["pipeline"] = {
        "running": True, "pid": 42, "started_at": "t", "endpoints": {"metrics": "http://127.0.0.1:8502/metrics"},
        "totals": {"events_applied": 12345, "events_duplicate": 2, "records_rejected": 3, "items_upserted": 4},
        "last_flush": "2026-01-01T00:00:00+00:00", "records_per_second": 1500.0, "lag_total": 7,
        "lag": [{"topic": "plum.events", "partition": 0, "end_offset": 17, "position": 10, "lag": 7}]}
    status["serving"] = {
        "running": True, "pid": 43, "started_at": "t", "endpoints": {"rest": "http://127.0.0.1:8501"},
        "requests": {"error": 0, "invalid": 1, "ok": 20}, "requests_per_second": 2.5, "window_s": 2.0,
        "latency": {"basis": "window", "mean_ms": 12.0, "p50_ms": 10.0, "p99_ms": 40.0},
        "versions": [{"version": 3, "state": "AVAILABLE", "requests": 20, "requests_per_second": 2.5}],
        "labels": {"stable": {"version": 3, "requests": 20, "requests_per_second": 2.5}}}
    text = format_status(status)
    assert "pipeline   running (pid 42, metrics http://127.0.0.1:8502/metrics)" in text
    assert "12,345 events applied, 2 duplicates, 4 item upserts, 3 rejected to the DLQ" in text
    assert "1,500.0 records/s" in text and "lag 7 in all: plum.events[0] 7" in text
    assert "label stable -> version 3: 20 requests, 2.50/s" in text
    assert "latency mean 12.0 ms, p50 10.0 ms, p99 40.0 ms (over the last 2.0 s)" in text


def test_lag_point_sums_partitions_and_keeps_unknown_lag_unknown():
    status = {"generated_at": "t1", "pipeline": {"lag": [{"topic": "e", "partition": 0, "lag": 2},
                                                        {"topic": "e", "partition": 1, "lag": 5}]}}
    assert lag_point(status) == {"at": "t1", "total": 7, "partitions": {"e[0]": 2, "e[1]": 5}}
    assert lag_point({"generated_at": "t2", "pipeline": {"lag": None}})["total"] is None


def test_a_running_part_is_found_while_announced_and_a_dead_one_is_not(tmp_path):
    cfg = load_config(env={}, overrides={"paths": {"state_dir": str(tmp_path)}})
    assert find(cfg, "serve") is None
    with announce(cfg, "serve", rest="http://127.0.0.1:1") as record:
        assert find(cfg, "serve") == record and record.pid == os.getpid()
    assert find(cfg, "serve") is None and not (tmp_path / "run" / "serve.json").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / "serve.json").write_text(json.dumps(
        {"part": "serve", "pid": int(dead.stdout), "started_at": "t", "endpoints": {}}))
    assert find(cfg, "serve") is None  # killed without removing its record
