"""The ingestion pipeline against a real broker, a real Feast repo and real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from kafka import TopicPartition

from features import FeatureStoreClient
from ingest.events import EngagementEvent
from ingest.kafka_clients import ensure_topics, make_consumer
from ingest.pipeline import counters
from ingest.producer import EventProducer, new_event
from ingest.replay import replay
from ingest.state_store import PipelineStateStore
from ingest.training_log import read_training_log
from ops.config import PROJECT_ROOT, PlumConfig
from ops.ingest_jobs import run_pipeline
from tests.support.brokers import ON_BOTH_BROKERS

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, tzinfo=timezone.utc)


def prepare(cfg: PlumConfig) -> FeatureStoreClient:
    ensure_topics(cfg.kafka)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    store.apply()
    return store


def synthetic_events(n: int, users: int = 40, items: int = 300, namespace: str = "t") -> list[EngagementEvent]:
    return [
        new_event(namespace, user_id=f"u{i % users}", item_id=f"i{(i * 7) % items}", event_type="rating",
                  event_time=T0 + timedelta(minutes=i), rating=float(i % 5 + 1), rating_scale=5.0)
        for i in range(n)
    ]


def expected_histories(events: list[EngagementEvent], length: int = 50) -> dict[str, tuple[list[str], int]]:
    by_user: dict[str, list[EngagementEvent]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)
    out = {}
    for user, evs in by_user.items():
        evs.sort(key=lambda e: (int(e.event_time.timestamp()), e.item_id))
        out[user] = ([e.item_id for e in evs[-length:]], len(evs))
    return out


def assert_landed_exactly_once(cfg: PlumConfig, store: FeatureStoreClient, events: list[EngagementEvent]) -> None:
    log = read_training_log(cfg.paths.training_log_dir)
    assert len(log) == len(events), "training log must hold every valid event exactly once"
    assert set(log["event_id"]) == {e.event_id for e in events}
    expected = expected_histories(events)
    online = store.read_online("user_history", sorted(expected))
    for row in online.itertuples():
        items, count = expected[row.user_id]
        assert list(row.history_item_ids) == items, row.user_id
        assert row.event_count == count, row.user_id


@ON_BOTH_BROKERS
def test_replayed_movielens_slice_lands_user_by_user(plum_config):
    from ingest.datasets import to_events, to_item_upserts
    from ops.datasets import load_dataset

    store = prepare(plum_config)
    ds = load_dataset("movielens-100k", plum_config.paths.data_dir, plum_config.paths.cache_dir)
    events = list(to_events(ds))[:4000]
    with EventProducer(plum_config.kafka) as producer:
        replay(producer, to_item_upserts(ds), events)
    result = run_pipeline(plum_config, until_caught_up=True, quiet=True)
    assert result.events_applied == 4000
    assert result.items_upserted == len(ds.items)
    assert_landed_exactly_once(plum_config, store, events)
    first = events[0]
    meta = store.read_online("item_metadata", [first.item_id])
    assert meta["title"][0] == ds.items.set_index("item_id").loc[first.item_id, "title"]
    stats = store.read_online("item_stats", [first.item_id])
    assert stats["event_count"][0] == sum(e.item_id == first.item_id for e in events)
    # The offline store got the same values: point-in-time retrieval after each user's last event.
    expected = expected_histories(events)
    users = sorted(expected)[:25]
    last_time = {e.user_id: e.event_time for e in events}
    entity = pd.DataFrame({"user_id": users, "event_timestamp": [last_time[u] for u in users]})
    offline = store.historical_features(entity, ["user_history:event_count"]).set_index("user_id")
    assert {u: int(offline.loc[u, "event_count"]) for u in users} == {u: expected[u][1] for u in users}
    pairs = PipelineStateStore(plum_config.paths.pipeline_state_db).cooccurrence()
    assert pairs and all(a < b and n >= 1 for a, b, n in pairs)
    # Standard tools see where it is: the consumer group holds every partition's final read position
    # (commits are throttled to one a second during the run, and the last one is made at its end).
    positions = PipelineStateStore(plum_config.paths.pipeline_state_db).read_positions()
    group = make_consumer(plum_config.kafka, group_id=plum_config.pipeline.consumer_group)
    try:
        for topic, partitions in ((plum_config.kafka.events_topic, 4), (plum_config.kafka.items_topic, 1)):
            committed = {p: group.committed(TopicPartition(topic, p)) for p in range(partitions)}
            assert committed == {p: positions[(topic, p)] for p in range(partitions)}, topic
    finally:
        group.close()


@ON_BOTH_BROKERS
def test_events_delivered_twice_count_once(plum_config):
    store = prepare(plum_config)
    events = synthetic_events(600)
    with EventProducer(plum_config.kafka) as producer:
        producer.send_events(events)
        producer.send_events(events[:250])  # a producer retry storm
    run_pipeline(plum_config, until_caught_up=True, quiet=True)
    with EventProducer(plum_config.kafka) as producer:
        producer.send_events(events[100:300])  # and a later replay
    second = run_pipeline(plum_config, until_caught_up=True, quiet=True)
    assert second.events_applied == 0 and second.events_duplicate == 200
    assert_landed_exactly_once(plum_config, store, events)


BAD = {
    "invalid json": (b'{"event_id": "x", ', "Invalid JSON"),
    "missing field": (b'{"event_id":"m","item_id":"i","event_type":"click","event_time":"2024-01-01T00:00:00Z"}',
                      "user_id: Field required"),
    "wrong type": (b'{"event_id":"w","user_id":"u","item_id":"i","event_type":"click",'
                   b'"event_time":"2024-01-01T00:00:00Z","rating":"high"}', "rating: Input should be a valid number"),
    "naive datetime": (b'{"event_id":"n","user_id":"u","item_id":"i","event_type":"click",'
                       b'"event_time":"2024-01-01T00:00:00"}', "timezone"),
    "negative watch": (b'{"event_id":"g","user_id":"u","item_id":"i","event_type":"watch",'
                       b'"event_time":"2024-01-01T00:00:00Z","watch_seconds":-5}', "greater than or equal to 0"),
    "unknown type": (b'{"event_id":"t","user_id":"u","item_id":"i","event_type":"teleport",'
                     b'"event_time":"2024-01-01T00:00:00Z"}', "event_type"),
    "oversized": (b'{"event_id":"o","pad":"' + b"x" * 70_000 + b'"}', "exceeds the limit"),
}


@ON_BOTH_BROKERS
def test_bad_records_land_in_the_dlq_with_reasons_and_no_valid_event_is_lost(plum_config):
    store = prepare(plum_config)
    events = synthetic_events(300)
    with EventProducer(plum_config.kafka) as producer:
        for i, event in enumerate(events):
            producer.send_event(event)
            if i % 40 == 0 and i // 40 < len(BAD):
                value, _ = list(BAD.values())[i // 40]
                producer.send_raw(plum_config.kafka.events_topic, event.user_id.encode(), value)
    result = run_pipeline(plum_config, until_caught_up=True, quiet=True)
    assert result.records_rejected == len(BAD)
    dead = _dlq_records(plum_config, len(BAD))
    by_value = {r.value: dict(r.headers) for r in dead}
    for name, (value, reason) in BAD.items():
        assert value in by_value, f"{name} record missing from the DLQ (original bytes must be kept)"
        assert reason in by_value[value]["plum.dlq.reason"].decode(), name
        assert by_value[value]["plum.source.topic"].decode() == plum_config.kafka.events_topic
    assert_landed_exactly_once(plum_config, store, events)


@ON_BOTH_BROKERS
def test_an_event_older_than_the_dedup_retention_goes_to_the_dlq_and_is_not_applied(plum_config):
    cfg = plum_config.model_copy(update={"pipeline": plum_config.pipeline.model_copy(
        update={"dedup_retention_s": 3600})})
    store = prepare(cfg)
    events = synthetic_events(200)  # 200 minutes, 40 users: each user's newest event is past T0 + 2 h
    with EventProducer(cfg.kafka) as producer:
        for event in events:
            producer.send_event(event)
    run_pipeline(cfg, until_caught_up=True, quiet=True)
    late = new_event("t", user_id="u0", item_id="i-late", event_type="click", event_time=T0)
    with EventProducer(cfg.kafka) as producer:
        producer.send_event(late)
        producer.send_event(events[0])  # a duplicate 3 h behind: older than the retention too
    result = run_pipeline(cfg, until_caught_up=True, quiet=True)
    assert (result.events_applied, result.events_expired, result.records_rejected) == (0, 2, 0)
    dead = _dlq_records(cfg, 2)
    assert {EngagementEvent.model_validate_json(r.value).event_id for r in dead} == {late.event_id, events[0].event_id}
    assert all("de-duplication retention" in dict(r.headers)["plum.dlq.reason"].decode() for r in dead)
    assert_landed_exactly_once(cfg, store, events)


def _dlq_records(cfg: PlumConfig, expected: int) -> list:
    consumer = make_consumer(cfg.kafka)
    tp = TopicPartition(cfg.kafka.dlq_topic, 0)
    consumer.assign([tp])
    dead: list = []
    deadline = time.monotonic() + 10
    while len(dead) < expected and time.monotonic() < deadline:
        dead.extend(consumer.poll(timeout_ms=300).get(tp, []))
    consumer.close()
    return dead


def _pipeline_process(cfg: PlumConfig, log: Path) -> subprocess.Popen:
    env = {**os.environ,
           "PLUM_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers,
           "PLUM_KAFKA__EVENTS_TOPIC": cfg.kafka.events_topic,
           "PLUM_KAFKA__ITEMS_TOPIC": cfg.kafka.items_topic,
           "PLUM_KAFKA__DLQ_TOPIC": cfg.kafka.dlq_topic,
           "PLUM_PIPELINE__POLL_MAX_RECORDS": "200"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ops.cli", "--state-dir", cfg.paths.state_dir, "pipeline"],
                                cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _applied(cfg: PlumConfig) -> int:
    if not cfg.paths.pipeline_state_db.exists():
        return 0
    return counters(cfg.paths.pipeline_state_db).get("events_applied", 0)


@ON_BOTH_BROKERS
def test_kill_9_mid_stream_then_restart_holds_every_event_exactly_once(plum_config, tmp_path):
    store = prepare(plum_config)
    events = synthetic_events(6000, users=120, items=500)
    log = tmp_path / "pipeline.log"
    with EventProducer(plum_config.kafka) as producer:
        producer.send_events(events[:3000])
    kills = 0
    for threshold in (400, 1500):  # kill twice, at different points of the stream
        process = _pipeline_process(plum_config, log)
        deadline = time.monotonic() + 120
        while _applied(plum_config) < threshold:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "pipeline made no progress"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        if kills == 1:
            with EventProducer(plum_config.kafka) as producer:
                producer.send_events(events[3000:])
    assert 0 < _applied(plum_config) < len(events)
    result = run_pipeline(plum_config, until_caught_up=True, quiet=True)
    assert result.events_applied + 1500 <= len(events)
    assert_landed_exactly_once(plum_config, store, events)
    positions = PipelineStateStore(plum_config.paths.pipeline_state_db).read_positions()
    assert sum(v for (t, _), v in positions.items() if t == plum_config.kafka.events_topic) == len(events)


def test_a_second_pipeline_on_the_same_state_is_refused(plum_config, tmp_path):
    from ingest.pipeline import PipelineBusyError, state_lock

    prepare(plum_config)
    process = _pipeline_process(plum_config, tmp_path / "p.log")
    try:
        deadline = time.monotonic() + 60
        while not plum_config.paths.pipeline_state_db.with_suffix(".lock").exists() or \
                not plum_config.paths.pipeline_state_db.with_suffix(".lock").read_text():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        with pytest.raises(PipelineBusyError, match=f"pid {process.pid}"):
            with state_lock(plum_config.paths.pipeline_state_db):
                pass
    finally:
        process.kill()
        process.wait()
    with state_lock(plum_config.paths.pipeline_state_db):  # a killed owner leaves no stale lock
        pass
