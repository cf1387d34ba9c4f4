"""The pipeline with its state in the runner (Beam keyed state) gives what the embedded backend
gives from the same input: the online store, the offline store, the training log and the DLQ.

Both read the same topics of a real broker and write to their own Feast repo, training log and
dead-letter topic. The runner-state graph runs on the streaming DirectRunner and on Prism, Beam's
portable runner (the pinned binary; its state lives in the runner, behind the Fn API, as on
Flink)."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pandas as pd
import pytest
from kafka import TopicPartition

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.events import EngagementEvent
from ingest.kafka_clients import end_offsets, ensure_topics, make_consumer, topic_partitions
from ingest.kafka_source import PartitionSpec
from ingest.pipeline import build_with_runner_state, log_ends, pipeline_options
from ingest.producer import EventProducer
from ingest.replay import replay
from ingest.training_log import read_training_log
from ops.assets import prism_binary
from ops.config import PlumConfig
from ops.datasets import load_dataset
from ops.ingest_jobs import run_pipeline, sink_settings

pytestmark = pytest.mark.integration

BAD_RECORDS = [b'{"event_id": "x", ', b'{"event_id":"m","item_id":"i","event_type":"click"}', b"\xff\xfe"]
USER_VIEWS = ("user_history",)
ITEM_VIEWS = ("item_stats", "item_metadata")


def _beside(cfg: PlumConfig, tmp_path: Path) -> PlumConfig:
    """The same topics, its own state directory and dead-letter topic."""
    return cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": tmp_path / "runner-state"}),
        "kafka": cfg.kafka.model_copy(update={"dlq_topic": cfg.kafka.dlq_topic + ".runner"}),
    })


def _read_topic(cfg: PlumConfig, topic: str) -> list:
    """Every record of a topic, to the ends its partitions have now."""
    count = topic_partitions(cfg.kafka, [topic])[topic]
    ends = end_offsets(cfg.kafka, topic, count)
    consumer = make_consumer(cfg.kafka)
    parts = [TopicPartition(topic, p) for p in range(count)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    records: list = []
    while any(consumer.position(tp) < ends[tp.partition] for tp in parts):
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def _dead_letters(cfg: PlumConfig) -> list[tuple[bytes, str]]:
    return sorted((r.value, dict(r.headers)["plum.dlq.reason"].decode()) for r in _read_topic(cfg, cfg.kafka.dlq_topic))


def _offsets_by_event_id(cfg: PlumConfig) -> dict[str, set[int]]:
    """Where each event of the events topic was delivered (twice for a duplicate)."""
    offsets: dict[str, set[int]] = {}
    for record in _read_topic(cfg, cfg.kafka.events_topic):
        try:
            offsets.setdefault(json.loads(record.value)["event_id"], set()).add(record.offset)
        except (ValueError, KeyError):
            pass  # the bad records
    return offsets


def _online(cfg: PlumConfig, view: str, ids: list[str]) -> pd.DataFrame:
    frame = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).read_online(view, ids)
    return frame.map(lambda v: tuple(v) if isinstance(v, list) else v)


def _latest_offline(cfg: PlumConfig, view: str) -> pd.DataFrame:
    """The newest offline row of every entity. Two batches touching an item may be folded in
    either order and stamp their rows with the same last event time, so an item's newest row is
    the one with the most events (its running stats only grow)."""
    client = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    if view == "item_stats":
        rows = client.offline_rows(view).sort_values(["event_count", "event_timestamp"], kind="stable")
        frame = rows.drop_duplicates("item_id", keep="last")
    else:
        frame = client.latest_offline(view)
    frame = frame.sort_values(frame.columns[0]).reset_index(drop=True).drop(columns=["mean_reward"], errors="ignore")
    return frame.map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)


def _log(cfg: PlumConfig) -> pd.DataFrame:
    log = read_training_log(cfg.paths.training_log_dir).drop(columns=["event_hour"], errors="ignore")
    return log.sort_values("event_id").reset_index(drop=True)


@pytest.mark.parametrize("runner", ["DirectRunner", "PrismRunner"])
def test_runner_owned_state_gives_the_embedded_outputs(plum_config, tmp_path, runner):
    # Duplicates arrive after every original, so the outcome does not hang on where polls cut the
    # batches; the retention is long enough that none is too old to be told from a duplicate.
    embedded = plum_config.model_copy(update={"pipeline": plum_config.pipeline.model_copy(
        update={"dedup_retention_s": 10 * 365 * 86400})})
    owned = _beside(embedded, tmp_path)
    for cfg in (embedded, owned):
        ensure_topics(cfg.kafka)
        FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).apply()
    ds = load_dataset("movielens-100k", embedded.paths.data_dir, embedded.paths.cache_dir)
    events: list[EngagementEvent] = list(to_events(ds))[:3000]
    with EventProducer(embedded.kafka) as producer:
        replay(producer, to_item_upserts(ds), events)
        producer.send_events(events[1000:1400])  # delivered twice
        for value in BAD_RECORDS:
            producer.send_raw(embedded.kafka.events_topic, b"u-bad", value)
    result = run_pipeline(embedded, until_caught_up=True, quiet=True)
    assert (result.events_applied, result.events_duplicate, result.records_rejected) == (3000, 400, 3)

    settings = sink_settings(owned, quiet=True)
    specs = [PartitionSpec(topic, partition, 0, True) for topic, partition in sorted(log_ends(settings.kafka))]
    extra = ([f"--prism_location={prism_binary(owned.paths.cache_dir)}", "--environment_type=LOOPBACK"]
             if runner == "PrismRunner" else [])
    with beam.Pipeline(options=pipeline_options(runner, streaming=True, extra_args=extra)) as pipeline:
        build_with_runner_state(pipeline, settings, specs)

    # Beam orders nothing between bundles: of an event delivered twice, the copy the runner hands
    # the user's fold first is applied (on Flink, whose channels keep a partition's order, the first
    # in the log), so its row may carry either copy's offset; everything else is equal.
    log, expected = _log(owned), _log(embedded)
    pd.testing.assert_frame_equal(log.drop(columns="kafka_offset"), expected.drop(columns="kafka_offset"))
    copies = _offsets_by_event_id(embedded)
    assert all(offset in copies[event_id] for event_id, offset in zip(log.event_id, log.kafka_offset))
    assert sum(len(offsets) == 2 for offsets in copies.values()) == 400 and len(log) == 3000
    users = sorted({e.user_id for e in events})
    items = sorted(ds.items["item_id"])
    for view, ids in [*((v, users) for v in USER_VIEWS), *((v, items) for v in ITEM_VIEWS)]:
        a, b = _online(owned, view, ids), _online(embedded, view, ids)
        if view == "item_stats":  # a float sum merged in another grouping may differ in its last bits
            pd.testing.assert_series_equal(a.pop("mean_reward").astype(float), b.pop("mean_reward").astype(float))
        pd.testing.assert_frame_equal(a, b, obj=view)
    for view in (*USER_VIEWS, *ITEM_VIEWS):
        a, b = (_latest_offline(cfg, view) for cfg in (owned, embedded))
        pd.testing.assert_frame_equal(a, b, obj=f"offline {view}")
    dead = _dead_letters(owned)
    assert dead == _dead_letters(embedded) and len(dead) == 3
