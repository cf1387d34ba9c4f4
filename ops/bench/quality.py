"""`plum bench quality`: generative retrieval against SASRec under the standard protocol.

Per data set: leave-one-out split (last item test, second-to-last validation, histories capped at
20 items), full-catalogue ranking with the user's earlier items excluded, Recall@5/10 and NDCG@5/10
on the test users, and the effective vocabulary (distinct items filling 95% of all top-10 slots).
Rows: SASRec (trained on the same split in the same run); PLUM R1 (random init, SFT only); CR1
(random init, CPT then SFT); CR2 (SmolLM2-135M's first layers, CPT then SFT).

SIDs are fitted by the tokenizer's own `fit` job (SID-v2 defaults) with co-occurrences counted by
the pipeline's state store over the training part of the split only, so no test item leaks in.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from ops.assets import fetch_asset, smollm2_gguf
from ops.bench import QualityRun
from ops.bench.protocol import MAX_HISTORY, catalogue_frame, prepare, retrieval_row
from ops.bench.report import (RESULTS_DIR, machine, provenance_lines, update_readme_table,
                              with_earlier_datasets, with_earlier_rows, write_result)
from ops.config import PlumConfig
from tokenizer.jobs import fit as fit_sids
from tokenizer.sid_table import load_params
from tokenizer.text_encoder import TextEncoder
from trainer.retrieval import RetrievalSettings, make_catalogue, text_vocabulary
from trainer.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
from trainer.vocab import VocabLayout
from trainer.warm_start import TextTokenizer

VARIANTS = {
    "r1": ("PLUM R1 (random init, no CPT)", "random", False),
    "cr1": ("PLUM CR1 (random init + CPT)", "random", True),
    "cr2": ("PLUM CR2 (SmolLM2 init + CPT)", "smollm2", True),
}


def _prepare(name: str, cfg: PlumConfig, run: QualityRun, tokenizer: TextTokenizer, encoder: TextEncoder,
             ) -> dict[str, Any]:
    data = prepare(name, cfg, MAX_HISTORY)
    items = data.dataset.items
    catalogue = catalogue_frame(data.dataset)
    settings = cfg.tokenizer if run.sid_steps is None else cfg.tokenizer.model_copy(update={"steps": run.sid_steps})
    with tempfile.TemporaryDirectory() as tmp:
        table, _ = fit_sids(Path(tmp), catalogue, data.train_pairs, encoder, settings, say=lambda m: None)
        params = load_params(Path(tmp), table.version)
    codebooks = [params[f"codebooks/{level}"] for level in range(table.levels)]
    item_ids = data.sequences.item_ids
    sids = np.array([table.sid(str(i)) for i in item_ids], np.int64)
    titles = [tokenizer.encode(str(t)) if t else [] for t in items.set_index("item_id").loc[item_ids, "title"]]
    layout = VocabLayout(tuple(table.codebook_sizes), table.suffix_size, text_ids=text_vocabulary(titles))
    click.echo(f"bench quality: {name}: {len(data.sequences.user_ids):,} users, {data.split.n_items:,} items, "
               f"SID uniqueness before suffix {table.metrics['uniqueness_before_suffix']:.3f}, "
               f"vocabulary {layout.size:,} tokens ({len(layout.text_ids):,} text)")
    return {"data": data, "layout": layout, "catalogue": make_catalogue(layout, sids, titles),
            "sid_metrics": table.metrics, "codebooks": codebooks, "tokenizer": settings.model_dump(mode="json")}


def _plum_row(variant: str, prepared: dict[str, Any], run: QualityRun, gguf: Path, tokenizer: TextTokenizer
              ) -> dict[str, Any]:
    label, init, with_cpt = VARIANTS[variant]
    settings = RetrievalSettings(model_size=run.model_size, init=init, keep_layers=run.keep_layers,
                                 cpt_steps=run.cpt_steps if with_cpt else 0, sft_steps=run.sft_steps,
                                 batch_size=run.batch_size, max_history=MAX_HISTORY, learning_rate=run.learning_rate,
                                 dropout=run.dropout, weight_decay=run.weight_decay,
                                 validate_every=run.validate_every, patience=run.patience,
                                 validation_users=run.validation_users, ema_decay=run.ema_decay,
                                 beam_width=run.beam_width, sid_init=run.sid_init,
                                 target_sampling=run.target_sampling, label_smoothing=run.label_smoothing,
                                 seed=run.seed)
    row = retrieval_row(settings, prepared["layout"], prepared["catalogue"], prepared["data"], gguf,
                        (tokenizer.bos_id, tokenizer.eos_id), codebooks=prepared["codebooks"])
    # The SID settings of the run's configuration (`--config` can change them; the command line cannot).
    return {"row": label, "variant": variant, "tokenizer": prepared["tokenizer"], **row}


def _sasrec_row(prepared: dict[str, Any], run: QualityRun) -> dict[str, Any]:
    split = prepared["data"].split
    # Early stopping on validation Recall@10 (checked every 2 epochs, patience 3) ends the run.
    cfg = SASRecConfig(n_items=split.n_items, max_len=MAX_HISTORY, epochs=run.sasrec_epochs, eval_every=2,
                       seed=run.seed)
    started = time.monotonic()
    model, _ = train_sasrec(split, cfg, progress=lambda row: click.echo(
        "sasrec: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())))
    trained = time.monotonic() - started
    metrics = evaluate_sasrec(model, split, "test")
    return {"row": "SASRec (in-project, same split)", "variant": "sasrec", "settings": dataclasses.asdict(cfg),
            "metrics": metrics, "train_seconds": round(trained, 1)}


def run(cfg: PlumConfig, quality: QualityRun, output: str | None) -> dict[str, Any]:
    gguf = smollm2_gguf(cfg.paths.cache_dir)
    tokenizer = TextTokenizer.from_gguf(gguf)
    encoder = TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                          cache_path=Path(cfg.paths.cache_dir) / "text_embeddings.db")
    results: dict[str, Any] = {}
    for name in quality.datasets:
        prepared = _prepare(name, cfg, quality, tokenizer, encoder)
        rows = []
        for variant in quality.variants:
            row = (_sasrec_row(prepared, quality) if variant == "sasrec"
                   else _plum_row(variant, prepared, quality, gguf, tokenizer))
            rows.append(row)
            m = row["metrics"]
            click.echo(f"bench quality: {name}: {row['row']}: R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} "
                       f"({row['train_seconds']:.0f} s training)")
        results[name] = {"sid_metrics": prepared["sid_metrics"], "rows": rows}
    command = quality.command()
    measured = machine()
    for result in results.values():  # each data set and row says which run produced it
        result.update(command=command, machine=measured, run=dataclasses.asdict(quality))
        for row in result["rows"]:
            row.update(command=command, machine=measured)
    if output is None:
        results = with_earlier_rows(RESULTS_DIR / "quality.json", results, "variant", ["sasrec", *VARIANTS])
        results = with_earlier_datasets(RESULTS_DIR / "quality.json", results, ("command", "machine", "run"))
    report = {"benchmark": "quality", "command": command, "machine": measured,
              "run": dataclasses.asdict(quality), "datasets": results,
              "protocol": "leave-one-out, full catalogue, earlier items excluded, histories capped at 20",
              "anchors_beauty": {"TIGER": {"recall@10": 0.0648, "ndcg@10": 0.0384},
                                 "tuned SASRec": {"recall@10": 0.0740, "ndcg@10": 0.0423}}}
    path = write_result("quality", report, output)
    if output is None:
        update_readme_table("quality", readme_table(report))
    click.echo(f"bench quality: wrote {path}")
    return report


def readme_table(report: dict[str, Any]) -> str:
    lines = ["| data set | model | Recall@5 | Recall@10 | NDCG@5 | NDCG@10 | effective vocabulary | training (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in report["datasets"].items():
        for row in result["rows"]:
            m = row["metrics"]
            lines.append(f"| {name} | {row['row']} | {m['recall@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@5']:.4f} | "
                         f"{m['ndcg@10']:.4f} | {m.get('effective_vocabulary', '')} | {row['train_seconds']:.0f} |")
    lines.append("")
    lines += provenance_lines(report, by_row=True)
    lines.append("Settings per row in ops/bench/results/quality.json.")
    return "\n".join(lines) + "\n"
