"""The main job on the embedded default: stack up, stream a real data set through ingestion,
print what landed, shut down cleanly. Runs in its own state directory, wiped at the start."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import click

from features import FeatureStoreClient
from ingest.pipeline import counters
from ingest.producer import EventProducer
from ingest.training_log import read_training_log
from ops.broker import EmbeddedBroker
from ops.config import PlumConfig
from ops.ingest_jobs import replay_dataset, run_pipeline
from ops.stack import up
from ops.status import dlq_reasons

# A few malformed records, so the run shows the dead-letter path working next to the good data.
BAD_RECORDS = [
    b'{"not json',
    b'{"schema_version":1,"event_id":"bad-1","user_id":"u","item_id":"i","event_type":"click",'
    b'"event_time":"2020-01-01T00:00:00"}',
    b'{"schema_version":1,"event_id":"bad-2","user_id":"u","item_id":"i","event_type":"teleport",'
    b'"event_time":"2020-01-01T00:00:00Z"}',
]


def run(cfg: PlumConfig, dataset: str = "movielens-100k", limit: int | None = None, keep_up: bool = False) -> None:
    """Run the main job and print a summary of what landed where."""
    started = time.monotonic()
    state = cfg.paths.state("demo")
    shutil.rmtree(state, ignore_errors=True)
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": str(state)})})
    click.echo(f"== PLUM-stream main job: {dataset} through Kafka -> Beam -> Feast (state in {state})")
    broker = None
    try:
        if cfg.kafka.is_embedded:
            # Started here rather than by `up` so that this process owns it and stops it.
            broker = EmbeddedBroker(cfg.paths.state("logs", "broker.log"))
            broker.start(detach=keep_up).save(cfg.paths.stack_file)
        cfg = up(cfg, say=click.echo).config
        replay_dataset(cfg, dataset, limit=limit)
        with EventProducer(cfg.kafka) as producer:
            for value in BAD_RECORDS:
                producer.send_raw(cfg.kafka.events_topic, b"demo", value)
        click.echo(f"replay: also sent {len(BAD_RECORDS)} malformed records (they must end in the DLQ)")
        run_pipeline(cfg, until_caught_up=True)
        summarise(cfg)
    finally:
        if broker is not None and not keep_up:
            broker.stop()
            cfg.paths.stack_file.unlink(missing_ok=True)
            click.echo("broker: stopped")
    click.echo(f"== done in {time.monotonic() - started:.0f} s")


def summarise(cfg: PlumConfig) -> None:
    totals = counters(cfg.paths.pipeline_state_db)
    log = read_training_log(cfg.paths.training_log_dir)
    hours = log["event_time"].dt.floor("h").nunique() if len(log) else 0
    click.echo("\n-- what landed")
    click.echo(f"events applied: {totals.get('events_applied', 0):,}   duplicates ignored: "
               f"{totals.get('events_duplicate', 0):,}   item upserts: {totals.get('items_upserted', 0):,}   "
               f"dead-lettered: {totals.get('records_rejected', 0):,}")
    click.echo(f"training log: {len(log):,} events in {hours:,} event hours, "
               f"{log['event_id'].nunique() if len(log) else 0:,} distinct event ids ({cfg.paths.training_log_dir})")
    for reason, n in Counter(dlq_reasons(cfg)).most_common(5):
        click.echo(f"DLQ: {n} x {reason}")
    if not len(log):
        return
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    top_users = log["user_id"].value_counts().index[:3].tolist()
    histories = store.read_online("user_history", top_users)
    item_ids = sorted({i for items in histories["history_item_ids"] for i in (items or [])[-5:]})
    titles = dict(zip(item_ids, store.read_online("item_metadata", item_ids)["title"]))
    click.echo("online store (Feast), the three most active users:")
    for row in histories.itertuples():
        last = [titles.get(i) or i for i in (row.history_item_ids or [])[-3:]]
        click.echo(f"  user {row.user_id}: {row.event_count} events; latest: {'; '.join(last)}")
    top_items = log["item_id"].value_counts().index[:3].tolist()
    stats = store.read_online("item_stats", top_items)
    meta = dict(zip(top_items, store.read_online("item_metadata", top_items)["title"]))
    click.echo("online store (Feast), the three most engaged items:")
    for row in stats.itertuples():
        click.echo(f"  {meta.get(row.item_id) or row.item_id}: {row.event_count} events, "
                   f"mean reward {row.mean_reward:.2f}")
