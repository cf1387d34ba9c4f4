"""`plum status` against real running parts: the embedded broker, the streaming pipeline with its
Prometheus endpoint, trainer-exported servable versions under labels, `plum serve`, and the status
page rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ingest.events import ItemUpsert
from ingest.kafka_clients import ensure_topics, make_producer
from ingest.pipeline import counters
from ingest.producer import new_event
from ops.broker import free_port
from ops.config import PROJECT_ROOT, PlumConfig, load_config
from ops.promote import write_labels
from ops.runtime import find
from ops.status import parse_metrics
from tests.support.serving_state import build_serving_state
from trainer.checkpoint import read_manifest
from trainer.servable import export_version, load_version, version_numbers

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
NEW_ITEM = "brand-new-item"  # upserted, but in no SID table


@dataclass
class World:
    cfg: PlumConfig
    env: dict[str, str]
    sent: Counter = field(default_factory=Counter)  # (topic, partition) -> records the test sent there
    bad: tuple[int, int] = (-1, -1)  # partition and offset of the malformed record
    pipeline: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    logs: dict[str, Path] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return self.logs[name].read_text()[-4000:] if name in self.logs else ""


def send(world: World, topic: str, key: str, value: bytes) -> tuple[int, int]:
    """Send one record and return the partition and offset Kafka gave it."""
    producer = make_producer(world.cfg.kafka)
    try:
        meta = producer.send(topic, key=key.encode(), value=value).get(timeout=30)
    finally:
        producer.close()
    world.sent[(topic, meta.partition)] += 1
    return meta.partition, meta.offset


def plum(world: World, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=world.env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def status_json(world: World) -> dict:
    result = plum(world, "status", "--json", "--window", "0.5")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start(world: World, name: str, *args: str) -> subprocess.Popen:
    world.logs[name] = world.cfg.paths.state("logs", f"{name}.log")
    world.logs[name].parent.mkdir(parents=True, exist_ok=True)
    with open(world.logs[name], "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ops.cli", *args], env=world.env, cwd=PROJECT_ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, process: subprocess.Popen | None = None, log: str = "", timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"{what}: the process exited\n{log}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log}"
        time.sleep(0.1)


def rest(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> int | None:
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(sig)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory):
    """Version 1 from the continuous trainer (stable) and a copy with its own figures as version 2
    (canary); a pipeline streaming a few items and events, one of them malformed; a server."""
    state = tmp_path_factory.mktemp("status") / "state"
    build_serving_state(state)
    prefix = f"s{uuid.uuid4().hex[:8]}"
    topics = {"events_topic": f"{prefix}.events", "items_topic": f"{prefix}.items", "dlq_topic": f"{prefix}.events.dlq"}
    cfg = load_config(env={}, overrides={"paths": {"state_dir": str(state)},
                                         "kafka": {"bootstrap_servers": broker.bootstrap_servers, **topics}})
    model_dir = cfg.paths.model_dir
    model, manifest, item_ids, sids = load_version(model_dir, 1)
    manifest = {k: v for k, v in manifest.items() if k not in ("version", "created_at")}
    manifest["eval"] = {**manifest["eval"], "recall@10": 0.625, "ndcg@10": 0.5}
    manifest["train_loss"] = 1.25
    assert export_version(model_dir, model, manifest, item_ids, sids).name == "2"
    write_labels(model_dir, {"stable": 1, "canary": 2})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PLUM_PATHS__STATE_DIR": str(state),
           "PLUM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           **{f"PLUM_KAFKA__{k.upper()}": v for k, v in topics.items()},
           "PLUM_PIPELINE__METRICS_PORT": str(free_port()), "PLUM_PIPELINE__METRICS_INTERVAL_S": "0.5",
           "PLUM_SERVING__MAX_BATCH": "4", "PLUM_SERVING__POLL_INTERVAL_S": "0.2"}
    world = World(cfg, env)
    ensure_topics(cfg.kafka)
    for item in ("item-0-0", NEW_ITEM):
        upsert = ItemUpsert(item_id=item, title=f"title of {item}")
        send(world, cfg.kafka.items_topic, item, upsert.model_dump_json().encode())
    events = [new_event("status", user_id=f"status-user-{k % 3}", item_id="item-0-0", event_type="click",
                        event_time=T0 + timedelta(minutes=k)) for k in range(5)]
    for event in events + events[:1]:  # the last one is a resend: a duplicate
        send(world, cfg.kafka.events_topic, event.user_id, event.model_dump_json(exclude_none=True).encode())
    world.bad = send(world, cfg.kafka.events_topic, "status-user-0", b'{"not json')
    try:
        world.pipeline = start(world, "pipeline", "pipeline")
        wait_for(lambda: cfg.paths.pipeline_state_db.exists()
                 and counters(cfg.paths.pipeline_state_db).get("records_rejected", 0) == 1
                 and sum(counters(cfg.paths.pipeline_state_db).get(k, 0)
                         for k in ("events_applied", "events_duplicate", "items_upserted")) == 8
                 and find(cfg, "pipeline") is not None,
                 "the pipeline to apply every record", world.pipeline, world.log("pipeline"))
        world.server = start(world, "serve", "serve", "--grpc-port", "0", "--rest-port", "0")

        def both_available() -> bool:
            running = find(cfg, "serve")
            if running is None:
                return False
            states = rest(f"{running.endpoints['rest']}/v1/models/plum")["model_version_status"]
            return sorted((int(s["version"]), s["state"]) for s in states) == [(1, "AVAILABLE"), (2, "AVAILABLE")]

        wait_for(both_available, "the server to serve versions 1 and 2", world.server, world.log("serve"), 240)
        yield world
    finally:
        stop(world.pipeline)
        stop(world.server)


def test_status_json_reports_exact_pipeline_totals_dlq_and_zero_lag_after_catch_up(world):
    cfg = world.cfg
    status = status_json(world)
    assert status["broker"]["reachable"] is True
    assert status["broker"]["topics"] == {cfg.kafka.events_topic: 4, cfg.kafka.items_topic: 1, cfg.kafka.dlq_topic: 1}
    pipeline = status["pipeline"]
    assert pipeline["running"] is True and pipeline["pid"] == world.pipeline.pid
    assert pipeline["totals"] == {"events_applied": 5, "events_duplicate": 1, "records_rejected": 1,
                                  "events_expired": 0, "items_upserted": 2}
    every = {(t, p) for t in (cfg.kafka.events_topic, cfg.kafka.items_topic)
             for p in range(4 if t == cfg.kafka.events_topic else 1)}
    assert {(r["topic"], r["partition"]) for r in pipeline["lag"]} == every
    for row in pipeline["lag"]:  # the end offsets are what the test sent to each partition, all applied
        assert row["end_offset"] == row["position"] == world.sent[(row["topic"], row["partition"])], row
        assert row["lag"] == 0
    assert pipeline["lag_total"] == 0
    assert isinstance(pipeline["records_per_second"], float)
    assert datetime.fromisoformat(pipeline["last_flush"]) > datetime.now(timezone.utc) - timedelta(minutes=10)
    dlq = status["dlq"]
    assert dlq["records"] == 1 and len(dlq["recent"]) == 1
    assert dlq["recent"][0]["reason"].startswith("record: Invalid JSON")
    assert dlq["recent"][0]["source"] == f"{cfg.kafka.events_topic}[{world.bad[0]}]@{world.bad[1]}"
    sid = status["sid"]  # the SID table of the synthetic world: 64 items, NEW_ITEM not among them
    assert (sid["version"], sid["items"], sid["catalogue_items"], sid["without_sid"]) == (1, 64, 2, 1)
    assert sid["without_sid_examples"] == [NEW_ITEM]


def test_pipeline_prometheus_endpoint_counts_what_the_state_store_holds(world):
    running = find(world.cfg, "pipeline")
    with urllib.request.urlopen(running.endpoints["metrics"], timeout=10) as response:
        samples = parse_metrics(response.read().decode())
    totals = counters(world.cfg.paths.pipeline_state_db)
    for name in ("events_applied", "events_duplicate", "records_rejected", "items_upserted"):
        assert samples[(f"plum_pipeline_{name}_total", ())] == totals[name] > 0, name
    lags = {labels: v for (name, labels), v in samples.items() if name == "plum_pipeline_consumer_lag_records"}
    assert len(lags) == 5 and set(lags.values()) == {0.0}
    assert samples[("plum_pipeline_broker_reachable", ())] == 1.0
    # The rate is over the interval since the previous scrape: a second scrape of the idle, caught-up
    # pipeline (every counter already equal to the store's totals) measures exactly nothing processed.
    with urllib.request.urlopen(running.endpoints["metrics"], timeout=10) as response:
        again = parse_metrics(response.read().decode())
    assert again[("plum_pipeline_events_applied_total", ())] == totals["events_applied"]
    assert again[("plum_pipeline_records_per_second", ())] == 0.0
    assert abs(samples[("plum_pipeline_last_flush_timestamp_seconds", ())] - time.time()) < 600


def test_status_reports_trainer_figures_and_versions_from_their_files(world):
    status = status_json(world)
    trainer = json.loads((world.cfg.paths.trainer_dir / "status.json").read_text())
    reported = status["trainer"]
    assert reported["running"] is False  # the trainer ran in the fixture and is gone
    assert (reported["step"], reported["state"]) == (trainer["step"], trainer["state"])
    assert reported["last_checkpoint"] == trainer["last_checkpoint"]
    assert reported["watermark"] == trainer["watermark"]
    assert reported["last_eval"]["model"] == trainer["last_eval"]["model"]
    versions = status["versions"]
    assert versions["labels"] == {"stable": 1, "canary": 2}
    assert [v["version"] for v in versions["versions"]] == version_numbers(world.cfg.paths.model_dir) == [1, 2]
    for row in versions["versions"]:
        manifest = read_manifest(world.cfg.paths.model_dir / str(row["version"]))
        assert row["recall@10"] == manifest["eval"]["recall@10"]
        assert row["train_loss"] == manifest["train_loss"] is not None
        assert row["labels"] == (["stable"] if row["version"] == 1 else ["canary"])


def test_status_reports_served_versions_labels_and_their_traffic(world):
    url = find(world.cfg, "serve").endpoints["rest"]
    for _ in range(3):
        rest(f"{url}/v1/models/plum:predict", {"instances": [{"user_id": "user-1", "k": 3}]})
    for _ in range(2):
        rest(f"{url}/v1/models/plum/labels/canary:predict", {"instances": [{"user_id": "user-2", "k": 3}]})
    serving = status_json(world)["serving"]
    assert serving["running"] is True and serving["pid"] == world.server.pid
    assert [(v["version"], v["state"], v["requests"]) for v in serving["versions"]] == \
        [(1, "AVAILABLE", 3), (2, "AVAILABLE", 2)]
    assert {label: (t["version"], t["requests"]) for label, t in serving["labels"].items()} == \
        {"stable": (1, 3), "canary": (2, 2)}
    assert serving["requests"] == {"error": 0, "invalid": 0, "ok": 5}
    assert serving["requests_per_second"] == 0.0  # nothing was sent between its two scrapes
    latency = serving["latency"]
    assert latency["basis"] == "since start" and 0 < latency["p50_ms"] <= latency["p99_ms"]

    text = plum(world, "status", "--window", "0.5")
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert "label stable -> version 1: 3 requests" in text.stdout
    assert "5 events applied, 1 duplicates, 2 item upserts, 1 rejected to the DLQ" in text.stdout


class _Dom(HTMLParser):
    """The elements of a dumped DOM by id (tag, attributes, text), and every SVG circle per svg id."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "line", "circle", "polyline"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict, list[str]]] = []
        self.by_id: dict[str, tuple[str, dict, str]] = {}
        self.circles: dict[str, list[dict]] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "circle":
            svg = next((a.get("id") for t, a, _ in reversed(self.stack) if t == "svg"), None)
            self.circles.setdefault(svg, []).append(attrs)
        if tag in self.VOID:
            if "id" in attrs:
                self.by_id[attrs["id"]] = (tag, attrs, "")
            return
        self.stack.append((tag, attrs, []))

    def handle_endtag(self, tag):
        if tag in self.VOID or not self.stack:
            return
        while self.stack:
            name, attrs, text = self.stack.pop()
            joined = "".join(text)
            if "id" in attrs:
                self.by_id[attrs["id"]] = (name, attrs, joined.strip())
            if self.stack:
                self.stack[-1][2].append(joined)
            if name == tag:
                return

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)

    def text(self, element_id: str) -> str:
        return self.by_id[element_id][2]

    def attr(self, element_id: str, name: str) -> str | None:
        return self.by_id[element_id][1].get(name)


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it, so this is a broken CI image")
        pytest.skip(message)
    return binary


def test_status_page_renders_the_figures_and_plots_in_a_headless_browser(world, tmp_path):
    chromium = _chromium()
    port = free_port()
    page = start(world, "status-page", "status", "--serve", "--port", str(port), "--interval", "1")
    url = f"http://127.0.0.1:{port}/"
    try:
        def serving() -> bool:
            try:
                return len(rest(url + "status.json")["lag_history"]) >= 2
            except OSError:
                return False

        wait_for(serving, "the status page", page, world.log("status-page"), 60)
        dump = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                               f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, dump.stderr[-2000:]
        status = rest(url + "status.json")
    finally:
        code = stop(page, signal.SIGINT)
    assert code == 0, f"the page did not stop cleanly on SIGINT\n{world.log('status-page')}"
    assert "status: page stopped" in world.log("status-page")

    dom = _Dom(dump.stdout)
    assert dom.text("generated-at") not in ("", "loading"), "the page's script did not run"
    totals = status["pipeline"]["totals"]
    figures = {"events-applied": totals["events_applied"], "events-duplicate": totals["events_duplicate"],
               "items-upserted": totals["items_upserted"], "records-rejected": totals["records_rejected"],
               "dlq-count": status["dlq"]["records"], "lag-total": status["pipeline"]["lag_total"],
               "sid-version": status["sid"]["version"], "sid-items": status["sid"]["items"],
               "sid-without": status["sid"]["without_sid"], "trainer-step": status["trainer"]["step"],
               "requests-ok": status["serving"]["requests"]["ok"]}
    assert {k: int(dom.text(k).replace(",", "")) for k in figures} == figures
    assert [figures[k] for k in ("events-applied", "dlq-count", "lag-total", "sid-without")] == [5, 1, 0, 1]
    assert dom.text("pipeline-state") == f"running (pid {world.pipeline.pid})"
    assert dom.text("serving-state") == f"running (pid {world.server.pid})"
    assert dom.text("broker-state") == "reachable"
    assert dom.attr(f"lag-{world.cfg.kafka.events_topic}-{world.bad[0]}", "id") is not None
    assert [li for li in dom.by_id if li.startswith("served-")] == ["served-1", "served-2"]
    assert {label: int(dom.attr(f"label-{label}", "data-version")) for label in ("stable", "canary")} == \
        {label: t["version"] for label, t in status["serving"]["labels"].items()} == {"stable": 1, "canary": 2}
    assert "Invalid JSON" in dom.text("dlq-reasons")

    versions = status["versions"]["versions"]
    for plot, key in (("plot-recall", "recall@10"), ("plot-loss", "train_loss")):
        points = dom.circles.get(plot, [])
        assert [p["data-x"] for p in points] == [str(v["version"]) for v in versions] == ["1", "2"], plot
        assert [float(p["data-y"]) for p in points] == pytest.approx([v[key] for v in versions]), plot
    lag_points = dom.circles.get("plot-lag", [])
    assert 1 <= len(lag_points) <= len(status["lag_history"])
    assert {float(p["data-y"]) for p in lag_points} == {0.0}


def test_lag_counts_events_sent_but_not_consumed_once_the_pipeline_stops(world):
    cfg = world.cfg
    assert stop(world.pipeline, signal.SIGTERM) == 130, world.log("pipeline")  # SIGTERM stops it like Ctrl-C
    assert find(cfg, "pipeline") is None and not cfg.paths.state("run", "pipeline.json").exists()
    landed = Counter()
    for k in range(3):
        event = new_event("status-late", user_id=f"late-user-{k}", item_id="item-0-1", event_type="click",
                          event_time=T0 + timedelta(hours=1, minutes=k))
        partition, _ = send(world, cfg.kafka.events_topic, event.user_id, event.model_dump_json().encode())
        landed[partition] += 1
    pipeline = status_json(world)["pipeline"]
    assert pipeline["running"] is False and pipeline["throughput_detail"] == "not running"
    assert pipeline["totals"]["events_applied"] == 5
    lag = {r["partition"]: r["lag"] for r in pipeline["lag"] if r["topic"] == cfg.kafka.events_topic}
    assert lag == {p: landed.get(p, 0) for p in range(4)}
    assert pipeline["lag_total"] == 3


def test_status_with_nothing_running_reports_every_part_down_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUM_")}
    run = [sys.executable, "-m", "ops.cli", "--state-dir", str(tmp_path / "empty"), "status"]
    text = subprocess.run(run, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "Traceback" not in text.stdout + text.stderr
    assert "broker     NOT reachable: No embedded broker is running" in text.stdout
    for part in ("pipeline", "trainer", "serving"):
        assert f"{part:<10} not running" in text.stdout
    status = json.loads(subprocess.run(run + ["--json"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                                       text=True, timeout=120).stdout)
    assert status["broker"]["reachable"] is False and status["dlq"]["records"] is None
    assert status["pipeline"]["running"] is status["trainer"]["running"] is status["serving"]["running"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  metrics_port: 70000\n")
    error = subprocess.run([sys.executable, "-m", "ops.cli", "--config", str(bad), "status"], env=env,
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert error.returncode == 2 and "Traceback" not in error.stderr
    assert error.stderr.startswith("error: Invalid configuration: pipeline.metrics_port")
