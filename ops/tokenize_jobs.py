"""Wiring of the tokenizer for the CLI: the catalogue from Feast, co-occurrences from the pipeline's
state, SID tables under <state>/sid, item SIDs pushed to the Feast view item_sid."""

from __future__ import annotations

import re
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import pandas as pd

from features import FeatureStoreClient
from ingest.state_store import PipelineStateStore
from ops.assets import fetch_asset
from ops.config import PlumConfig
from ops.errors import PlumError

_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> float:
    """'30s', '10m', '2h', '1d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise PlumError(f"Cannot read the duration {text!r}; write a number and a unit, like 30s, 10m, 2h or 1d.")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _catalogue(store: FeatureStoreClient) -> pd.DataFrame:
    catalogue = store.latest_offline("item_metadata")
    if catalogue.empty:
        raise PlumError("The catalogue is empty: no item metadata has reached Feast yet; replay items and run "
                        "`plum pipeline` first.")
    return catalogue


def _pairs(cfg: PlumConfig) -> list[tuple[str, str, int]]:
    if not cfg.paths.pipeline_state_db.exists():
        return []
    state = PipelineStateStore(cfg.paths.pipeline_state_db)
    try:
        return state.cooccurrence()
    finally:
        state.close()


def _encoder(cfg: PlumConfig):
    from tokenizer.text_encoder import TextEncoder

    if "text" not in cfg.tokenizer.modalities:
        return None
    return TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                       cache_path=cfg.paths.state("tokenizer", "text_embeddings.db"))


def push_sids(store: FeatureStoreClient, table, item_ids: list[str]) -> None:
    """Item SIDs to the Feast view item_sid, online and offline."""
    if not item_ids:
        return
    now = pd.Timestamp(datetime.now(timezone.utc))
    frame = pd.DataFrame({
        "item_id": item_ids,
        "sid_version": [table.version] * len(item_ids),
        "sid_codes": [list(table.codes[i]) for i in item_ids],
        "sid_suffix": [table.suffix[i] for i in item_ids],
        "event_timestamp": [now] * len(item_ids),
    })
    store.write_offline("item_sid", frame, f"sid-v{table.version}-{int(now.timestamp() * 1000)}")
    store.push_online("item_sid", frame)


def fit(cfg: PlumConfig) -> None:
    """`plum tokenize fit`: train an RQ-VAE on the current catalogue and write a new SID version."""
    from tokenizer import jobs

    started = time.monotonic()
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    catalogue = _catalogue(store)
    pairs = _pairs(cfg)
    click.echo(f"tokenize: fitting on {len(catalogue):,} items and {len(pairs):,} co-occurring pairs")
    table, changed = jobs.fit(cfg.paths.sid_dir, catalogue, pairs, _encoder(cfg), cfg.tokenizer, say=click.echo)
    push_sids(store, table, sorted(table.codes))
    m = table.metrics
    click.echo(f"tokenize: wrote SID version {table.version} ({cfg.paths.sid_dir / str(table.version)}): "
               f"uniqueness before suffix {m['uniqueness_before_suffix']:.3f}, largest collision group "
               f"{m['largest_collision_group']}, level utilisation "
               + "/".join(f"{lv['utilisation']:.2f}" for lv in m["levels"]))
    if changed is not None:
        click.echo(f"tokenize: {changed:,} items have a different SID than in version {table.parent_version}")
    click.echo(f"tokenize: done in {time.monotonic() - started:.0f} s")


def assign(cfg: PlumConfig, every: str | None = None) -> None:
    """`plum tokenize assign`: SIDs for new items with the frozen model, once or every DURATION."""
    from tokenizer import jobs
    from tokenizer.sid_table import load_table

    interval = parse_duration(every) if every else None
    if interval is not None and threading.current_thread() is threading.main_thread():
        # Explicit handlers: a process started in the background inherits SIGINT ignored, and
        # SIGTERM (what service managers send) should stop the loop the same way.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    encoder = _encoder(cfg)
    try:
        while True:
            added = jobs.assign(cfg.paths.sid_dir, _catalogue(store), encoder, say=click.echo)
            if added:
                push_sids(store, load_table(cfg.paths.sid_dir), added)
            if interval is None:
                return
            time.sleep(interval)
    except KeyboardInterrupt:  # the periodic form runs until Ctrl-C; the last pass is complete or not written
        click.echo("tokenize: stopped")
