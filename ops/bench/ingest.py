"""`plum bench ingest`: throughput and event-to-feature delay of the ingestion pipeline.

All on one fresh embedded stack, in one run:
1. streaming throughput: the pipeline runs as its own streaming process, warmed up; N real
   MovieLens-100K events (repeated with fresh user ids past 100k) are replayed as fast as
   possible; end-to-end events/s = N / (time the last event is applied - time the replay began);
2. delay: this process offers a fixed load (events/s) for probe users and watches the Feast
   online store from outside; an event's delay is the time from its send to the first online
   read that shows it (observer resolution ~50 ms);
3. durability cost: phase 1 again, on topics, state and a Feast repo of its own, with
   `pipeline.durable` off (SQLite synchronous=NORMAL, no fsync of staged files and directories);
   the ratio durable / without fsync is what exactly-once after a power loss costs;
4. baseline: plain kafka-python consumes the same topic (no parsing): the raw rate. The ratio
   pipeline/raw is the cost of parsing, de-duplication, state, Feast and the training log;
5. catch-up: a fresh pipeline state reads the filled topic with --until-caught-up, start-up included.
"""

from __future__ import annotations

import shutil
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
from ingest.events import EngagementEvent, ItemUpsert
from ingest.kafka_clients import ensure_topics, make_consumer
from ingest.pipeline import counters
from ingest.producer import EventProducer, new_event
from ingest.replay import replay
from ops.bench.report import machine, update_benchmarks_table, write_result
from ops.config import PlumConfig
from ops.datasets import load_dataset
from ops.ingest_jobs import run_pipeline
from ops.processes import StreamingPipeline, write_config
from ops.stack import embedded_broker, up

PROBE_USERS = 400
POLL_INTERVAL_S = 0.05


def _events(cfg: PlumConfig, n: int) -> tuple[list[ItemUpsert], list[EngagementEvent]]:
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
        for records in consumer.poll(timeout_ms=200, max_records=10_000).values():
            seen += len(records)
    seconds = time.monotonic() - started
    consumer.close()
    return seen / seconds


def _applied(cfg: PlumConfig) -> int:
    return counters(cfg.paths.pipeline_state_db).get("events_applied", 0)


class OnlineObserver(threading.Thread):
    """Polls user_history of the probe users; records when each user's event count grows."""

    def __init__(self, store: FeatureStoreClient, users: list[str], interval: float = POLL_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.users = users
        self.interval = interval
        self.seen: dict[str, list[tuple[int, float]]] = {u: [] for u in users}
        self.stop_event = threading.Event()

    def run(self) -> None:
        last = {u: 0 for u in self.users}
        while not self.stop_event.is_set():
            frame = self.store.read_online("user_history", self.users)
            now = time.monotonic()
            for user, count in zip(frame["user_id"], frame["event_count"]):
                if count == count and count is not None and int(count) > last[user]:
                    last[user] = int(count)
                    self.seen[user].append((int(count), now))
            time.sleep(self.interval)


def _delays(sent: dict[str, list[float]], seen: dict[str, list[tuple[int, float]]],
            baseline: dict[str, int] | None = None) -> list[float]:
    """Send-to-visible delays: a user's k-th sent event (0-based) is visible once the user's event
    count reaches baseline + k + 1 (baseline: the count before the first send; 0 for new users)."""
    delays: list[float] = []
    for user, send_times in sent.items():
        base = baseline.get(user, 0) if baseline else 0
        shown = 0
        for total, at in seen[user]:
            count = total - base
            delays.extend(at - send_times[k] for k in range(shown, min(count, len(send_times))))
            shown = max(shown, count)
    return delays


def warm_up(cfg: PlumConfig, pipeline: StreamingPipeline, store: FeatureStoreClient, item: str) -> float:
    """Seconds until the streaming pipeline shows a first event in the online store."""
    with EventProducer(cfg.kafka) as producer:
        producer.send_event(new_event("bench-warmup", user_id="warmup", item_id=item, event_type="click",
                                      event_time=datetime.now(timezone.utc)))
    started = time.monotonic()
    while store.read_online("user_history", ["warmup"])["event_count"].isna().all():
        pipeline.check()
        if time.monotonic() - started > 120:
            raise RuntimeError(f"the pipeline did not start; see {pipeline.log_file}")
        time.sleep(0.1)
    return time.monotonic() - started


def measure_throughput(cfg: PlumConfig, pipeline: StreamingPipeline, items: list[ItemUpsert],
                       events: list[EngagementEvent]) -> dict[str, Any]:
    baseline = _applied(cfg)
    started = time.monotonic()
    with EventProducer(cfg.kafka) as producer:
        produced = replay(producer, items, events)
    while _applied(cfg) < baseline + len(events):
        pipeline.check()
        if time.monotonic() - started > 600:
            raise RuntimeError(f"the pipeline applied only {_applied(cfg) - baseline} events in 600 s")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    return {"events": len(events), "seconds": round(seconds, 2), "events_per_s": round(len(events) / seconds, 1),
            "producer_events_per_s": round(produced.events_per_second, 1)}


def measure_delay(cfg: PlumConfig, pipeline: StreamingPipeline, store: FeatureStoreClient, rate: int,
                  seconds: int, items: list[str]) -> dict[str, Any]:
    users = [f"probe-{i}" for i in range(PROBE_USERS)]
    observer = OnlineObserver(store, users)
    sent: dict[str, list[float]] = {u: [] for u in users}
    total = rate * seconds
    observer.start()
    try:
        with EventProducer(cfg.kafka, linger_ms=1) as producer:
            t0 = time.monotonic()
            for i in range(total):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                user = users[i % len(users)]
                producer.send_event(new_event("bench", user_id=user, item_id=items[i % len(items)],
                                              event_type="click", event_time=datetime.now(timezone.utc)))
                sent[user].append(time.monotonic())
            producer.flush()
            offered_seconds = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pipeline.check()
            if all(observer.seen[u] and observer.seen[u][-1][0] >= len(sent[u]) for u in users):
                break
            time.sleep(0.2)
    finally:
        observer.stop_event.set()
        observer.join(timeout=5)
    delays = _delays(sent, observer.seen)
    arr = np.array(delays) if delays else np.array([float("nan")])
    return {
        "offered_rate": rate,
        "achieved_offered_rate": round(total / offered_seconds, 1),
        "events": total,
        "events_not_seen": total - len(delays),
        "delay_p50_s": round(float(np.percentile(arr, 50)), 3),
        "delay_p99_s": round(float(np.percentile(arr, 99)), 3),
        "delay_max_s": round(float(arr.max()), 3),
        "observer_poll_interval_s": POLL_INTERVAL_S,
    }


def without_fsync(cfg: PlumConfig) -> PlumConfig:
    """The same stack with `pipeline.durable` off, and topics, state and a Feast repo of its own."""
    state_dir = cfg.paths.state_dir + "-nofsync"
    kafka = {name: getattr(cfg.kafka, name) + ".nofsync" for name in ("events_topic", "items_topic", "dlq_topic")}
    return cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": state_dir}),
        "kafka": cfg.kafka.model_copy(update=kafka),
        "feast": cfg.feast.model_copy(update={"repo_dir": str(Path(state_dir) / "feast")}),
        "pipeline": cfg.pipeline.model_copy(update={"durable": False}),
    })


def measure_durability_cost(cfg: PlumConfig, items: list[ItemUpsert], events: list[EngagementEvent],
                            durable: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 again without fsync (`durable`: phase 1's result); events/s of both and their ratio."""
    fast = without_fsync(cfg)
    ensure_topics(fast.kafka)
    store = FeatureStoreClient(fast.feast_repo_dir, fast.feast)
    store.apply()
    pipeline = StreamingPipeline(fast, config_file=write_config(fast, fast.paths.state("config.yaml")))
    try:
        warm_up(fast, pipeline, store, items[0].item_id)
        throughput = measure_throughput(fast, pipeline, items, events)
    finally:
        pipeline.stop()
    return {"events_per_s_durable": durable["events_per_s"], "events_per_s_without_fsync": throughput["events_per_s"],
            "ratio": round(durable["events_per_s"] / throughput["events_per_s"], 3)}


def measure_catch_up(cfg: PlumConfig) -> dict[str, Any]:
    """A bounded run with a fresh state over the filled topic, start-up included."""
    fresh = cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": cfg.paths.state_dir + "-catchup"}),
        "feast": cfg.feast.model_copy(update={"repo_dir": str(cfg.paths.state("catchup-feast"))}),
    })
    FeatureStoreClient(fresh.feast_repo_dir, fresh.feast).apply()
    result = run_pipeline(fresh, until_caught_up=True)
    return {"events": result.events_applied, "seconds_including_startup": round(result.seconds, 2),
            "events_per_s": round(result.events_per_second, 1)}


def run(cfg: PlumConfig, events: int = 100_000, rate: int = 2000, delay_seconds: int = 20,
        output: str | None = None) -> dict[str, Any]:
    """Run every phase on a fresh embedded stack; write the JSON and the table in docs/benchmarks.md."""
    state = Path(tempfile.mkdtemp(prefix="plum-bench-"))
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": str(state / "stack")})})
    broker = embedded_broker(cfg, say=click.echo)
    pipeline = None
    try:
        broker.start().save(cfg.paths.stack_file)
        cfg = up(cfg, say=click.echo).config
        items, evs = _events(cfg, events)
        store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
        pipeline = StreamingPipeline(cfg)
        startup = warm_up(cfg, pipeline, store, items[0].item_id)
        click.echo(f"bench: streaming pipeline up ({startup:.1f} s to its first online feature)")
        throughput = measure_throughput(cfg, pipeline, items, evs)
        click.echo(f"bench: {len(evs):,} events replayed and applied: {throughput['events_per_s']:,.0f} events/s "
                   "end to end")
        delay = measure_delay(cfg, pipeline, store, rate, delay_seconds, [i.item_id for i in items])
        click.echo(f"bench: at {rate} events/s offered: p50 {delay['delay_p50_s']} s, "
                   f"p99 {delay['delay_p99_s']} s from send to online feature")
        pipeline.stop()
        pipeline = None
        durability = measure_durability_cost(cfg, items, evs, throughput)
        click.echo(f"bench: the same replay without fsync: {durability['events_per_s_without_fsync']:,.0f} events/s "
                   f"(durable / without fsync: {durability['ratio']:.2f})")
        raw = raw_consume_rate(cfg, len(evs))
        click.echo(f"bench: raw kafka-python consume of the same topic: {raw:,.0f} records/s")
        catch_up = measure_catch_up(cfg)
    finally:
        if pipeline is not None:
            pipeline.stop()
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
    report = {
        "benchmark": "ingest",
        "command": f"plum bench ingest --events {events} --rate {rate} --delay-seconds {delay_seconds}",
        "broker": cfg.kafka.broker,
        "machine": machine(),
        "streaming": {**throughput, "pipeline_startup_s": round(startup, 1)},
        "baseline_raw_consume_records_per_s": round(raw, 1),
        "ratio_pipeline_to_raw": round(throughput["events_per_s"] / raw, 3),
        "durability_cost": durability,
        "catch_up": catch_up,
        "delay": delay,
        "targets": {"streaming_events_per_s": ">= 10000", "delay_p99_s_at_2000_per_s": "< 2"},
    }
    path = write_result("ingest", report, output)
    if output is None:  # docs/benchmarks.md shows the default result file, not ad-hoc runs
        update_benchmarks_table("ingest", readme_table(report))
    click.echo(f"bench: wrote {path}")
    return report


def readme_table(report: dict[str, Any]) -> str:
    s, d, c = report["streaming"], report["delay"], report["catch_up"]
    return (
        "| figure | value |\n|---|---|\n"
        f"| end to end, replay into a warm streaming pipeline (events/s) | {s['events_per_s']:,.0f} |\n"
        f"| raw kafka-python consume of the same topic, baseline (records/s) | "
        f"{report['baseline_raw_consume_records_per_s']:,.0f} |\n"
        f"| ratio pipeline / raw | {report['ratio_pipeline_to_raw']:.2f} |\n"
        f"| the same replay without fsync (`pipeline.durable: false`), events/s; durable / without | "
        f"{report['durability_cost']['events_per_s_without_fsync']:,.0f}; {report['durability_cost']['ratio']:.2f} |\n"
        f"| bounded catch-up of the filled topic ({c['events']:,} events), start-up included (events/s) | "
        f"{c['events_per_s']:,.0f} |\n"
        f"| send-to-online-feature delay p50 / p99 at {d['offered_rate']:,} events/s offered (s) | "
        f"{d['delay_p50_s']} / {d['delay_p99_s']} |\n"
        f"\nMeasured {report['machine']['measured_at']} on {report['machine']['cpus']} CPUs, embedded broker "
        f"{report.get('broker', 'tansu')} (commit "
        f"{report['machine']['commit']}) with `{report['command']}`; raw figures in ops/bench/results/ingest.json.\n"
    )
