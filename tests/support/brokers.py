"""Run an integration test on each embedded broker: Apache Kafka (the default) and Tansu."""

from __future__ import annotations

import pytest

BROKER_KINDS = ("tansu", "apache-kafka")

# The `broker` fixture (tests/integration/conftest.py) takes the kind as its parameter.
ON_BOTH_BROKERS = pytest.mark.parametrize("broker", BROKER_KINDS, indirect=True)
