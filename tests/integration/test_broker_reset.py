"""A new embedded broker on an existing state directory: every partition's offsets restart at 0,
and the pipeline and the continuous trainer's view of the log must tell the new log from the old."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from features import FeatureStoreClient
from ingest.events import EngagementEvent, ItemUpsert
from ingest.kafka_clients import ensure_topics
from ingest.producer import EventProducer, new_event
from ingest.state_store import PipelineStateStore
from ingest.training_log import read_training_log
from ops.broker import EmbeddedBroker
from ops.config import PlumConfig, load_config
from ops.ingest_jobs import run_pipeline
from tests.integration.test_pipeline import assert_landed_exactly_once, expected_histories
from trainer.stream import Stream, covered_by

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
USERS, ITEMS = 12, 40


@pytest.fixture
def new_broker(tmp_path):
    """Starts a fresh broker of this test's own, stopping the one before (all stopped at the end)."""
    brokers: list[EmbeddedBroker] = []

    def start() -> str:
        if brokers:
            brokers[-1].stop()
        broker = EmbeddedBroker(tmp_path / f"broker-{len(brokers)}.log")
        brokers.append(broker)
        return broker.start().bootstrap_servers

    try:
        yield start
    finally:
        for broker in brokers:
            broker.stop()


def on_broker(tmp_path: Path, bootstrap_servers: str) -> PlumConfig:
    return load_config(env={}, overrides={
        "paths": {"state_dir": str(tmp_path / "state")},
        "kafka": {"bootstrap_servers": bootstrap_servers, "events_partitions": 2},
        "pipeline": {"poll_max_records": 40},
    })


def events_from(namespace: str, n: int, start_minute: int) -> list[EngagementEvent]:
    return [new_event(namespace, user_id=f"u{i % USERS}", item_id=f"i{(i * 7) % ITEMS}", event_type="rating",
                      event_time=T0 + timedelta(minutes=start_minute + i), rating=float(i % 5 + 1), rating_scale=5.0)
            for i in range(n)]


def send(cfg: PlumConfig, events: list[EngagementEvent], epoch: int) -> None:
    ensure_topics(cfg.kafka)
    with EventProducer(cfg.kafka) as producer:
        for k in range(3):
            producer.send_item(ItemUpsert(item_id=f"i{k}", title=f"item {k}, as of broker {epoch}"))
        producer.send_events(events)


def published(cfg: PlumConfig) -> dict[str, str]:
    """Every published training-log and Feast offline file: relative name -> content hash."""
    roots = [cfg.paths.training_log_dir, cfg.feast_repo_dir / "offline"]
    return {f"{root.name}/{path.relative_to(root)}": hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in root.rglob("*.parquet") if "_staging" not in path.parts}


def offline_counts(cfg: PlumConfig, view: str, key: str) -> dict[str, int]:
    """The largest event_count of each entity among a view's published offline rows."""
    frame = pd.concat(pd.read_parquet(path) for path in (cfg.feast_repo_dir / "offline" / view).glob("*.parquet"))
    return {k: int(n) for k, n in frame.groupby(key)["event_count"].max().items()}


def take_everything(stream: Stream) -> None:
    """What the continuous trainer does with fresh events: evaluate (release), then take each."""
    stream.release()
    while (event_id := stream.take_fresh()) is not None:
        stream.ledger.take(event_id, "trained")


def test_a_new_broker_on_the_same_state_loses_nothing_replaces_nothing_and_its_events_are_fresh(tmp_path, new_broker):
    cfg = on_broker(tmp_path, new_broker())
    ensure_topics(cfg.kafka)
    features = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    features.apply()
    old = events_from("old", 150, 0)
    send(cfg, old, 0)
    assert run_pipeline(cfg, until_caught_up=True, quiet=True).events_applied == 150
    stream = Stream(cfg.paths.training_log_dir)
    assert stream.poll() == 150
    take_everything(stream)
    trained = stream.watermark()  # what a checkpoint (and a CPT manifest) records
    files = published(cfg)

    # Broker 2 gets fewer records than were read from broker 1: its logs end before the read positions.
    cfg = on_broker(tmp_path, new_broker())
    second = events_from("second", 60, 1000)
    send(cfg, second, 1)
    assert run_pipeline(cfg, until_caught_up=True, quiet=True).events_applied == 60
    store = PipelineStateStore(cfg.paths.pipeline_state_db)
    assert {key: p.epoch for key, p in store.positions().items()} == {
        ("plum.events", 0): 1, ("plum.events", 1): 1, ("plum.items", 0): 1}
    store.close()
    now = published(cfg)
    assert {name: now.get(name) for name in files} == files, "a published file was replaced"
    assert len(now) > len(files)
    # The trainer reads the new files, and the new events are fresh, not covered by what it trained on
    # (their offsets are below the old ones), also for a watermark of the old shape (no epochs).
    assert stream.poll() == 60
    assert sorted(stream.pending) == sorted(e.event_id for e in second)
    for base in (trained, {"offsets": trained["offsets"]}):
        restarted = Stream(cfg.paths.training_log_dir, base)
        assert restarted.poll() == 210
        assert sorted(restarted.pending) == sorted(e.event_id for e in second)
        assert sorted(restarted.pool) == sorted(e.event_id for e in old)
    take_everything(stream)
    trained = stream.watermark()
    assert set(trained["epochs"].values()) == {1}
    files = published(cfg)

    # Broker 3 gets more records than the read positions before the pipeline starts: the logs are
    # longer than what was read, and only the record before each position tells them apart.
    cfg = on_broker(tmp_path, new_broker())
    third = events_from("third", 400, 2000)
    send(cfg, third, 2)
    assert run_pipeline(cfg, until_caught_up=True, quiet=True).events_applied == 400
    store = PipelineStateStore(cfg.paths.pipeline_state_db)
    positions = store.positions()
    store.close()
    assert {key: p.epoch for key, p in positions.items()} == {
        ("plum.events", 0): 2, ("plum.events", 1): 2, ("plum.items", 0): 2}
    assert sum(p.next_offset for (topic, _), p in positions.items() if topic == "plum.events") == 400
    now = published(cfg)
    assert {name: now.get(name) for name in files} == files, "a published file was replaced"

    everything = old + second + third
    assert_landed_exactly_once(cfg, features, everything)
    log = read_training_log(cfg.paths.training_log_dir)
    assert log["event_id"].is_unique
    epoch_of = dict(zip(log["event_id"], log["log_epoch"]))
    assert {epoch_of[e.event_id] for e in old} == {0} and {epoch_of[e.event_id] for e in second} == {1}
    assert {epoch_of[e.event_id] for e in third} == {2}
    # Offline: counts only grow batch by batch, so each entity's largest counts every event once
    # (an item's rows may share a timestamp: batches of two partitions interleave in time).
    assert offline_counts(cfg, "user_history", "user_id") == {
        user: count for user, (_, count) in expected_histories(everything).items()}
    item_counts = {item: sum(e.item_id == item for e in everything) for item in {e.item_id for e in everything}}
    assert offline_counts(cfg, "item_stats", "item_id") == item_counts
    online = features.read_online("item_stats", sorted(item_counts))
    assert dict(zip(online["item_id"], online["event_count"])) == item_counts
    assert features.read_online("item_metadata", ["i0"])["title"][0] == "item 0, as of broker 2"

    assert stream.poll() == 400
    assert sorted(stream.pending) == sorted(e.event_id for e in third)
    assert not any(covered_by(trained, stream.events[e.event_id]) for e in third)
    assert all(covered_by(trained, stream.events[e.event_id]) for e in old + second)
    restored = Stream.restore(cfg.paths.training_log_dir, stream.state())
    assert restored.poll() == 0 and restored.pending == stream.pending


def test_stack_down_and_up_of_tansu_begins_a_new_log_epoch_and_the_pipeline_reads_the_new_broker(tmp_path):
    """Tansu keeps its log in memory: `down` loses it, and the next `up` starts a new epoch. (Apache
    Kafka, the default, keeps its log: tests/integration/test_replay_and_cli.py.)"""
    from ops.stack import down, up

    cfg = load_config(env={}, overrides={"paths": {"state_dir": str(tmp_path / "state")},
                                         "kafka": {"events_partitions": 1, "broker": "tansu"}})
    said: list[str] = []
    try:
        resolved = up(cfg, say=said.append).config
        first = events_from("first", 30, 0)
        send(resolved, first, 0)
        run_pipeline(resolved, until_caught_up=True, quiet=True)
        down(cfg, say=said.append)
        resolved = up(cfg, say=said.append).config
        assert any("start a new log epoch" in line for line in said), said
        store = PipelineStateStore(cfg.paths.pipeline_state_db)
        assert {key: (p.next_offset, p.epoch) for key, p in store.positions().items()} == {
            ("plum.events", 0): (0, 1), ("plum.items", 0): (0, 1)}
        store.close()
        later = events_from("later", 20, 100)
        send(resolved, later, 1)
        assert run_pipeline(resolved, until_caught_up=True, quiet=True).events_applied == 20
        assert sorted(read_training_log(cfg.paths.training_log_dir)["event_id"]) == sorted(
            e.event_id for e in first + later)
    finally:
        down(cfg, say=said.append)
