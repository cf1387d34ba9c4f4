"""The user's path through the `plum` command, and replay pacing, against a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from kafka import TopicPartition

from ingest.events import EngagementEvent, ItemUpsert
from ingest.kafka_clients import ensure_topics, make_consumer
from ingest.producer import EventProducer, new_event
from ingest.replay import replay
from ops.config import PROJECT_ROOT

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _read_all(kafka, topic, partitions, expected):
    consumer = make_consumer(kafka)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    records = []
    deadline = time.monotonic() + 15
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def test_replay_sends_items_first_then_events_paced_by_event_time(plum_config):
    kafka = plum_config.kafka
    ensure_topics(kafka)
    events = [new_event("pace", user_id=f"u{i % 3}", item_id=f"i{i}", event_type="click",
                        event_time=T0 + timedelta(seconds=i * 10)) for i in range(21)]  # 200 s of event time
    items = [ItemUpsert(item_id=f"i{i}", title=f"item {i}") for i in range(21)]
    speed = 200.0  # 200 s of event time at 200x: about one second
    with EventProducer(kafka) as producer:
        started_ms = time.time() * 1000  # the clock the producer stamps records with
        result = replay(producer, items, events, speed=speed)
    assert (result.items, result.events) == (21, 21)
    received = _read_all(kafka, kafka.events_topic, kafka.events_partitions, 21)
    by_partition: dict[int, list[EngagementEvent]] = {}
    sent_ms = {}
    for record in received:
        event = EngagementEvent.model_validate_json(record.value)
        by_partition.setdefault(record.partition, []).append(event)
        sent_ms[event.event_id] = record.timestamp  # the producer's create time, stamped at send
    assert sorted(sent_ms) == sorted(e.event_id for e in events)
    for evs in by_partition.values():
        assert [e.event_time for e in evs] == sorted(e.event_time for e in evs)
    # Pacing, from the records' own timestamps: no event is sent before its event-time offset / speed
    # after the replay began (a slow machine only sends later, so no upper bound is asserted).
    for event in events:
        due_ms = (event.event_time - T0).total_seconds() / speed * 1000
        assert sent_ms[event.event_id] - started_ms >= due_ms - 2, (event.event_id, sent_ms[event.event_id] - started_ms)
    item_records = _read_all(kafka, kafka.items_topic, 1, 21)
    assert max(r.timestamp for r in item_records) <= min(r.timestamp for r in received)


def run_plum(args, state_dir, timeout=300):
    env = {**os.environ, "PLUM_PIPELINE__POLL_MAX_RECORDS": "1000"}
    result = subprocess.run([sys.executable, "-m", "ops.cli", "--state-dir", str(state_dir), *args],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return result.returncode, result.stdout + result.stderr


def test_stack_up_replay_pipeline_down_through_the_cli(tmp_path):
    state = tmp_path / "state"
    try:
        code, out = run_plum(["stack", "up"], state)
        assert code == 0, out
        assert "plum.events (4 partitions)" in out
        code, out = run_plum(["stack", "up"], state)  # idempotent: reuses the broker
        assert code == 0 and "reusing the embedded broker" in out, out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "1500"], state)
        assert code == 0, out
        assert "sent 1682 items and 1500 events" in out
        code, out = run_plum(["pipeline", "--until-caught-up"], state)
        assert code == 0, out
        assert "applied 1500 events" in out and "1682 item upserts" in out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "1500", "--speed", "0"], state)
        assert code == 2 and "error: --speed must be a positive" in out
    finally:
        code, out = run_plum(["stack", "down"], state)
    assert code == 0 and "stopped pid" in out, out
    code, out = run_plum(["pipeline", "--until-caught-up"], state)
    assert code == 4 and "run `plum stack up`" in out and "Traceback" not in out
