"""Tokenizer jobs against real parts: catalogue and co-occurrences from a real pipeline run,
SID tables on disk, item SIDs in the Feast online store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.events import ItemUpsert
from ingest.kafka_clients import ensure_topics
from ingest.producer import EventProducer
from ingest.replay import replay
from ops.datasets import load_dataset
from ops.errors import PlumError
from ops.ingest_jobs import run_pipeline
from ops.tokenize_jobs import assign, fit, parse_duration
from tokenizer.sid_table import load_table, versions

pytestmark = pytest.mark.integration


def test_fit_then_assign_new_items_without_changing_existing_sids(plum_config):
    cfg = plum_config.model_copy(update={"tokenizer": plum_config.tokenizer.model_copy(
        update={"steps": 60, "batch_size": 128})})
    ensure_topics(cfg.kafka)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    store.apply()
    ds = load_dataset("movielens-100k", cfg.paths.data_dir, cfg.paths.cache_dir)
    items = list(to_item_upserts(ds))
    with EventProducer(cfg.kafka) as producer:
        replay(producer, items[:1500], list(to_events(ds))[:5000])
    run_pipeline(cfg, until_caught_up=True, quiet=True)

    fit(cfg)
    table = load_table(cfg.paths.sid_dir)
    assert table.version == 1 and len(table.codes) == 1500
    assert len(table.item_for_sid()) == 1500  # every SID unique with the suffix
    assert table.metrics["uniqueness_before_suffix"] > 0.5
    online = store.read_online("item_sid", [items[0].item_id])
    assert list(online["sid_codes"][0]) == list(table.codes[items[0].item_id])
    before = {i: table.sid(i) for i in table.codes}

    newcomers = items[1500:] + [ItemUpsert(item_id="brand-new", title="A brand new film", tags=["Drama"])]
    with EventProducer(cfg.kafka) as producer:
        replay(producer, newcomers, [])
    run_pipeline(cfg, until_caught_up=True, quiet=True)
    assign(cfg)
    again = load_table(cfg.paths.sid_dir)
    assert versions(cfg.paths.sid_dir) == [1]
    assert {i: again.sid(i) for i in before} == before
    assert len(again.codes) == 1500 + len(newcomers)
    assert len(again.item_for_sid()) == len(again.codes)
    assert list(store.read_online("item_sid", ["brand-new"])["sid_suffix"]) == [again.suffix["brand-new"]]

    fit(cfg)  # a refit makes version 2 and says how many SIDs moved
    refit = load_table(cfg.paths.sid_dir)
    assert refit.version == 2 and refit.parent_version == 1
    assert "sids_changed_vs_parent" in refit.metrics

    # The periodic form picks up items that arrive while it runs, and stops cleanly on Ctrl-C.
    env = {**os.environ, "PLUM_PATHS__STATE_DIR": str(cfg.paths.state_dir),
           "PLUM_PATHS__CACHE_DIR": str(cfg.paths.cache_dir)}
    periodic = subprocess.Popen([sys.executable, "-m", "ops.cli", "tokenize", "assign", "--every", "1s"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _read_until(periodic, "already covers")
        with EventProducer(cfg.kafka) as producer:
            replay(producer, [ItemUpsert(item_id="later", title="A film that came later", tags=["Comedy"])], [])
        run_pipeline(cfg, until_caught_up=True, quiet=True)
        lines += _read_until(periodic, "gave 1 new items SIDs in version 2")
        periodic.send_signal(signal.SIGINT)
        rest, _ = periodic.communicate(timeout=60)
    finally:
        periodic.kill()
    assert periodic.returncode == 0 and "tokenize: stopped" in rest and "Traceback" not in "".join(lines) + rest
    assert "later" in load_table(cfg.paths.sid_dir).codes


def _read_until(process: subprocess.Popen, text: str, timeout: float = 180.0) -> list[str]:
    """Lines of the process's output up to the first that contains `text`."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared; output: {''.join(lines)[-2000:]}")


def test_durations_and_an_empty_catalogue_are_clear(plum_config):
    assert parse_duration("10m") == 600 and parse_duration("2h") == 7200
    with pytest.raises(PlumError, match="like 30s"):
        parse_duration("ten minutes")
    FeatureStoreClient(plum_config.feast_repo_dir, plum_config.feast).apply()
    with pytest.raises(PlumError, match="catalogue is empty"):
        fit(plum_config)
