"""`plum bench sid`: the SID-v2 ablation on MovieLens-100K and Amazon Beauty.

Rows add one SID-v2 part at a time to SIDv1 (a plain RQ-VAE on the text embedding):
multi-resolution codebooks, progressive masking, multi-modal fusion (text + metadata +
collaborative), co-occurrence contrastive loss. Each row reports uniqueness before the suffix,
per-level utilisation, and how often co-occurring pairs share their first-level code against
random pairs. Co-occurrences come from the pipeline's own state store fed with the data set's
events, so the counts are the ones the running system would have. With `--recall-steps N` each
row also trains PLUM R1 (random init, N SFT steps) on its SIDs and reports the test Recall@10
under the standard protocol; the SIDs then see only the training part of the split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from ingest.datasets import to_events
from ops.assets import fetch_asset
from ops.bench import SFT_RECIPE
from ops.bench.protocol import ProtocolData, catalogue_frame, cooccurrences, prepare, retrieval_row
from ops.bench.report import (RESULTS_DIR, machine, provenance_lines, update_benchmarks_table,
                              with_earlier_datasets, with_earlier_rows, write_result)
from ops.config import PlumConfig
from ops.datasets import load_dataset
from tokenizer.config import TokenizeSettings
from tokenizer.content import MetadataVocabulary
from tokenizer.jobs import catalogue_content, release_years, rqvae_config
from tokenizer.rqvae_train import assign_codes, train
from tokenizer.sid_table import collision_metrics, new_table
from tokenizer.text_encoder import TextEncoder
from trainer.retrieval import RetrievalSettings, make_catalogue
from trainer.vocab import VocabLayout

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


def shared_first_code(codes: np.ndarray, pairs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Fraction of co-occurring pairs with the same first-level code, and of as many random pairs."""
    if not len(pairs):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    random_pairs = rng.integers(len(codes), size=pairs.shape)
    same = float((codes[pairs[:, 0], 0] == codes[pairs[:, 1], 0]).mean())
    base = float((codes[random_pairs[:, 0], 0] == codes[random_pairs[:, 1], 0]).mean())
    return round(same, 4), round(base, 4)


def recall_row(data: ProtocolData, item_ids: tuple[str, ...], codes: np.ndarray, level_sizes: tuple[int, ...],
               steps: int, users: int | None) -> dict[str, Any]:
    """PLUM R1 (random init, SFT only) on these SIDs: the downstream Recall@10 of one ablation row."""
    table = new_table(1, list(item_ids), codes, level_sizes)
    sids = np.array([table.sid(str(i)) for i in data.sequences.item_ids], np.int64)
    layout = VocabLayout(tuple(level_sizes), table.suffix_size)
    catalogue = make_catalogue(layout, sids, [[] for _ in sids])
    return retrieval_row(RetrievalSettings(sft_steps=steps, **SFT_RECIPE), layout, catalogue, data, eval_users=users)


def run_dataset(name: str, cfg: PlumConfig, settings: TokenizeSettings, encoder: TextEncoder, recall_steps: int = 0,
                recall_users: int | None = None, rows: tuple[int, ...] = ()) -> dict[str, Any]:
    """The ablation rows of one data set: `rows` (1-based indices into ROWS), or every row."""
    data = prepare(name, cfg) if recall_steps else None
    ds = data.dataset if data else load_dataset(name, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    catalogue = catalogue_frame(ds)
    started = time.monotonic()
    # With the Recall@10 column the SIDs may only know the training part of the split; without it
    # they see every event, as the running system's tokenizer does. Pairs seen at least twice: a
    # single co-occurrence is mostly noise.
    strong = data.train_pairs if data else [(a, b, n) for a, b, n in cooccurrences(to_events(ds), cfg.pipeline.cooccurrence_window)
                                            if n >= 2]
    click.echo(f"bench sid: {name}: {len(catalogue):,} items, {len(strong):,} co-occurring pairs seen at least "
               f"twice{' in the training split' if data else ''} ({time.monotonic() - started:.0f} s)")
    vocabulary = MetadataVocabulary.fit([list(t) for t in catalogue["tags"]], release_years(list(catalogue["published_at"])),
                                        settings.max_tags)
    results = []
    for label, modalities, flags in [ROWS[k - 1] for k in sorted(set(rows))] if rows else ROWS:
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
        if data is not None:
            row["retrieval"] = recall_row(data, content.item_ids, codes, rq.level_sizes, recall_steps, recall_users)
        results.append(row)
        click.echo(f"bench sid: {name}: {label}: uniqueness {row['uniqueness_before_suffix']:.3f}, utilisation "
                   + "/".join(f"{u:.2f}" for u in row["utilisation"])
                   + f", co-occurring pairs share code-1 {same:.3f} (random {base:.3f})"
                   + (f", R1 Recall@10 {row['retrieval']['metrics']['recall@10']:.4f}" if data else ""))
    return {"items": len(catalogue), "cooccurring_pairs": len(strong), "rows": results,
            "cooccurrences_from": "training part of the leave-one-out split" if data else "every event"}


def run(cfg: PlumConfig, datasets: tuple[str, ...], steps: int | None, output: str | None, recall_steps: int = 0,
        recall_users: int | None = None, rows: tuple[int, ...] = ()) -> dict[str, Any]:
    """The ablation on `datasets`; `rows` (1-based) measures only those rows, and the default result
    file then keeps the other rows from the runs that measured them (with --recall-steps every row
    trains and evaluates a model, so a column can be filled over several runs)."""
    if any(not 1 <= k <= len(ROWS) for k in rows):
        raise click.BadParameter(f"rows are numbered 1 to {len(ROWS)}", param_hint="--row")
    settings = cfg.tokenizer if steps is None else cfg.tokenizer.model_copy(update={"steps": steps})
    encoder = TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                          cache_path=Path(cfg.paths.cache_dir) / "text_embeddings.db")
    results = {name: run_dataset(name, cfg, settings, encoder, recall_steps, recall_users, rows) for name in datasets}
    command = (f"plum bench sid --steps {settings.steps}" + "".join(f" --dataset {d}" for d in datasets)
               + "".join(f" --row {k}" for k in sorted(set(rows)))
               + (f" --recall-steps {recall_steps}" if recall_steps else "")
               + (f" --recall-users {recall_users}" if recall_users else ""))
    measured = machine()
    provenance = {"command": command, "machine": measured, "settings": settings.model_dump(mode="json")}
    for result in results.values():  # each data set and row says which run produced it
        result.update(provenance)
        for row in result["rows"]:
            row.update(provenance, cooccurrences_from=result["cooccurrences_from"])
    if output is None:
        keys = ("command", "machine", "settings", "cooccurrences_from")
        results = with_earlier_rows(RESULTS_DIR / "sid.json", results, "row", [label for label, _, _ in ROWS], keys)
        results = with_earlier_datasets(RESULTS_DIR / "sid.json", results, keys)
    report = {"benchmark": "sid", "command": command, "machine": measured,
              "settings": settings.model_dump(mode="json"), "datasets": results,
              "targets": {"sid_v2_uniqueness_before_suffix": ">= 0.95", "every_level_utilisation": ">= 0.5"}}
    path = write_result("sid", report, output)
    if output is None:
        update_benchmarks_table("sid", readme_table(report))
    click.echo(f"bench sid: wrote {path}")
    return report


def _recall(row: dict[str, Any]) -> str:
    return f"{row['retrieval']['metrics']['recall@10']:.4f}" if "retrieval" in row else "not measured"


def readme_table(report: dict[str, Any]) -> str:
    lines = ["| data set | row | uniqueness before suffix | utilisation per level | co-occurring / random pairs "
             "sharing code 1 | Recall@10 |", "|---|---|---|---|---|---|"]
    for name, result in report["datasets"].items():
        for row in result["rows"]:
            lines.append(f"| {name} | {row['row']} | {row['uniqueness_before_suffix']:.3f} | "
                         + " / ".join(f"{u:.2f}" for u in row["utilisation"])
                         + f" | {row['cooccurring_pairs_sharing_first_code']:.3f} / "
                           f"{row['random_pairs_sharing_first_code']:.3f} | {_recall(row)} |")
    lines.append("")
    lines += provenance_lines(report, by_row=True)
    lines.append("Each row's codebook sizes and flags are in ops/bench/results/sid.json.")
    return "\n".join(lines) + "\n"
