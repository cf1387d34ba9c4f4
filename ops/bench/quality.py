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
import pandas as pd

from ingest.datasets import Dataset, to_events
from ops.assets import fetch_asset
from ops.bench.report import machine, update_readme_table, write_result
from ops.bench.sid import cooccurrences
from ops.config import PlumConfig
from ops.datasets import load_dataset
from tokenizer.jobs import fit as fit_sids
from tokenizer.text_encoder import TextEncoder
from trainer.data import RewardedSequences
from trainer.evaluate import Split, leave_one_out, sequences_from_events
from trainer.retrieval import (
    Recommender, RetrievalSettings, evaluate, init_model, make_catalogue, text_vocabulary, train_stages,
)
from trainer.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
from trainer.vocab import VocabLayout
from trainer.warm_start import TextTokenizer

VARIANTS = {
    "r1": ("PLUM R1 (random init, no CPT)", "random", False),
    "cr1": ("PLUM CR1 (random init + CPT)", "random", True),
    "cr2": ("PLUM CR2 (SmolLM2 init + CPT)", "smollm2", True),
}
MAX_HISTORY = 20


@dataclasses.dataclass(frozen=True)
class QualityRun:
    """What one `plum bench quality` invocation trains."""

    datasets: tuple[str, ...]
    variants: tuple[str, ...]
    sft_steps: int
    cpt_steps: int
    model_size: str
    keep_layers: int
    batch_size: int
    sasrec_epochs: int
    sid_steps: int | None


def _training_dataset(ds: Dataset, split: Split, sequences: Any) -> Dataset:
    """The data set restricted to each user's training events (everything before the validation item)."""
    frame = ds.interactions.copy()
    frame["_order"] = np.arange(len(frame))
    keep = set()
    user_index = {u: k for k, u in enumerate(sequences.user_ids)}
    counts: dict[int, int] = {}
    for row, user in zip(frame["_order"].to_numpy(), frame["user_id"].to_numpy()):
        u = user_index[user]
        counts[u] = counts.get(u, 0) + 1
        if counts[u] <= len(split.train[u]):
            keep.add(row)
    train = frame[frame["_order"].isin(keep)].drop(columns="_order")
    return Dataset(ds.name, train, ds.items, ds.rating_scale, ds.has_real_time)


def _rewards(ds: Dataset, cfg: PlumConfig, sequences: Any) -> dict[tuple[int, int], float]:
    """(user index, item index) -> reward of that event, by the configured reward function."""
    users = {u: k for k, u in enumerate(sequences.user_ids)}
    items = {i: k for k, i in enumerate(sequences.item_ids)}
    return {(users[e.user_id], items[e.item_id]): e.reward(cfg.pipeline.reward) for e in to_events(ds)}


def _prepare(name: str, cfg: PlumConfig, run: QualityRun, tokenizer: TextTokenizer, encoder: TextEncoder,
             ) -> dict[str, Any]:
    ds = load_dataset(name, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    frame = ds.interactions
    sequences = sequences_from_events(frame["user_id"], frame["item_id"], frame["timestamp"], ds.items["item_id"])
    split = leave_one_out(sequences, MAX_HISTORY)
    reward_of = _rewards(ds, cfg, sequences)
    train_ds = _training_dataset(ds, split, sequences)
    pairs = [(a, b, n) for a, b, n in cooccurrences(train_ds, cfg.pipeline.cooccurrence_window) if n >= 2]
    catalogue = pd.DataFrame({
        "item_id": ds.items["item_id"], "title": ds.items["title"], "tags": ds.items["tags"],
        "published_at": [None if pd.isna(t) else int(t.timestamp()) for t in ds.items["published_at"]],
    })
    settings = cfg.tokenizer if run.sid_steps is None else cfg.tokenizer.model_copy(update={"steps": run.sid_steps})
    with tempfile.TemporaryDirectory() as tmp:
        table, _ = fit_sids(Path(tmp), catalogue, pairs, encoder, settings, say=lambda m: None)
    sids = np.array([table.sid(str(i)) for i in sequences.item_ids], np.int64)
    titles = [tokenizer.encode(str(t)) if t else [] for t in ds.items.set_index("item_id").loc[sequences.item_ids,
                                                                                              "title"]]
    layout = VocabLayout(tuple(table.codebook_sizes), table.suffix_size, text_ids=text_vocabulary(titles))
    cat = make_catalogue(layout, sids, titles)
    train_rewards = tuple(np.array([reward_of[(u, int(i))] for i in seq], np.float32)
                          for u, seq in enumerate(split.train))
    test = split.test
    test_rewards = [[reward_of[(int(u), int(i))] for i in h] for u, h in zip(test.users, test.histories)]
    click.echo(f"bench quality: {name}: {len(sequences.user_ids):,} users, {split.n_items:,} items, "
               f"SID uniqueness before suffix {table.metrics['uniqueness_before_suffix']:.3f}, "
               f"vocabulary {layout.size:,} tokens ({len(layout.text_ids):,} text)")
    return {"split": split, "layout": layout, "catalogue": cat, "sequences": RewardedSequences(split.train, train_rewards),
            "test_rewards": test_rewards, "sid_metrics": table.metrics}


def _plum_row(variant: str, data: dict[str, Any], run: QualityRun, gguf: Path, tokenizer: TextTokenizer
              ) -> dict[str, Any]:
    label, init, with_cpt = VARIANTS[variant]
    settings = RetrievalSettings(model_size=run.model_size, init=init, keep_layers=run.keep_layers,
                                 cpt_steps=run.cpt_steps if with_cpt else 0, sft_steps=run.sft_steps,
                                 batch_size=run.batch_size, max_history=MAX_HISTORY)
    started = time.monotonic()
    model = init_model(settings, data["layout"], gguf, (tokenizer.bos_id, tokenizer.eos_id))
    model, histories = train_stages(model, settings, data["layout"], data["catalogue"], data["sequences"],
                                    say=click.echo)
    trained = time.monotonic() - started
    recommender = Recommender(model, data["layout"], data["catalogue"], MAX_HISTORY)
    metrics, _ = evaluate(recommender, data["split"].test, data["test_rewards"], settings.beam_width,
                          settings.eval_batch, invalid_rate_users=1000)
    return {"row": label, "variant": variant, "settings": dataclasses.asdict(settings),
            "model": dataclasses.asdict(model.cfg), "metrics": metrics, "train_seconds": round(trained, 1),
            "eval_seconds": round(time.monotonic() - started - trained, 1),
            "final_loss": {stage: h[-1]["loss"] for stage, h in histories.items()}}


def _sasrec_row(data: dict[str, Any], run: QualityRun) -> dict[str, Any]:
    # Early stopping on validation Recall@10 (checked every 2 epochs, patience 3) ends the run.
    cfg = SASRecConfig(n_items=data["split"].n_items, max_len=MAX_HISTORY, epochs=run.sasrec_epochs, eval_every=2)
    started = time.monotonic()
    model, _ = train_sasrec(data["split"], cfg, progress=lambda row: click.echo(
        "sasrec: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())))
    trained = time.monotonic() - started
    metrics = evaluate_sasrec(model, data["split"], "test")
    return {"row": "SASRec (in-project, same split)", "variant": "sasrec", "settings": dataclasses.asdict(cfg),
            "metrics": metrics, "train_seconds": round(trained, 1)}


def run(cfg: PlumConfig, quality: QualityRun, output: str | None) -> dict[str, Any]:
    gguf = fetch_asset("smollm2", Path(cfg.paths.cache_dir)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = TextTokenizer.from_gguf(gguf)
    encoder = TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                          cache_path=Path(cfg.paths.cache_dir) / "text_embeddings.db")
    results: dict[str, Any] = {}
    for name in quality.datasets:
        data = _prepare(name, cfg, quality, tokenizer, encoder)
        rows = []
        for variant in quality.variants:
            row = _sasrec_row(data, quality) if variant == "sasrec" else _plum_row(variant, data, quality, gguf,
                                                                                   tokenizer)
            rows.append(row)
            m = row["metrics"]
            click.echo(f"bench quality: {name}: {row['row']}: R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} "
                       f"({row['train_seconds']:.0f} s training)")
        results[name] = {"sid_metrics": data["sid_metrics"], "rows": rows}
    command = ("plum bench quality" + "".join(f" --dataset {d}" for d in quality.datasets)
               + "".join(f" --variant {v}" for v in quality.variants)
               + f" --sft-steps {quality.sft_steps} --cpt-steps {quality.cpt_steps} --model-size {quality.model_size}"
               f" --keep-layers {quality.keep_layers}")
    report = {"benchmark": "quality", "command": command, "machine": machine(),
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
    lines.append(f"\nMeasured {report['machine']['measured_at']} (commit {report['machine']['commit']}) with "
                 f"`{report['command']}`; settings per row in ops/bench/results/quality.json.")
    return "\n".join(lines) + "\n"
