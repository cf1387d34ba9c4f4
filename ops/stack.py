"""The embedded stack: the broker process, the topics and the applied Feast repo, in a state dir.

`up` is idempotent: a broker already recorded and alive is reused. Any other command resolves
`kafka.bootstrap_servers: embedded` to the address `up` recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ingest.state_store import PipelineStateStore
from ingest.kafka_clients import ensure_topics, probe
from ops.broker import BrokerInfo, EmbeddedBroker, stop_process
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


def up(cfg: PlumConfig, port: int | None = None, detach: bool = True,
       say: Callable[[str], None] = print) -> StackState:
    """Start (or reuse) the broker, create topics, apply the Feast repo."""
    from features import FeatureStoreClient  # here, not at the top: importing Feast takes seconds

    broker = None
    if cfg.kafka.is_embedded:
        broker = BrokerInfo.load(cfg.paths.stack_file)
        if broker is not None and broker.is_running():
            say(f"broker: reusing the embedded broker at {broker.bootstrap_servers} (pid {broker.pid})")
        else:
            log_file = cfg.paths.state("logs", "broker.log")
            broker = EmbeddedBroker(log_file, port=port).start(detach=detach)
            broker.save(cfg.paths.stack_file)
            store = PipelineStateStore(cfg.paths.pipeline_state_db)
            try:
                epochs = store.start_new_epochs()
            finally:
                store.close()
            if epochs:
                say(f"pipeline: a new in-memory broker has empty topics; {len(epochs)} partition(s) start a new "
                    f"log epoch (up to {max(epochs.values())}), read from offset 0 (batch names carry the epoch, "
                    "so no published file is replaced; de-duplication by event id keeps the state exactly-once)")
            say(f"broker: started Tansu at {broker.bootstrap_servers} (pid {broker.pid}, log {log_file})")
    resolved = resolve(cfg)
    probe(resolved.kafka)
    topics = ensure_topics(resolved.kafka)
    say("topics: " + ", ".join(f"{t} ({n} partitions)" for t, n in topics.items()))
    client = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    client.apply()
    say(f"feast: applied repo at {cfg.feast_repo_dir} (online store: {cfg.feast.online_store.type})")
    return StackState(resolved, broker, topics)


def down(cfg: PlumConfig, say: Callable[[str], None] = print) -> bool:
    """Stop the embedded broker if one is recorded; True when one was stopped."""
    info = BrokerInfo.load(cfg.paths.stack_file)
    if info is None:
        say("broker: none recorded; nothing to stop")
        return False
    stop_process(info.pid)
    cfg.paths.stack_file.unlink(missing_ok=True)
    say(f"broker: stopped pid {info.pid} (its in-memory topics are gone)")
    return True
