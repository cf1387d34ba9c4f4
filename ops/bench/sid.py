"""`plum bench sid`: the SID-v2 ablation on MovieLens-100K and Amazon Beauty.

Rows add one SID-v2 part at a time to SIDv1 (a plain RQ-VAE on the text embedding):
multi-resolution codebooks, progressive masking, multi-modal fusion (text + metadata +
collaborative), co-occurrence contrastive loss. Each row reports uniqueness before the suffix,
per-level utilisation, and how often co-occurring pairs share their first-level code against
random pairs. Co-occurrences come from the pipeline's own state store fed with the data set's
events, so the counts are the ones the running system would have.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from ingest.config import RewardConfig
from ingest.datasets import Dataset, to_events
from ingest.state_store import PipelineStateStore
from ops.assets import fetch_asset
from ops.bench.report import machine, update_readme_table, write_result
from ops.config import PlumConfig
from ops.datasets import load_dataset
from tokenizer.config import TokenizeSettings
from tokenizer.content import MetadataVocabulary
from tokenizer.jobs import catalogue_content, release_years, rqvae_config
from tokenizer.rqvae_train import assign_codes, train
from tokenizer.sid_table import collision_metrics
from tokenizer.text_encoder import TextEncoder

ROWS: list[tuple[str, tuple[str, ...], dict[str, bool]]] = [
    ("SIDv1 (plain RQ-VAE, text)", ("text",),
     {"multi_resolution": False, "progressive_masking": False, "fusion": False, "contrastive": False}),
    ("+ multi-resolution", ("text",),
     {"multi_resolution": True, "progressive_masking": False, "fusion": False, "contrastive": False}),
    ("+ progressive masking", ("text",),
     {"multi_resolution": True, "progressive_masking": True, "fusion": False, "contrastive": False}),
    ("+ multi-modal fusion", ("text", "metadata", "collaborative"),
     {"multi_resolution": True, "progressive_masking": True, "fusion": True, "contrastive": False}),
    ("+ co-occurrence (SID-v2)", ("text", "metadata", "collaborative"),
     {"multi_resolution": True, "progressive_masking": True, "fusion": True, "contrastive": True}),
]


def cooccurrences(ds: Dataset, window: int) -> list[tuple[str, str, int]]:
    """The pipeline state store's co-occurrence counts for this data set's events."""
    with tempfile.TemporaryDirectory() as tmp:
        store = PipelineStateStore(Path(tmp) / "state.db", cooccurrence_window=window)
        batch: list = []
        for event in to_events(ds):
            batch.append(event)
            if len(batch) == 10_000:
                store.begin()
                store.apply_events(batch, RewardConfig())
                store.commit()
                batch = []
        if batch:
            store.begin()
            store.apply_events(batch, RewardConfig())
            store.commit()
        pairs = store.cooccurrence()
        store.close()
    return pairs


def shared_first_code(codes: np.ndarray, pairs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Fraction of co-occurring pairs with the same first-level code, and of as many random pairs."""
    if not len(pairs):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    random_pairs = rng.integers(len(codes), size=pairs.shape)
    same = float((codes[pairs[:, 0], 0] == codes[pairs[:, 1], 0]).mean())
    base = float((codes[random_pairs[:, 0], 0] == codes[random_pairs[:, 1], 0]).mean())
    return round(same, 4), round(base, 4)


def run_dataset(name: str, cfg: PlumConfig, settings: TokenizeSettings, encoder: TextEncoder) -> dict[str, Any]:
    ds = load_dataset(name, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    items = ds.items
    catalogue = pd.DataFrame({
        "item_id": items["item_id"], "title": items["title"], "tags": items["tags"],
        "published_at": [None if pd.isna(t) else int(t.timestamp()) for t in items["published_at"]],
    })
    started = time.monotonic()
    pairs = cooccurrences(ds, cfg.pipeline.cooccurrence_window)
    # Pairs seen at least twice: a single co-occurrence is mostly noise.
    strong = [(a, b, n) for a, b, n in pairs if n >= 2]
    click.echo(f"bench sid: {name}: {len(catalogue):,} items, {len(pairs):,} co-occurring pairs, {len(strong):,} "
               f"seen at least twice ({time.monotonic() - started:.0f} s)")
    vocabulary = MetadataVocabulary.fit([list(t) for t in catalogue["tags"]], release_years(list(catalogue["published_at"])),
                                        settings.max_tags)
    rows = []
    for label, modalities, flags in ROWS:
        content = catalogue_content(catalogue, strong, encoder, modalities, vocabulary, settings.collaborative_dim)
        index = {item: k for k, item in enumerate(content.item_ids)}
        pair_index = np.array([(index[a], index[b]) for a, b, _ in strong], np.int64).reshape(-1, 2)
        rq = rqvae_config(content.modality_dims, len(content.item_ids), {**settings.rqvae, **flags})
        started = time.monotonic()
        model, history = train(rq, content.x, content.presence, pair_index, settings.steps, settings.batch_size,
                               settings.learning_rate)
        codes = assign_codes(model, content.x, content.presence, settings.batch_size)
        metrics = collision_metrics({i: tuple(int(c) for c in row) for i, row in zip(content.item_ids, codes)},
                                    rq.level_sizes)
        same, base = shared_first_code(codes, pair_index)
        row = {
            "row": label, "modalities": list(modalities), "flags": flags, "codebook_sizes": list(rq.level_sizes),
            "uniqueness_before_suffix": metrics["uniqueness_before_suffix"],
            "largest_collision_group": metrics["largest_collision_group"],
            "utilisation": [lv["utilisation"] for lv in metrics["levels"]],
            "perplexity": [lv["perplexity"] for lv in metrics["levels"]],
            "cooccurring_pairs_sharing_first_code": same, "random_pairs_sharing_first_code": base,
            "train_seconds": round(time.monotonic() - started, 1),
            "final_loss": round(history[-1]["loss"], 4),
        }
        rows.append(row)
        click.echo(f"bench sid: {name}: {label}: uniqueness {row['uniqueness_before_suffix']:.3f}, utilisation "
                   + "/".join(f"{u:.2f}" for u in row["utilisation"])
                   + f", co-occurring pairs share code-1 {same:.3f} (random {base:.3f})")
    return {"items": len(catalogue), "cooccurring_pairs": len(strong), "rows": rows}


def run(cfg: PlumConfig, datasets: tuple[str, ...], steps: int | None, output: str | None) -> dict[str, Any]:
    settings = cfg.tokenizer if steps is None else cfg.tokenizer.model_copy(update={"steps": steps})
    encoder = TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                          cache_path=Path(cfg.paths.cache_dir) / "text_embeddings.db")
    results = {name: run_dataset(name, cfg, settings, encoder) for name in datasets}
    command = f"plum bench sid --steps {settings.steps}" + "".join(f" --dataset {d}" for d in datasets)
    report = {"benchmark": "sid", "command": command, "machine": machine(),
              "settings": settings.model_dump(mode="json"), "datasets": results,
              "targets": {"sid_v2_uniqueness_before_suffix": ">= 0.95", "every_level_utilisation": ">= 0.5"}}
    path = write_result("sid", report, output)
    if output is None:
        update_readme_table("sid", readme_table(report))
    click.echo(f"bench sid: wrote {path}")
    return report


def readme_table(report: dict[str, Any]) -> str:
    lines = ["| data set | row | uniqueness before suffix | utilisation per level | co-occurring / random pairs "
             "sharing code 1 | Recall@10 |", "|---|---|---|---|---|---|"]
    for name, result in report["datasets"].items():
        for row in result["rows"]:
            lines.append(f"| {name} | {row['row']} | {row['uniqueness_before_suffix']:.3f} | "
                         + " / ".join(f"{u:.2f}" for u in row["utilisation"])
                         + f" | {row['cooccurring_pairs_sharing_first_code']:.3f} / "
                           f"{row['random_pairs_sharing_first_code']:.3f} | (generative-retrieval issue) |")
    lines.append(f"\nMeasured {report['machine']['measured_at']} (commit {report['machine']['commit']}) with "
                 f"`{report['command']}`; each row's codebook sizes and flags are in "
                 "ops/bench/results/sid.json.")
    return "\n".join(lines) + "\n"
