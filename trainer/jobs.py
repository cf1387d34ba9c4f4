"""The trainer's jobs over the running system's data: the training log (events with rewards), the
newest SID table and the catalogue's titles become a corpus; CPT on it writes a checkpoint.

Where the inputs come from (files, Feast) is the caller's business; this module gets DataFrames
and a SID table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pandas as pd
from flax import nnx

from tokenizer.sid_table import SIDTable
from trainer.checkpoint import load_model, save_model
from trainer.config import TrainerSettings
from trainer.data import Catalogue, RewardedSequences
from trainer.evaluate import EvalSet, UserSequences, leave_one_out
from trainer.retrieval import (
    Recommender, RetrievalSettings, evaluate, init_model, make_catalogue, text_vocabulary, train_stages,
)
from trainer.stream import position_covered, watermark_positions
from trainer.vocab import VocabLayout, suffix_capacity

Say = Callable[[str], None]
PROMPT_FORMAT = "behaviour-v1"  # <bos> [<ctx> features] <hist> SID r SID r ... (trainer/data.py)


class TrainingDataError(Exception):
    """The training data cannot make a corpus (no events, no SIDs for the items)."""


@dataclass(frozen=True)
class Corpus:
    """Everything a training stage needs, with where it came from."""

    layout: VocabLayout
    catalogue: Catalogue
    item_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    sequences: RewardedSequences
    positions: tuple[np.ndarray, ...]  # per user [n, 3]: each event's (kafka partition, log epoch, offset), in sequence order
    sid_version: int
    watermark: dict[str, Any]


def build_corpus(log: pd.DataFrame, table: SIDTable, titles: dict[str, str], encode: Callable[[str], list[int]],
                 layout: VocabLayout | None = None) -> Corpus:
    """Per-user sequences (event time order, then partition offset) of the items that have a SID.

    Without `layout` the vocabulary is made for this corpus (CPT); with one (a checkpoint's), the
    corpus is written in it, and a SID that does not fit it is an error.
    """
    if "log_epoch" not in log:  # frames of logs written before log epochs: all epoch 0
        log = log.assign(log_epoch=0)
    if log.empty:
        raise TrainingDataError("The training log is empty: replay events and run `plum pipeline` first.")
    item_ids = tuple(sorted(table.codes))
    index = {item: k for k, item in enumerate(item_ids)}
    known = log["item_id"].isin(index)
    if not known.any():
        raise TrainingDataError(f"No logged item has a SID in version {table.version}; run `plum tokenize assign`.")
    events = log[known].sort_values(["user_id", "event_time", "kafka_partition", "kafka_offset"], kind="stable")
    users, sequences, rewards, positions = [], [], [], []
    for user, group in events.groupby("user_id", sort=True):
        users.append(str(user))
        sequences.append(group["item_id"].map(index).to_numpy(np.int32))
        rewards.append(group["reward"].to_numpy(np.float32))
        positions.append(group[["kafka_partition", "log_epoch", "kafka_offset"]].to_numpy(np.int64))
    encoded = [encode(titles.get(item) or "") if titles.get(item) else [] for item in item_ids]
    if layout is None:
        layout = VocabLayout(tuple(table.codebook_sizes), suffix_capacity(table.suffix_size),
                             text_ids=text_vocabulary(encoded))
    elif layout.codebook_sizes != tuple(table.codebook_sizes) or layout.suffix_size < table.suffix_size:
        raise TrainingDataError(f"SID version {table.version} ({table.codebook_sizes}, {table.suffix_size} suffixes) "
                                "does not fit the checkpoint's vocabulary; run `plum train cpt` on it first.")
    sids = np.array([table.sid(item) for item in item_ids], np.int64)
    watermark = {"event_time": log["event_time"].max().isoformat(), "events": int(len(log)),
                 **watermark_positions(log[["kafka_partition", "log_epoch", "kafka_offset"]].itertuples(index=False))}
    return Corpus(layout, make_catalogue(layout, sids, encoded), item_ids, tuple(users),
                  RewardedSequences(tuple(sequences), tuple(rewards)), tuple(positions), table.version, watermark)


def _retrieval_settings(settings: TrainerSettings, cpt_steps: int, sft_steps: int) -> RetrievalSettings:
    """The trainer config as the settings of one stage (the other stage's steps set to 0)."""
    return RetrievalSettings(model_size=settings.model_size, init=settings.init, keep_layers=settings.keep_layers,
                             cpt_steps=cpt_steps, sft_steps=sft_steps, batch_size=settings.batch_size,
                             learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
                             max_history=settings.max_history, seed=settings.seed, dropout=settings.dropout,
                             weight_decay=settings.weight_decay)


def holdout_last(corpus: Corpus, max_history: int) -> tuple[RewardedSequences, EvalSet, list[np.ndarray]]:
    """Leave-one-out for a one-shot SFT: each user's last event is held out for evaluation, the
    second-to-last for validation (unused here), the rest trains. Returns (train, test, test rewards)."""
    split = leave_one_out(UserSequences(np.array(corpus.user_ids, object), np.array(corpus.item_ids, object),
                                        corpus.sequences.items), max_history)
    rewards = corpus.sequences.rewards
    train = RewardedSequences(split.train, tuple(r[:len(t)] for r, t in zip(rewards, split.train)))
    test = split.test
    test_rewards = [rewards[u][len(corpus.sequences.items[u]) - 1 - len(h):len(corpus.sequences.items[u]) - 1]
                    for u, h in zip(test.users, test.histories)]
    return train, test, test_rewards


def beyond_watermark(corpus: Corpus, users: np.ndarray, watermark: dict[str, Any] | None) -> np.ndarray | None:
    """Per user (rows of the corpus), whether its last event lies beyond a checkpoint's data watermark
    (a later (log epoch, offset) than the watermark's in its partition, or a partition it has none
    for): events the checkpoint's corpus did not contain. None when the watermark records no offsets."""
    if not watermark or "offsets" not in watermark:
        return None
    return np.array([not position_covered(watermark, *corpus.positions[u][-1]) for u in users], bool)


def run_sft(target: Path, cpt_dir: Path, corpus: Corpus, settings: TrainerSettings, say: Say = print) -> Path:
    """SFT from a CPT checkpoint on the corpus (written in the checkpoint's vocabulary), evaluated on
    each user's held-out last event where the CPT checkpoint's corpus did not contain it (at most
    `eval_users` users; none: no figure, said so), written as a checkpoint."""
    model, parent = load_model(cpt_dir)
    retrieval = _retrieval_settings(settings, cpt_steps=0, sft_steps=settings.sft_steps)
    train, test, test_rewards = holdout_last(corpus, settings.max_history)
    fresh = beyond_watermark(corpus, test.users, parent.get("data_watermark"))
    unseen = np.zeros(len(test.targets), bool) if fresh is None else fresh
    say(f"train sft: from {cpt_dir}, {len(train.items):,} users, {len(test.targets):,} held-out last events, "
        f"{int(unseen.sum()):,} of them newer than the CPT checkpoint's corpus")
    model, histories = train_stages(model, retrieval, corpus.layout, corpus.catalogue, train, say)
    protocol = "each user's last event held out, where the CPT checkpoint's corpus did not contain it"
    if not unseen.any():
        why = ("the CPT checkpoint records no data watermark offsets to tell its events by" if fresh is None else
               f"every user's last event is in the CPT checkpoint's corpus (its data watermark: "
               f"{parent['data_watermark'].get('event_time')}); log newer events, then run `plum train sft` again")
        say(f"train sft: no held-out figure: {why}")
        evaluation: dict[str, Any] = {"protocol": protocol, "users": 0, "not_evaluated": why}
    else:
        sample = test.where(unseen).head(settings.eval_users)
        rows = np.flatnonzero(unseen)[:len(sample.targets)]
        metrics, _ = evaluate(Recommender(model, corpus.layout, corpus.catalogue, settings.max_history), sample,
                              [test_rewards[r] for r in rows], retrieval.beam_width, retrieval.eval_batch,
                              invalid_rate_users=len(sample.targets))
        say(f"train sft: held-out ({len(sample.targets):,} users' last events newer than the CPT checkpoint's "
            "corpus) " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        evaluation = {"protocol": protocol, **metrics}
    manifest = {**{k: parent[k] for k in ("vocabulary", "sid_version", "prompt_schema") if k in parent},
                "stage": "sft", "item_ids": list(corpus.item_ids), "data_watermark": corpus.watermark,
                "eval": evaluation,
                "training": {"settings": settings.model_dump(mode="json"), "final_loss": histories["sft"][-1]["loss"]},
                "parent_checkpoint": str(cpt_dir)}
    return save_model(target, model, manifest)


def run_cpt(target: Path, corpus: Corpus, settings: TrainerSettings, gguf_path: Path | None,
            bos_eos: tuple[int, int] | None, say: Say = print) -> Path:
    """Continued pre-training from random init or SmolLM2, written as a checkpoint at `target`."""
    retrieval = _retrieval_settings(settings, cpt_steps=settings.cpt_steps, sft_steps=0)
    model = init_model(retrieval, corpus.layout, gguf_path, bos_eos)
    say(f"train cpt: {len(corpus.user_ids):,} users, {len(corpus.item_ids):,} items, SID version "
        f"{corpus.sid_version}, vocabulary {corpus.layout.size:,}, {settings.init} init, "
        f"{sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters")
    model, histories = train_stages(model, retrieval, corpus.layout, corpus.catalogue, corpus.sequences, say)
    manifest = {
        "stage": "cpt", "vocabulary": corpus.layout.to_json(), "sid_version": corpus.sid_version,
        "item_ids": list(corpus.item_ids),
        "prompt_schema": {"format": PROMPT_FORMAT, "max_history": settings.max_history, "features": []},
        "data_watermark": corpus.watermark, "eval": {}, "training": {"settings": settings.model_dump(mode="json"),
                                                                       "final_loss": histories["cpt"][-1]["loss"]},
        "parent_checkpoint": "smollm2-135m" if settings.init == "smollm2" else None,
        "retrieval_settings": dataclasses.asdict(retrieval),
    }
    return save_model(target, model, manifest)
