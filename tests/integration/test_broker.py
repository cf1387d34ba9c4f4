import pytest

from ingest.config import KafkaConfig
from ingest.kafka_clients import KafkaUnavailableError, ensure_topics, probe
from ops.broker import EmbeddedBroker, port_is_open
from ops.errors import StackError

pytestmark = pytest.mark.integration


def test_broker_starts_creates_topics_and_stops_cleanly(tmp_path):
    broker = EmbeddedBroker(tmp_path / "broker.log")
    info = broker.start()
    try:
        assert port_is_open(info.host, info.port)
        kafka = KafkaConfig(bootstrap_servers=info.bootstrap_servers)
        assert ensure_topics(kafka) == {"plum.events": 4, "plum.items": 1, "plum.events.dlq": 1}
        assert ensure_topics(kafka)["plum.events"] == 4  # idempotent
    finally:
        broker.stop()
    assert not port_is_open(info.host, info.port)
    assert broker.process is None


def test_port_in_use_is_a_clear_error(tmp_path, broker):
    with pytest.raises(StackError, match=f"Port {broker.port} .* already in use"):
        EmbeddedBroker(tmp_path / "b.log", port=broker.port).start()


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-such-tansu"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match="Tansu"):
        EmbeddedBroker(tmp_path / "b.log").start()


def test_unreachable_kafka_fails_fast_with_the_address():
    with pytest.raises(KafkaUnavailableError, match="127.0.0.1:1"):
        probe(KafkaConfig(bootstrap_servers="127.0.0.1:1"), timeout=1)
