"""Fixtures that start real processes: the Tansu broker and Apache Kafka (stopped also on failure).

`broker` is Apache Kafka, the embedded default, unless a test is parametrized over both brokers
(tests.support.brokers.ON_BOTH_BROKERS)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ops.broker import ApacheKafkaBroker, EmbeddedBroker
from ops.config import PlumConfig, load_config


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory):
    """One real Tansu broker for the session; each test uses its own topics."""
    with EmbeddedBroker(tmp_path_factory.mktemp("broker") / "broker.log") as info:
        yield info


@pytest.fixture(scope="session")
def apache_kafka_broker(tmp_path_factory):
    """One real Apache Kafka (KRaft, from the pinned jars) for the session; each test uses its own topics."""
    from ops.config import load_config

    folder = tmp_path_factory.mktemp("apache-kafka")
    with ApacheKafkaBroker(folder / "broker.log", folder / "data", Path(load_config(env={}).paths.cache_dir)) as info:
        yield info


@pytest.fixture(scope="session")
def broker(request):
    """The session's Apache Kafka (the default broker); a test marked with
    tests.support.brokers.ON_BOTH_BROKERS runs once on it and once on the session's Tansu."""
    kind = getattr(request, "param", "apache-kafka")
    return request.getfixturevalue("tansu_broker" if kind == "tansu" else "apache_kafka_broker")


@pytest.fixture
def plum_config(tmp_path: Path, broker) -> PlumConfig:
    """A config pointing at the session broker, with topics and state private to this test."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return load_config(env={}, overrides={
        "paths": {"state_dir": str(tmp_path / "state")},
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            "events_topic": f"{prefix}.events",
            "items_topic": f"{prefix}.items",
            "dlq_topic": f"{prefix}.events.dlq",
        },
        "pipeline": {"poll_max_records": 500},
    })
