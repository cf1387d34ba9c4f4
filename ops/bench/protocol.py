"""The standard protocol's data for quality benchmarks: a data set's leave-one-out split, the reward
of every event, and co-occurrences counted over the training part only (no test item leaks into
the SIDs), plus the R1 generative-retrieval run shared by `bench quality` and `bench sid`."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from ingest.config import RewardConfig
from ingest.datasets import Dataset, to_events
from ingest.state_store import PipelineStateStore
from ops.config import PlumConfig
from ops.datasets import load_dataset
from trainer.data import Catalogue, RewardedSequences
from trainer.evaluate import EvalSet, Split, UserSequences, leave_one_out, sequences_from_events
from trainer.retrieval import Recommender, RetrievalSettings, evaluate, init_model, train_stages
from trainer.vocab import VocabLayout

MAX_HISTORY = 20


@dataclass(frozen=True, eq=False)
class ProtocolData:
    """One data set under the protocol: the split, rewards aligned with it, training co-occurrences."""

    dataset: Dataset
    sequences: UserSequences
    split: Split
    train: RewardedSequences
    test_rewards: list[list[float]]
    train_pairs: list[tuple[str, str, int]]


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


def _training_dataset(ds: Dataset, split: Split, sequences: UserSequences) -> Dataset:
    """The data set restricted to each user's training events (everything before the validation item)."""
    user_index = {u: k for k, u in enumerate(sequences.user_ids)}
    seen: dict[int, int] = {}
    keep = []
    for user in ds.interactions["user_id"].to_numpy():
        u = user_index[user]
        seen[u] = seen.get(u, 0) + 1
        keep.append(seen[u] <= len(split.train[u]))
    return Dataset(ds.name, ds.interactions[np.array(keep)], ds.items, ds.rating_scale, ds.has_real_time)


def prepare(name: str, cfg: PlumConfig, max_history: int = MAX_HISTORY) -> ProtocolData:
    """Load a data set and split it; rewards by the configured reward function."""
    ds = load_dataset(name, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    frame = ds.interactions
    sequences = sequences_from_events(frame["user_id"], frame["item_id"], frame["timestamp"], ds.items["item_id"])
    split = leave_one_out(sequences, max_history)
    users = {u: k for k, u in enumerate(sequences.user_ids)}
    items = {i: k for k, i in enumerate(sequences.item_ids)}
    reward_of = {(users[e.user_id], items[e.item_id]): e.reward(cfg.pipeline.reward) for e in to_events(ds)}
    train = RewardedSequences(split.train, tuple(np.array([reward_of[(u, int(i))] for i in seq], np.float32)
                                                 for u, seq in enumerate(split.train)))
    test_rewards = [[reward_of[(int(u), int(i))] for i in h] for u, h in zip(split.test.users, split.test.histories)]
    train_ds = _training_dataset(ds, split, sequences)
    # Pairs seen at least twice: a single co-occurrence is mostly noise (as in `bench sid`).
    pairs = [(a, b, n) for a, b, n in cooccurrences(train_ds, cfg.pipeline.cooccurrence_window) if n >= 2]
    return ProtocolData(ds, sequences, split, train, test_rewards, pairs)


def test_sample(data: ProtocolData, users: int | None) -> tuple[EvalSet, list[list[float]]]:
    """The first `users` test users (all when None)."""
    test = data.split.test
    n = len(test.targets) if users is None else min(users, len(test.targets))
    return (EvalSet(test.users[:n], test.histories[:n], test.targets[:n], test.seen[:n]), data.test_rewards[:n])


def retrieval_row(settings: RetrievalSettings, layout: VocabLayout, catalogue: Catalogue, data: ProtocolData,
                  gguf: Path | None = None, bos_eos: tuple[int, int] | None = None, eval_users: int | None = None,
                  invalid_rate_users: int = 1000) -> dict[str, Any]:
    """Train (CPT if asked, then SFT) and evaluate on the test users; settings, metrics and timings."""
    started = time.monotonic()
    model = init_model(settings, layout, gguf, bos_eos)
    model, histories = train_stages(model, settings, layout, catalogue, data.train, say=click.echo)
    trained = time.monotonic() - started
    eval_set, rewards = test_sample(data, eval_users)
    metrics, _ = evaluate(Recommender(model, layout, catalogue, settings.max_history), eval_set, rewards,
                          settings.beam_width, settings.eval_batch, invalid_rate_users=invalid_rate_users)
    return {"settings": dataclasses.asdict(settings), "model": dataclasses.asdict(model.cfg), "metrics": metrics,
            "train_seconds": round(trained, 1), "eval_seconds": round(time.monotonic() - started - trained, 1),
            "final_loss": {stage: h[-1]["loss"] for stage, h in histories.items()}}
