"""`plum bench quality`: generative retrieval against SASRec under the standard protocol.

Per data set: leave-one-out split (last item test, second-to-last validation, histories capped at
20 items), full-catalogue ranking with the user's earlier items excluded, Recall@5/10 and NDCG@5/10
on the test users, and the effective vocabulary (distinct items filling 95% of all top-10 slots).
Rows: SASRec with a full softmax and SASRec with the paper's BCE loss (each trained on the same split
in the same run, on every position of the training sequences, after a coordinate search over a small
grid on validation); PLUM R1 (random init, SFT only); CR1 (random init, CPT then SFT); CR2
(SmolLM2-135M's first layers, CPT then SFT). Every row trains one model per seed and reads the test
split once per model; the table shows mean and spread over the seeds. Every choice (grid point,
early-stopping step) is made on validation.

SIDs are fitted by the tokenizer's own `fit` job (SID-v2 defaults) with co-occurrences counted by
the pipeline's state store over the training part of the split only, so no test item leaks in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from ops.assets import fetch_asset, smollm2_gguf
from ops.bench import QualityRun
from ops.bench.protocol import MAX_HISTORY, catalogue_frame, prepare, retrieval_row
from ops.bench.report import (RESULTS_DIR, machine, provenance_lines, update_benchmarks_table,
                              with_earlier_datasets, with_earlier_rows, write_json, write_result)
from ops.config import PlumConfig
from tokenizer.jobs import fit as fit_sids
from trainer.tuning import coordinate_search
from tokenizer.sid_table import load_params
from tokenizer.text_encoder import TextEncoder
from trainer.retrieval import RetrievalSettings, make_catalogue, text_vocabulary
from trainer.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
from trainer.vocab import VocabLayout
from trainer.warm_start import TextTokenizer

# Each data set's SASRec grid, searched one parameter at a time in this order. The history length
# stays within the protocol's cap of 20 on Amazon Beauty; MovieLens has none, and standard SASRec
# runs there read 200 items (PLUM's prompt holds 20 on both).
SASREC_GRIDS: dict[str, dict[str, list[Any]]] = {
    "movielens-100k": {"max_len": [50, 200], "dim": [64, 128], "n_blocks": [2, 3], "dropout": [0.1, 0.2, 0.3, 0.5],
                       "learning_rate": [1e-3, 3e-3]},
    "amazon-beauty": {"max_len": [20], "dim": [64, 128], "n_blocks": [2, 3], "dropout": [0.1, 0.2, 0.3, 0.5],
                      "learning_rate": [1e-3, 3e-3]},
}
SASREC_ROWS = {"ce": ("SASRec CE (full softmax, in-project)", "sasrec"),
               "bce": ("SASRec BCE (one sampled negative, in-project)", "sasrec-bce")}
VARIANTS = {
    "r1": ("PLUM R1 (random init, no CPT)", "random", False),
    "cr1": ("PLUM CR1 (random init + CPT)", "random", True),
    "cr2": ("PLUM CR2 (SmolLM2 init + CPT)", "smollm2", True),
}


ROW_ORDER = ["sasrec", "sasrec-bce", *VARIANTS]


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
    return {"name": name, "data": data, "layout": layout, "catalogue": make_catalogue(layout, sids, titles),
            "sid_metrics": table.metrics, "codebooks": codebooks, "tokenizer": settings.model_dump(mode="json")}


def _plum_seed(variant: str, prepared: dict[str, Any], run: QualityRun, seed: int, gguf: Path,
               tokenizer: TextTokenizer) -> dict[str, Any]:
    _, init, with_cpt = VARIANTS[variant]
    settings = RetrievalSettings(model_size=run.model_size, init=init, keep_layers=run.keep_layers,
                                 cpt_steps=run.cpt_steps if with_cpt else 0, sft_steps=run.sft_steps,
                                 batch_size=run.batch_size, max_history=MAX_HISTORY, learning_rate=run.learning_rate,
                                 dropout=run.dropout, weight_decay=run.weight_decay,
                                 validate_every=run.validate_every, patience=run.patience,
                                 validation_users=run.validation_users, ema_decay=run.ema_decay,
                                 beam_width=run.beam_width, sid_init=run.sid_init,
                                 target_sampling=run.target_sampling, label_smoothing=run.label_smoothing,
                                 seed=seed)
    return retrieval_row(settings, prepared["layout"], prepared["catalogue"], prepared["data"], gguf,
                         (tokenizer.bos_id, tokenizer.eos_id), codebooks=prepared["codebooks"])


class SeedRecords:
    """Finished seeds (and SASRec's finished search trials) kept on disk until their row is written,
    so that a run stopped between them (a PLUM seed takes most of an hour here, a SASRec trial on
    Beauty ten minutes) is continued by the same command: a record is reused only for the same data
    set, variant, settings (every QualityRun field but the seeds, the data sets and the variants) and
    a clean commit that is the current one. The row names the seeds (and trials) it took from an
    earlier process."""

    def __init__(self, folder: Path, run: QualityRun, commit: str | None) -> None:
        self.folder, self.commit = folder, commit
        self.settings = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("seeds", "datasets", "variants")}

    def _path(self, dataset: str, variant: str, part: str) -> Path:
        return self.folder / f"{dataset}-{variant}-{part}.json"

    @staticmethod
    def _trial(point: dict[str, Any]) -> str:
        text = json.dumps(point, sort_keys=True)
        return "trial-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def _usable(self) -> bool:
        return bool(self.commit) and not self.commit.endswith("+uncommitted")

    def _load(self, dataset: str, variant: str, part: str) -> dict[str, Any] | None:
        path = self._path(dataset, variant, part)
        if not self._usable() or not path.is_file():
            return None
        record = json.loads(path.read_text())
        if (record["commit"], record["settings"]) != (self.commit, json.loads(json.dumps(self.settings))):
            return None
        return record["result"]

    def _save(self, dataset: str, variant: str, part: str, result: dict[str, Any]) -> None:
        if self._usable():
            write_json(self._path(dataset, variant, part),
                       {"commit": self.commit, "settings": self.settings, "result": result})

    def load(self, dataset: str, variant: str, seed: int) -> dict[str, Any] | None:
        return self._load(dataset, variant, f"seed{seed}")

    def save(self, dataset: str, variant: str, seed: int, result: dict[str, Any]) -> None:
        self._save(dataset, variant, f"seed{seed}", result)

    def load_trial(self, dataset: str, variant: str, point: dict[str, Any]) -> dict[str, Any] | None:
        """A finished search trial of `point` (its validation score and figures), or None."""
        result = self._load(dataset, variant, self._trial(point))
        return result if result is not None and result.get("point") == json.loads(json.dumps(point)) else None

    def save_trial(self, dataset: str, variant: str, point: dict[str, Any], result: dict[str, Any]) -> None:
        self._save(dataset, variant, self._trial(point), {**result, "point": point})

    def clear(self, dataset: str, variant: str, seeds: tuple[int, ...]) -> None:
        for seed in seeds:
            self._path(dataset, variant, f"seed{seed}").unlink(missing_ok=True)
        for trial in self.folder.glob(f"{dataset}-{variant}-trial-*.json"):
            trial.unlink(missing_ok=True)


def _plum_row(variant: str, prepared: dict[str, Any], run: QualityRun, gguf: Path, tokenizer: TextTokenizer,
              records: SeedRecords) -> dict[str, Any]:
    """One trained model per seed, each evaluated on test once; the recipe is fixed (no search in the run).
    A seed that an earlier process of the same command finished (SeedRecords) is taken as it was."""
    per_seed, resumed = [], []
    for seed in run.seeds:
        result = records.load(prepared["name"], variant, seed)
        if result is None:
            result = {"seed": seed, **_plum_seed(variant, prepared, run, seed, gguf, tokenizer)}
            records.save(prepared["name"], variant, seed, result)
        else:
            resumed.append(seed)
            click.echo(f"bench quality: {VARIANTS[variant][0]} seed {seed}: finished by an earlier run of this "
                       f"command at commit {records.commit}; taken from {records.folder}")
        per_seed.append(result)
        _say_seed(VARIANTS[variant][0], per_seed[-1])
    row = seeded_row(VARIANTS[variant][0], variant, per_seed)
    row["seeds_from_an_earlier_process"] = resumed
    # The SID settings of the run's configuration (`--config` can change them; the command line cannot).
    row.update(tokenizer=prepared["tokenizer"],
               tuning={"runs": 0, "wall_clock_s": 0.0, "method": "none in this run: the command's recipe"})
    return row


def sasrec_start(dataset: str, loss: str) -> dict[str, Any]:
    """Where the search starts: the project's earlier defaults for the full softmax, the paper's
    settings (learning rate 1e-3, dropout 0.2) for BCE, and the longest history the grid allows."""
    start = {"max_len": SASREC_GRIDS[dataset]["max_len"][-1], "dim": 64, "n_blocks": 2}
    if loss == "ce":
        return {**start, "dropout": 0.3, "learning_rate": 3e-3}
    return {**start, "dropout": 0.2, "learning_rate": 1e-3}


def _sasrec_row(name: str, prepared: dict[str, Any], run: QualityRun, loss: str,
                records: SeedRecords) -> dict[str, Any]:
    """Coordinate search over the data set's grid on validation (the first seed), then one model per
    seed with the chosen settings; test is read once per seed's model. Trials and seeds an earlier
    process of the same command finished (SeedRecords) are taken as they were; when the chosen point
    is such a trial, the first seed retrains it (its model was not kept) unless that seed is recorded too."""
    split = prepared["data"].split
    label, variant = SASREC_ROWS[loss]
    base = SASRecConfig(n_items=split.n_items, epochs=run.sasrec_epochs, eval_every=2, loss=loss, seed=run.seeds[0])
    resumed_trials: list[dict[str, Any]] = []

    def train(point: dict[str, Any], seed: int) -> tuple[float, dict[str, Any]]:
        cfg = dataclasses.replace(base, **point, ffn_dim=4 * point["dim"], seed=seed)
        started = time.monotonic()
        model, history = train_sasrec(split, cfg)
        seconds = time.monotonic() - started
        best = max(row["valid_recall@10"] for row in history if "valid_recall@10" in row)
        click.echo(f"sasrec {loss} seed {seed}: {point} validation R@10 {best:.4f} "
                   f"({history[-1]['epoch']} epochs, {seconds:.0f} s)")
        return best, {"model": model, "cfg": cfg, "train_seconds": round(seconds, 1),
                      "epochs": history[-1]["epoch"]}

    def trial(point: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        recorded = records.load_trial(name, variant, point)
        if recorded is not None:
            resumed_trials.append(point)
            click.echo(f"sasrec {loss}: {point} validation R@10 {recorded['score']:.4f}: finished by an earlier "
                       f"run of this command at commit {records.commit}; taken from {records.folder}")
            return recorded["score"], {"model": None, "train_seconds": recorded["train_seconds"],
                                       "epochs": recorded["epochs"]}
        score, result = train(point, run.seeds[0])
        records.save_trial(name, variant, point, {"score": score, "train_seconds": result["train_seconds"],
                                                  "epochs": result["epochs"]})
        return score, result

    started = time.monotonic()
    search = coordinate_search(sasrec_start(name, loss), SASREC_GRIDS[name], trial, max_trials=run.sasrec_trials)
    tuning = {"method": "coordinate search on validation Recall@10 (first seed), one parameter at a time",
              "grid": SASREC_GRIDS[name], "start": sasrec_start(name, loss),
              "trials": [{"point": t.point, "valid_recall@10": t.score, "train_seconds": t.result["train_seconds"],
                          "epochs": t.result["epochs"]} for t in search.trials],
              "runs": len(search.trials), "wall_clock_s": round(time.monotonic() - started, 1),
              "chosen": search.best.point, "trials_from_an_earlier_process": resumed_trials}
    if resumed_trials:  # this process's wall clock misses them: count their training time instead
        tuning["wall_clock_s"] = round(tuning["wall_clock_s"] + sum(
            t.result["train_seconds"] for t in search.trials if t.result["model"] is None), 1)
    per_seed, resumed = [], []
    for seed in run.seeds:
        result = records.load(name, variant, seed)
        if result is not None:
            resumed.append(seed)
            click.echo(f"bench quality: {label} seed {seed}: finished by an earlier run of this command at commit "
                       f"{records.commit}; taken from {records.folder}")
        else:
            # The first seed's model is the search's best run itself (retrained when that run was an
            # earlier process's); the other seeds train the chosen point.
            first = seed == run.seeds[0] and search.best.result["model"] is not None
            trained = search.best.result if first else train(search.best.point, seed)[1]
            result = {"seed": seed, "settings": dataclasses.asdict(trained["cfg"]),
                      "metrics": evaluate_sasrec(trained["model"], split, "test"),
                      "train_seconds": trained["train_seconds"]}
            records.save(name, variant, seed, result)
        per_seed.append(result)
        _say_seed(label, per_seed[-1])
    row = seeded_row(label, variant, per_seed)
    row["tuning"] = tuning
    row["seeds_from_an_earlier_process"] = resumed
    return row


def _say_seed(label: str, row: dict[str, Any]) -> None:
    m = row["metrics"]
    click.echo(f"bench quality: {label} seed {row['seed']}: R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} "
               f"({row['train_seconds']:.0f} s training)")


def seeded_row(label: str, variant: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row from one run's per-seed results: the seeds, each seed's figures, and the mean and
    spread (sample standard deviation; 0 for one seed) of every metric; settings of the first seed."""
    names = [k for k, v in per_seed[0]["metrics"].items() if isinstance(v, (int, float))]
    values = {k: np.array([float(r["metrics"][k]) for r in per_seed]) for k in names}
    return {"row": label, "variant": variant, "seeds": [r["seed"] for r in per_seed],
            "settings": per_seed[0]["settings"], "per_seed": per_seed,
            "metrics": {k: float(v.mean()) for k, v in values.items()},
            "spread": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
            "train_seconds": round(sum(r["train_seconds"] for r in per_seed), 1)}


def run(cfg: PlumConfig, quality: QualityRun, output: str | None) -> dict[str, Any]:
    gguf = smollm2_gguf(cfg.paths.cache_dir)
    tokenizer = TextTokenizer.from_gguf(gguf)
    encoder = TextEncoder(fetch_asset("minilm", Path(cfg.paths.cache_dir)),
                          cache_path=Path(cfg.paths.cache_dir) / "text_embeddings.db")
    results: dict[str, Any] = {}
    records = SeedRecords((Path(output).parent if output else RESULTS_DIR) / "unfinished", quality,
                          machine()["commit"])
    for name in quality.datasets:
        prepared = _prepare(name, cfg, quality, tokenizer, encoder)
        rows = []
        for variant in quality.variants:
            if variant in ("sasrec", "sasrec-bce"):
                row = _sasrec_row(name, prepared, quality, "ce" if variant == "sasrec" else "bce", records)
            else:
                row = _plum_row(variant, prepared, quality, gguf, tokenizer, records)
            rows.append(row)
            m, sd = row["metrics"], row["spread"]
            click.echo(f"bench quality: {name}: {row['row']} over seeds {row['seeds']}: "
                       f"R@10 {m['recall@10']:.4f} ± {sd['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} "
                       f"± {sd['ndcg@10']:.4f} ({row['train_seconds']:.0f} s training)")
        results[name] = {"sid_metrics": prepared["sid_metrics"], "rows": rows}
    command = quality.command()
    measured = machine()
    for result in results.values():  # each data set and row says which run produced it
        result.update(command=command, machine=measured, run=dataclasses.asdict(quality))
        for row in result["rows"]:
            row.update(command=command, machine=measured)
    if output is None:
        results = with_earlier_rows(RESULTS_DIR / "quality.json", results, "variant", ROW_ORDER)
        results = with_earlier_datasets(RESULTS_DIR / "quality.json", results, ("command", "machine", "run"))
    report = {"benchmark": "quality", "command": command, "machine": measured,
              "run": dataclasses.asdict(quality), "datasets": results,
              "protocol": "leave-one-out, full catalogue, earlier items excluded, histories capped at 20",
              "anchors_beauty": {"TIGER": {"recall@10": 0.0648, "ndcg@10": 0.0384},
                                 "tuned SASRec": {"recall@10": 0.0740, "ndcg@10": 0.0423}}}
    path = write_result("quality", report, output)
    for name, result in results.items():  # the rows are written: their seeds need no keeping
        if name in quality.datasets:
            for row in result["rows"]:
                if row["variant"] in quality.variants:
                    records.clear(name, row["variant"], quality.seeds)
    if output is None:
        update_benchmarks_table("quality", readme_table(report))
    click.echo(f"bench quality: wrote {path}")
    return report


def _cell(row: dict[str, Any], metric: str) -> str:
    mean = row["metrics"][metric]
    return f"{mean:.4f} ± {row['spread'][metric]:.4f}" if "spread" in row else f"{mean:.4f}"


def readme_table(report: dict[str, Any]) -> str:
    """Mean ± sample standard deviation over each row's seeds; a row without seeds is an earlier
    protocol's single run (SASRec on the last window only, PLUM recipes screened on test figures)."""
    lines = ["| data set | model | seeds | Recall@5 | Recall@10 | NDCG@5 | NDCG@10 | effective vocabulary | "
             "tuning runs (wall clock s) | training (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    earlier = False
    for name, result in report["datasets"].items():
        for row in result["rows"]:
            seeds = ", ".join(map(str, row["seeds"])) if "seeds" in row else "earlier protocol*"
            earlier |= "seeds" not in row
            tuning = row.get("tuning")
            tuned = f"{tuning['runs']} ({tuning['wall_clock_s']:.0f})" if tuning else ""
            vocabulary = row["metrics"].get("effective_vocabulary", "")
            vocabulary = f"{vocabulary:.0f}" if isinstance(vocabulary, float) else vocabulary
            lines.append(f"| {name} | {row['row']} | {seeds} | {_cell(row, 'recall@5')} | {_cell(row, 'recall@10')} | "
                         f"{_cell(row, 'ndcg@5')} | {_cell(row, 'ndcg@10')} | {vocabulary} | {tuned} | "
                         f"{row['train_seconds']:.0f} |")
    lines.append("")
    if earlier:
        lines.append("\\* A single run under the earlier protocol, kept until its row is re-measured: SASRec trained "
                     "on each sequence's last window only; PLUM recipes partly chosen from test figures.")
        lines.append("")
    lines += provenance_lines(report, by_row=True)
    lines.append("Tuning runs: the row's validation-only search in the same run (SASRec: coordinate search over "
                 "its grid); PLUM rows run a fixed recipe. Settings, per-seed figures and every trial in "
                 "ops/bench/results/quality.json.")
    return "\n".join(lines) + "\n"
