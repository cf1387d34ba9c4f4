"""What the main job prints: numbered stages with their durations, users' top-10 next to what they
watched, and the closing summary, whose every figure is read back from the run's state (the pipeline's
counters, the dead-letter topic, the SID table, the promoted version's manifest, the audit entry) or
measured by the run itself (the latency of the queries it made)."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import click
import numpy as np
import pandas as pd

from features import FeatureStoreClient
from ingest.pipeline import counters
from ops.config import PlumConfig
from ops.status import dlq_reasons

STAGES = 10
WATCHED = 5  # latest items shown next to a user's top-10


class Progress:
    """Numbered stages with their durations."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.number = 0
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> str:
        return duration(time.monotonic() - self.started)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.number += 1
        click.echo(f"\n[{self.number}/{STAGES}] {name}: {what}  (at {self.elapsed()})")
        started = time.monotonic()
        yield
        self.seconds[name] = time.monotonic() - started
        click.echo(f"[{self.number}/{STAGES}] {name} done in {duration(self.seconds[name])}")


def duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def figure(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def print_recommendations(store: FeatureStoreClient, version: int, histories: pd.DataFrame,
                          results: dict[str, list[Any]]) -> None:
    """Each user's latest items (Feast user_history, what the server's prompt was built from) and the
    top-10 the version returned, with titles from Feast item_metadata."""
    ids = sorted({r.item_id for items in results.values() for r in items}
                 | {i for items in histories["history_item_ids"] for i in (items or [])[-WATCHED:]})
    titles = {i: t for i, t in zip(ids, store.read_online("item_metadata", ids)["title"]) if t}
    for row in histories.itertuples():
        watched = [_short(titles.get(i, i)) for i in (row.history_item_ids or [])[-WATCHED:]]
        click.echo(f"\nuser {row.user_id}: {row.event_count} events; watched last: {' | '.join(watched)}")
        click.echo(f"  top-10 from version {version}:")
        for rank, item in enumerate(results[row.user_id], 1):
            sid = "-".join(str(c) for c in item.sid)
            click.echo(f"  {rank:2d}. {_short(titles.get(item.item_id, item.item_id), 48):48s}  SID {sid:16s} "
                       f"score {item.score:.2f}")


def summary(cfg: PlumConfig, progress: Progress, history: int, live: int, version: int, manifest: dict[str, Any],
            entry: dict[str, Any], latencies: list[float], answered: set[int]) -> None:
    from tokenizer.sid_table import load_table

    totals = counters(cfg.paths.pipeline_state_db)
    reasons = Counter(dlq_reasons(cfg))
    table = load_table(cfg.paths.sid_dir)
    evaluation = manifest.get("eval") or {}
    ms = np.array(latencies) * 1000
    n_items = len(table.codes)
    rows = [
        ("events ingested", f"{totals.get('events_applied', 0):,} applied to Feast and the training log "
                            f"({history:,} history + {live:,} live), {totals.get('events_duplicate', 0):,} duplicates "
                            f"ignored, {totals.get('items_upserted', 0):,} item upserts"),
        ("dead-letter queue", f"{totals.get('records_rejected', 0):,} records rejected by the pipeline; "
                              f"{sum(reasons.values()):,} on {cfg.kafka.dlq_topic}: "
                              + "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))),
        ("SID uniqueness", f"{table.metrics['uniqueness_before_suffix']:.3f} before the collision suffix (SID version "
                           f"{table.version}, {n_items:,} items, codebooks "
                           f"{'/'.join(str(c) for c in table.codebook_sizes)})"),
        ("Recall@10", f"{figure(evaluation.get('recall@10'))} (NDCG@10 {figure(evaluation.get('ndcg@10'))}) of version "
                      f"{version}, from its manifest: {evaluation.get('examples')} held-out live events, each live "
                      "user's newest at the checkpoint, which the version had not trained on (the user's earlier events "
                      f"as the prompt, constrained beam search over all {n_items:,} items, items already rated "
                      f"excluded); a random top-10 would hit about {10 / max(n_items, 1):.3f}"),
        ("promotion", f"version {version} -> label 'stable' (gates "
                      + ", ".join(f"{g['name']} {'passed' if g['passed'] else 'FAILED'}" for g in entry["gates"])
                      + f"; audit log {cfg.paths.model_dir / 'audit.jsonl'})"),
        ("serving latency", f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, max "
                            f"{ms.max():.1f} ms (the first call {ms[0]:.1f} ms) over {len(ms)} Predict calls made "
                            f"above (gRPC, one user each, top-10, beam {cfg.serving.beam_width}, one at a time, "
                            f"answered by version {'/'.join(map(str, sorted(answered)))}, trainer stopped)"),
        ("wall time", f"{progress.elapsed()} ("
                      + ", ".join(f"{name} {duration(s)}" for name, s in progress.seconds.items()) + ")"),
    ]
    click.echo(f"\n== summary (state in {cfg.paths.state_dir})")
    for name, text in rows:
        click.echo(f"{name:18s} {text}")
