"""The embedded stack: the broker process, the topics and the applied Feast repo, in a state dir.

`up` is idempotent: a broker already recorded and alive is reused. Any other command resolves
`kafka.bootstrap_servers: embedded` to the address `up` recorded. `kafka.broker` picks the
embedded broker (ops/broker.py): Apache Kafka (log in <state>/kafka) or Tansu (log in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ingest.state_store import PipelineStateStore
from ingest.kafka_clients import ensure_topics, probe
from ops.broker import ApacheKafkaBroker, BrokerInfo, EmbeddedBroker, KAFKA_STOP_TIMEOUT_S, stop_process
from ops.config import PlumConfig
from ops.errors import StackError


@dataclass
class StackState:
    config: PlumConfig
    broker: BrokerInfo | None
    topics: dict[str, int]


def resolve(cfg: PlumConfig) -> PlumConfig:
    """The config with an 'embedded' Kafka address replaced by the running embedded broker's."""
    if not cfg.kafka.is_embedded:
        return cfg
    info = BrokerInfo.load(cfg.paths.stack_file)
    if info is None or not info.is_running():
        raise StackError(
            f"No embedded broker is running for state directory {cfg.paths.state_dir}; run `plum stack up` "
            "(or set kafka.bootstrap_servers to a Kafka cluster)."
        )
    return cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"bootstrap_servers": info.bootstrap_servers})})


BROKER_NAMES = {"tansu": "Tansu", "apache-kafka": "Apache Kafka"}


def embedded_broker(cfg: PlumConfig, port: int | None = None,
                    say: Callable[[str], None] = print) -> EmbeddedBroker | ApacheKafkaBroker:
    """The embedded broker kafka.broker names, with its log file (and data directory) in the state dir."""
    log_file = cfg.paths.state("logs", "broker.log")
    if cfg.kafka.broker == "apache-kafka":
        return ApacheKafkaBroker(log_file, cfg.paths.state("kafka"), Path(cfg.paths.cache_dir), port=port,
                                 heap_mb=cfg.kafka.broker_heap_mb, say=say)
    return EmbeddedBroker(log_file, port=port)


def up(cfg: PlumConfig, port: int | None = None, detach: bool = True,
       say: Callable[[str], None] = print) -> StackState:
    """Start (or reuse) the broker, create topics, apply the Feast repo."""
    from features import FeatureStoreClient  # here, not at the top: importing Feast takes seconds

    broker = None
    if cfg.kafka.is_embedded:
        broker = BrokerInfo.load(cfg.paths.stack_file)
        if broker is not None and broker.is_running():
            if broker.kind != cfg.kafka.broker:
                raise StackError(
                    f"a {BROKER_NAMES.get(broker.kind, broker.kind)} broker is already running for state directory "
                    f"{cfg.paths.state_dir} (pid {broker.pid}) but kafka.broker is {cfg.kafka.broker}; run "
                    "`plum stack down` first to switch brokers (or set kafka.broker back).")
            say(f"broker: reusing the embedded broker at {broker.bootstrap_servers} (pid {broker.pid})")
        else:
            broker = embedded_broker(cfg, port=port, say=say).start(detach=detach)
            broker.save(cfg.paths.stack_file)
            if broker.kind == "tansu":
                _new_epochs_for_an_empty_log(cfg, say)
            kept = f", log kept in {broker.data_dir}" if broker.data_dir else ", topics in memory"
            say(f"broker: started {BROKER_NAMES[broker.kind]} at {broker.bootstrap_servers} (pid {broker.pid}, "
                f"broker log file {broker.log_file}{kept})")
    resolved = resolve(cfg)
    probe(resolved.kafka)
    topics = ensure_topics(resolved.kafka)
    say("topics: " + ", ".join(f"{t} ({n} partitions)" for t, n in topics.items()))
    client = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    client.apply()
    say(f"feast: applied repo at {cfg.feast_repo_dir} (online store: {cfg.feast.online_store.type})")
    return StackState(resolved, broker, topics)


def _new_epochs_for_an_empty_log(cfg: PlumConfig, say: Callable[[str], None]) -> None:
    """An in-memory broker starts with empty topics: the partitions the pipeline read start a new epoch."""
    store = PipelineStateStore(cfg.paths.pipeline_state_db)
    try:
        epochs = store.start_new_epochs()
    finally:
        store.close()
    if epochs:
        say(f"pipeline: a new in-memory broker has empty topics; {len(epochs)} partition(s) start a new "
            f"log epoch (up to {max(epochs.values())}), read from offset 0 (batch names carry the epoch, "
            "so no published file is replaced; de-duplication by event id keeps the state exactly-once)")


def down(cfg: PlumConfig, say: Callable[[str], None] = print) -> bool:
    """Stop the embedded broker if one is recorded; True when one was stopped."""
    info = BrokerInfo.load(cfg.paths.stack_file)
    if info is None:
        say("broker: none recorded; nothing to stop")
        return False
    stop_process(info.pid, timeout=KAFKA_STOP_TIMEOUT_S if info.kind == "apache-kafka" else 10.0)
    cfg.paths.stack_file.unlink(missing_ok=True)
    kept = (f"its log is kept in {info.data_dir}; `plum stack up` starts from it" if info.data_dir
            else "its in-memory topics are gone")
    say(f"broker: stopped {BROKER_NAMES.get(info.kind, info.kind)} pid {info.pid} ({kept})")
    return True
