"""`plum bench ingest`: throughput and event-to-feature delay of the ingestion pipeline.

Phase 1 (throughput): replay N real MovieLens-100K events (repeated with fresh user ids past
100k) into a fresh embedded stack, then in the same run (a) consume the topic with plain
kafka-python (the raw rate, the baseline) and (b) run the pipeline until caught up. The ratio
pipeline/raw is the cost of parsing, de-duplication, state, Feast and the training log.

Phase 2 (delay): the pipeline runs as a separate streaming process; this process offers a fixed
load (events/s) for probe users and watches the Feast online store from outside; an event's delay
is the time from its send to the first online read that shows it (observer resolution ~50 ms).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np
from kafka import TopicPartition

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.events import EngagementEvent
from ingest.kafka_clients import make_consumer
from ingest.producer import EventProducer, new_event
from ingest.replay import replay
from ops.bench.report import machine, update_readme_table, write_result
from ops.broker import EmbeddedBroker, stop_process
from ops.config import PlumConfig
from ops.datasets import load_dataset
from ops.ingest_jobs import run_pipeline
from ops.stack import up

PROBE_USERS = 400
POLL_INTERVAL_S = 0.05


def _events(cfg: PlumConfig, n: int) -> tuple[list, list[EngagementEvent]]:
    ds = load_dataset("movielens-100k", Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    base = list(to_events(ds))
    events = list(base[:n])
    round_ = 1
    while len(events) < n:
        events.extend(e.model_copy(update={"user_id": f"r{round_}-{e.user_id}", "event_id": f"r{round_}-{e.event_id}"})
                      for e in base[: n - len(events)])
        round_ += 1
    return list(to_item_upserts(ds)), events


def raw_consume_rate(cfg: PlumConfig, expected: int) -> float:
    """Records/s that plain kafka-python reads from the events topic (no parsing)."""
    consumer = make_consumer(cfg.kafka, max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    tps = [TopicPartition(cfg.kafka.events_topic, p) for p in range(cfg.kafka.events_partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    started = time.monotonic()
    while seen < expected and time.monotonic() - started < 120:
        for records in consumer.poll(timeout_ms=200, max_records=2000).values():
            seen += len(records)
    seconds = time.monotonic() - started
    consumer.close()
    return seen / seconds


class OnlineObserver(threading.Thread):
    """Polls user_history of the probe users; records when each user's event count grows."""

    def __init__(self, store: FeatureStoreClient, users: list[str]) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.users = users
        self.seen: dict[str, list[tuple[int, float]]] = {u: [] for u in users}
        self.stop_event = threading.Event()

    def run(self) -> None:
        last = {u: 0 for u in self.users}
        while not self.stop_event.is_set():
            frame = self.store.read_online("user_history", self.users)
            now = time.monotonic()
            for user, count in zip(frame["user_id"], frame["event_count"]):
                if count is not None and count == count and int(count) > last[user]:
                    last[user] = int(count)
                    self.seen[user].append((int(count), now))
            time.sleep(POLL_INTERVAL_S)


def _delays(sent: dict[str, list[float]], seen: dict[str, list[tuple[int, float]]]) -> list[float]:
    delays = []
    for user, send_times in sent.items():
        shown = 0
        for count, at in seen[user]:
            for k in range(shown, min(count, len(send_times))):
                delays.append(at - send_times[k])
            shown = max(shown, count)
    return delays


def measure_delay(cfg: PlumConfig, rate: int, seconds: int, items: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PLUM_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers}
    log_file = cfg.paths.state("logs", "bench-pipeline.log")
    with open(log_file, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ops.cli", "--state-dir", cfg.paths.state_dir, "pipeline"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    users = [f"probe-{i}" for i in range(PROBE_USERS)]
    observer = OnlineObserver(store, users)
    sent: dict[str, list[float]] = {u: [] for u in users}
    try:
        with EventProducer(cfg.kafka, linger_ms=1) as producer:
            # Warm-up: wait until the streaming pipeline shows a first event online.
            producer.send_event(new_event("bench-warmup", user_id="warmup", item_id=items[0], event_type="click",
                                          event_time=datetime.now(timezone.utc)))
            producer.flush()
            started = time.monotonic()
            while store.read_online("user_history", ["warmup"])["event_count"].isna().all():
                if process.poll() is not None or time.monotonic() - started > 120:
                    raise RuntimeError(f"the pipeline did not start; see {log_file}")
                time.sleep(0.2)
            startup_s = time.monotonic() - started
            click.echo(f"bench: streaming pipeline up ({startup_s:.1f} s to the first online feature); "
                       f"offering {rate} events/s for {seconds} s")
            observer.start()
            total = rate * seconds
            t0 = time.monotonic()
            for i in range(total):
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                user = users[i % len(users)]
                producer.send_event(new_event("bench", user_id=user, item_id=items[i % len(items)],
                                              event_type="click", event_time=datetime.now(timezone.utc)))
                sent[user].append(time.monotonic())
            producer.flush()
            offered_seconds = time.monotonic() - t0
        drain_deadline = time.monotonic() + 60
        while time.monotonic() < drain_deadline:
            if all(observer.seen[u] and observer.seen[u][-1][0] >= len(sent[u]) for u in users):
                break
            time.sleep(0.2)
    finally:
        observer.stop_event.set()
        stop_process(process.pid, timeout=20, process=process)
    delays = _delays(sent, observer.seen)
    missing = total - len(delays)
    arr = np.array(delays) if delays else np.array([float("nan")])
    return {
        "offered_rate": rate,
        "achieved_offered_rate": round(total / offered_seconds, 1),
        "events": total,
        "events_not_seen": missing,
        "delay_p50_s": round(float(np.percentile(arr, 50)), 3),
        "delay_p99_s": round(float(np.percentile(arr, 99)), 3),
        "delay_max_s": round(float(arr.max()), 3),
        "pipeline_startup_s": round(startup_s, 1),
        "observer_poll_interval_s": POLL_INTERVAL_S,
    }


def run(cfg: PlumConfig, events: int = 100_000, rate: int = 2000, delay_seconds: int = 20,
        output: str | None = None) -> dict[str, Any]:
    """Run both phases on a fresh embedded stack; write the JSON and the README table."""
    state = Path(tempfile.mkdtemp(prefix="plum-bench-"))
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": str(state)})})
    broker = EmbeddedBroker(cfg.paths.state("logs", "broker.log"))
    try:
        broker.start().save(cfg.paths.stack_file)
        cfg = up(cfg, say=click.echo).config
        items, evs = _events(cfg, events)
        click.echo(f"bench: replaying {len(evs):,} MovieLens-100K events")
        with EventProducer(cfg.kafka) as producer:
            produced = replay(producer, items, evs)
        raw = raw_consume_rate(cfg, len(evs))
        click.echo(f"bench: raw kafka-python consume: {raw:,.0f} records/s")
        result = run_pipeline(cfg, until_caught_up=True)
        e2e = result.events_applied / result.seconds
        click.echo(f"bench: pipeline end to end: {e2e:,.0f} events/s ({e2e / raw:.2f} of the raw consume rate)")
        delay = measure_delay(cfg, rate, delay_seconds, [i.item_id for i in items])
        click.echo(f"bench: at {rate} events/s offered: p50 {delay['delay_p50_s']} s, "
                   f"p99 {delay['delay_p99_s']} s event-to-online-feature delay")
    finally:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
    report = {
        "benchmark": "ingest",
        "command": f"plum bench ingest --events {events} --rate {rate} --delay-seconds {delay_seconds}",
        "machine": machine(),
        "throughput": {
            "events": len(evs),
            "events_applied": result.events_applied,
            "producer_events_per_s": round(produced.events_per_second, 1),
            "raw_consume_records_per_s": round(raw, 1),
            "pipeline_events_per_s": round(e2e, 1),
            "pipeline_seconds_including_startup": round(result.seconds, 2),
            "ratio_pipeline_to_raw": round(e2e / raw, 3),
        },
        "delay": delay,
        "targets": {"pipeline_events_per_s": ">= 10000", "delay_p99_s_at_2000_per_s": "< 2"},
    }
    path = write_result("ingest", report, output)
    t, d = report["throughput"], report["delay"]
    table = (
        "| figure | value |\n|---|---|\n"
        f"| pipeline end to end (events/s, incl. start-up) | {t['pipeline_events_per_s']:,.0f} |\n"
        f"| raw kafka-python consume, same topic (records/s) | {t['raw_consume_records_per_s']:,.0f} |\n"
        f"| ratio pipeline / raw | {t['ratio_pipeline_to_raw']:.2f} |\n"
        f"| event-to-online-feature delay p50 / p99 at {d['offered_rate']} events/s (s) | "
        f"{d['delay_p50_s']} / {d['delay_p99_s']} |\n"
        f"\nMeasured {report['machine']['measured_at']} on {report['machine']['cpus']} CPUs with "
        f"`{report['command']}` ({len(evs):,} events); raw JSON in ops/bench/results/ingest.json.\n"
    )
    update_readme_table("ingest", table)
    click.echo(f"bench: wrote {path}")
    return report
