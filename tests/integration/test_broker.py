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


def test_end_offsets_count_every_record_even_in_one_large_batch(plum_config):
    from ingest.kafka_clients import end_offsets, make_producer

    kafka = plum_config.kafka
    ensure_topics(kafka)
    producer = make_producer(kafka, linger_ms=50)
    for i in range(500):  # lingering makes these few large batches per partition
        producer.send(kafka.events_topic, key=f"user-{i % 7}".encode(), value=b"x", partition=i % 2)
    producer.flush()
    producer.close()
    assert end_offsets(kafka, kafka.events_topic, 4) == {0: 250, 1: 250, 2: 0, 3: 0}


def test_producer_reports_records_the_broker_never_acknowledged(tmp_path):
    from ingest.producer import DeliveryError, EventProducer

    broker = EmbeddedBroker(tmp_path / "broker.log")
    info = broker.start()
    kafka = KafkaConfig(bootstrap_servers=info.bootstrap_servers)
    ensure_topics(kafka)
    producer = EventProducer(kafka, retries=1, request_timeout_ms=1000, reconnect_backoff_max_ms=200)
    producer.send_raw(kafka.events_topic, b"k", b"before")
    producer.flush()
    broker.stop()
    producer.send_raw(kafka.events_topic, b"k", b"lost")
    with pytest.raises(DeliveryError):
        producer.close(timeout=2)
