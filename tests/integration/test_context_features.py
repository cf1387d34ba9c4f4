"""A registered context feature travels end to end: events -> pipeline -> Feast -> trainer prompt ->
exported version -> serving, with every part real (broker, Beam pipeline, Feast repo, the CLI,
the continuous trainer, orbax versions, the server's batcher reading Feast)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from features import FeatureStoreClient
from ingest.kafka_clients import ensure_topics
from ingest.producer import EventProducer
from ingest.training_log import read_training_log
from ops.config import PROJECT_ROOT, PlumConfig
from ops.ingest_jobs import run_pipeline
from ops.train_jobs import continuous_paths, registered_features
from serving.config import ServingSettings
from serving.engine import Request
from serving.server import ModelServer
from serving.user_features import OnlineUserFeatures
from serving.versions import ServingConfig, VersionPolicy
from tests.support.stream_world import user_events, write_cpt_checkpoint, write_sid_table
from trainer.config import ContinuousSettings, TrainerSettings
from trainer.continuous import ContinuousTrainer
from trainer.servable import load_version, version_numbers

pytestmark = pytest.mark.integration

USERS = 24
DEVICE = "{name: device, type: categorical, values: [tv, phone], description: the screen in use}"


def first_device(u: int) -> str:
    return "tv" if u % 2 else "phone"


def send(cfg: PlumConfig, events) -> None:
    with EventProducer(cfg.kafka) as producer:
        for event in events:
            producer.send_event(event)
    run_pipeline(cfg, until_caught_up=True, quiet=True)


def plum(cfg: PlumConfig, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--state-dir", cfg.paths.state_dir, *args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def phase(steps: int, start: int, context=lambda u: None) -> list:
    return [e.model_copy(update={"context": context(u)}) if context(u) else e
            for u in range(USERS) for e in user_events(u, steps, start_step=start)]


def test_a_registered_context_feature_travels_from_events_to_serving(plum_config):
    cfg = plum_config
    ensure_topics(cfg.kafka)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    store.apply()
    write_sid_table(cfg.paths.sid_dir)

    # Before registration: events carry a device the project does not know yet.
    send(cfg, phase(6, 0, lambda u: {"device": first_device(u)}))
    assert "user_context" not in store.views()
    log = read_training_log(cfg.paths.training_log_dir)
    watermark = {str(p): int(o) for p, o in log.groupby("kafka_partition")["kafka_offset"].max().items()}
    cpt = write_cpt_checkpoint(cfg.paths.checkpoint_dir / "cpt" / "1", watermark)
    settings = TrainerSettings(model_size="tiny", batch_size=8, warmup_steps=2, max_history=5,
                               continuous=ContinuousSettings(checkpoint_every_steps=60, checkpoint_every_s=1000,
                                                             eval_examples=40, min_eval_examples=5,
                                                             idle_after_steps=60, learning_rate=3e-3,
                                                             poll_interval_s=0.1))
    said: list[str] = []
    trainer = ContinuousTrainer(settings, continuous_paths(cfg), cpt, say=said.append,
                                feature_source=lambda: registered_features(cfg))
    send(cfg, phase(3, 6))
    trainer.run(until_drained=True)
    send(cfg, phase(1, 9))
    trainer.run(until_drained=True)
    before = version_numbers(cfg.paths.model_dir)
    assert before, said  # a version exported before the feature existed

    # Registration through the CLI; bad specs are refused with the reason, no traceback.
    bad = plum(cfg, "features", "register", "{name: device, type: categorical, buckets: [1, 2]}")
    assert bad.returncode == 2 and "a categorical feature lists its values" in bad.stderr
    assert "Traceback" not in bad.stderr
    done = plum(cfg, "features", "register", DEVICE)
    assert done.returncode == 0, done.stderr
    again = plum(cfg, "features", "register", DEVICE)
    assert again.returncode == 2 and "already registered" in again.stderr
    assert "user_context" in store.views()  # applied to the Feast registry

    # The running pipeline's next batch fills every user's latest value seen so far, then the new
    # events: users 0, 4, 8, ... switch to tv; the others send no context and keep what they had.
    switched = {u for u in range(USERS) if u % 4 == 0}
    send(cfg, phase(3, 10, lambda u: {"device": "tv"} if u in switched else None))
    expected = {f"user-{u}": "tv" if u in switched else first_device(u) for u in range(USERS)}
    online = store.read_online("user_context", sorted(expected))
    assert dict(zip(online["user_id"], online["device"])) == expected
    offline = store.latest_offline("user_context")
    assert dict(zip(offline["user_id"], offline["device"])) == expected

    # The trainer adopts it at a boundary and the next exported version's prompt schema has it.
    trainer.run(until_drained=True)
    send(cfg, phase(1, 13, lambda u: {"device": "tv"} if u in switched else None))
    trainer.run(until_drained=True)
    trainer.close()
    assert any("context features device joined the prompt" in m for m in said), said
    old, new = before[-1], version_numbers(cfg.paths.model_dir)[-1]
    assert new > old
    assert load_version(cfg.paths.model_dir, old)[1]["prompt_schema"]["features"] == []
    assert [f["name"] for f in load_version(cfg.paths.model_dir, new)[1]["prompt_schema"]["features"]] == ["device"]
    listed = json.loads(plum(cfg, "features", "list", "--json").stdout)
    assert [(f["name"], f["versions"]) for f in listed] == [("device", [v for v in version_numbers(cfg.paths.model_dir)
                                                                        if v > old])]

    # Serving: each version builds prompts from its own schema; the new one reads the stored device.
    core = ModelServer(ServingConfig("plum", cfg.paths.model_dir, VersionPolicy("specific", versions=(old, new))),
                       ServingSettings(max_batch=4), OnlineUserFeatures(store), token="t", say=lambda m: None)
    core.start()
    try:
        deadline = time.monotonic() + 120
        while set(core.manager.available()) != {old, new} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(core.manager.available()) == {old, new}, core.manager.snapshot()

        def scores(version: int, **context) -> tuple:
            [answer] = core.batcher.recommend([Request("user-2", 10, context=context)], version)
            return answer.item_ids, answer.scores

        stored = scores(new)  # user-2 sent "phone" before registration only: the backfilled value
        assert stored == scores(new, device="phone")
        assert stored != scores(new, device="tv") and stored != scores(new, device="unknown")
        assert scores(old) == scores(old, device="tv") == scores(old, device="phone")  # v1 ignores it
    finally:
        core.stop()


def test_a_running_pipeline_fills_a_feature_registered_meanwhile(plum_config):
    """One long-lived applier (as in a streaming pipeline); the registration comes from another
    client (another process): the next batch backfills and carries the feature, no restart."""
    from features.registry import ContextFeatureSpec
    from ingest.parse import ParsedBatch
    from ingest.sinks import BatchApplier
    from ops.ingest_jobs import sink_settings

    cfg = plum_config
    ensure_topics(cfg.kafka)
    FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).register_context_feature(
        ContextFeatureSpec(name="device", type="categorical", values=("tv", "phone")))
    applier = BatchApplier(sink_settings(cfg, quiet=True))
    try:
        first = [e.model_copy(update={"context": {"hour": 7 + u, "device": "tv"}})
                 for u in range(4) for e in user_events(u, 2)]
        applier.apply(ParsedBatch(cfg.kafka.events_topic, 0, 0, len(first), first, list(range(len(first))),
                                  [0] * len(first)))
        FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).register_context_feature(
            ContextFeatureSpec(name="hour", type="numeric", buckets=(6, 12, 18)))
        later = [e.model_copy(update={"context": {"hour": "late"}}) for e in user_events(4, 2)]
        applier.apply(ParsedBatch(cfg.kafka.events_topic, 0, len(first), len(first) + 2, later,
                                  list(range(len(first), len(first) + 2)), [0, 0]))
        online = applier.features.read_online("user_context", [f"user-{u}" for u in range(6)])
        # users 0-3 backfilled from the first batch; a non-number is stored as missing; user-5 unknown
        assert online["hour"].tolist() == [7.0, 8.0, 9.0, 10.0, None, None]
        assert online["device"].tolist() == ["tv"] * 4 + [None, None]
        assert list(online.columns) == ["user_id", "device", "hour"]  # only registered features are stored
        # Offline: the first batch's files grew the new column; the fill's rows win at the same event time.
        latest = applier.features.latest_offline("user_context").set_index("user_id")
        assert latest.loc[[f"user-{u}" for u in range(5)], "hour"].tolist()[:4] == [7.0, 8.0, 9.0, 10.0]
        when = pd.Timestamp("2030-01-01", tz="UTC")
        entity = pd.DataFrame({"user_id": [f"user-{u}" for u in range(5)], "event_timestamp": [when] * 5})
        past = applier.features.historical_features(entity, ["user_context:device", "user_context:hour"])
        assert past["device"].tolist() == ["tv"] * 4 + [None]
        assert past["hour"].tolist()[:4] == [7.0, 8.0, 9.0, 10.0] and pd.isna(past["hour"].iloc[4])
    finally:
        applier.close()
