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
from tests.support.brokers import ON_BOTH_BROKERS

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


@ON_BOTH_BROKERS
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


def run_plum(args, state_dir, timeout=300, **settings):
    env = {**os.environ, "PLUM_PIPELINE__POLL_MAX_RECORDS": "1000", **settings}
    result = subprocess.run([sys.executable, "-m", "ops.cli", "--state-dir", str(state_dir), *args],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return result.returncode, result.stdout + result.stderr


def test_stack_up_replay_pipeline_down_through_the_cli(tmp_path):
    """The user's path on Tansu (kafka.broker tansu); Apache Kafka's is the next test."""
    state = tmp_path / "state"
    tansu = {"PLUM_KAFKA__BROKER": "tansu"}
    try:
        code, out = run_plum(["stack", "up"], state, **tansu)
        assert code == 0, out
        assert "plum.events (4 partitions)" in out
        code, out = run_plum(["stack", "up"], state, **tansu)  # idempotent: reuses the broker
        assert code == 0 and "reusing the embedded broker" in out, out
        code, out = run_plum(["stack", "up"], state)  # the default broker is another kind: refused, not mixed
        assert code == 4 and "a Tansu broker is already running" in out and "Traceback" not in out, out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "1500"], state, **tansu)
        assert code == 0, out
        assert "sent 1682 items and 1500 events" in out
        code, out = run_plum(["pipeline", "--until-caught-up"], state, **tansu)
        assert code == 0, out
        assert "applied 1500 events" in out and "1682 item upserts" in out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "1500", "--speed", "0"], state, **tansu)
        assert code == 2 and "error: --speed must be a positive" in out
    finally:
        code, out = run_plum(["stack", "down"], state, **tansu)
    assert code == 0 and "stopped Tansu pid" in out and "in-memory topics are gone" in out, out
    code, out = run_plum(["pipeline", "--until-caught-up"], state, **tansu)
    assert code == 4 and "run `plum stack up`" in out and "Traceback" not in out


def _end_offsets(state, topic):
    from ingest.config import KafkaConfig
    from ingest.kafka_clients import end_offsets
    from ops.broker import BrokerInfo

    info = BrokerInfo.load(state / "stack.json")
    return sum(end_offsets(KafkaConfig(bootstrap_servers=info.bootstrap_servers), topic, 4).values())


def test_apache_kafka_keeps_every_event_across_stack_down_up_and_a_kill_9(tmp_path):
    """kafka.broker apache-kafka: the log outlives the broker process, and the pipeline resumes where it was."""
    import json
    import signal

    state = tmp_path / "state"
    kafka = {"PLUM_KAFKA__BROKER": "apache-kafka"}
    try:
        code, out = run_plum(["stack", "up"], state, **kafka)
        assert code == 0 and "started Apache Kafka" in out and "formatting a new Apache Kafka log" in out, out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "1500"], state, **kafka)
        assert code == 0 and "sent 1682 items and 1500 events" in out, out
        code, out = run_plum(["pipeline", "--until-caught-up"], state, **kafka)
        assert code == 0 and "applied 1500 events" in out, out

        code, out = run_plum(["stack", "down"], state, **kafka)
        assert code == 0 and "stopped Apache Kafka" in out and "log is kept" in out, out
        code, out = run_plum(["stack", "up"], state, **kafka)
        assert code == 0 and "started Apache Kafka" in out and "formatting" not in out, out
        assert _end_offsets(state, "plum.events") == 1500  # every event is still in the log
        code, out = run_plum(["pipeline", "--until-caught-up"], state, **kafka)
        assert code == 0 and "applied 0 events (0 duplicates ignored)" in out, out  # resumes at the end

        pid = json.loads((state / "stack.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        code, out = run_plum(["stack", "up"], state, **kafka)  # the recorded broker is dead: a new one, same log
        assert code == 0 and "started Apache Kafka" in out, out
        code, out = run_plum(["replay", "movielens-100k", "--limit", "2000"], state, **kafka)
        assert code == 0, out
        assert _end_offsets(state, "plum.events") == 3500
        code, out = run_plum(["pipeline", "--until-caught-up"], state, **kafka)
        # Read from where it was: the 1,500 resent events are duplicates, the next 500 are new.
        assert code == 0 and "applied 500 events (1500 duplicates ignored)" in out, out
    finally:
        code, out = run_plum(["stack", "down"], state, **kafka)
    from ingest.training_log import read_training_log

    log = read_training_log(state / "training_log")
    assert len(log) == log["event_id"].nunique() == 2000


def test_apache_kafka_without_java_is_a_clear_error(tmp_path):
    code, out = run_plum(["stack", "up"], tmp_path / "state", PLUM_KAFKA__BROKER="apache-kafka",
                         JAVA_HOME=str(tmp_path / "no-java"), PATH=str(tmp_path))
    assert code != 0 and "needs Java 17 or newer, and no java was found" in out and "Traceback" not in out, out
