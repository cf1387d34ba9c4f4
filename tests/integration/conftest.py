"""Fixtures that start real processes: the Tansu broker (stopped also on failure)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ops.broker import EmbeddedBroker
from ops.config import PlumConfig, load_config


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One real embedded broker for the session; each test uses its own topics."""
    embedded = EmbeddedBroker(tmp_path_factory.mktemp("broker") / "broker.log")
    info = embedded.start()
    try:
        yield info
    finally:
        embedded.stop()


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
