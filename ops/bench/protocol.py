"""The standard protocol's data for quality benchmarks: a data set's leave-one-out split, the reward
of every event, and co-occurrences counted over the training part only (no test item leaks into
the SIDs), plus the R1 generative-retrieval run shared by `bench quality` and `bench sid`."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import click
import numpy as np
import pandas as pd

from ingest.config import RewardConfig
from ingest.datasets import Dataset, to_events
from ingest.events import EngagementEvent
from ingest.folds import UserFoldSettings
from ingest.state_store import PipelineStateStore
from ops.config import PlumConfig
from ops.datasets import load_dataset
from trainer.data import Catalogue, RewardedSequences
from trainer.evaluate import EvalSet, Split, UserSequences, leave_one_out, sequences_from_events
from trainer.retrieval import Recommender, RetrievalSettings, Validation, evaluate, init_model, train_stages
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
    valid_rewards: list[list[float]]
    train_pairs: list[tuple[str, str, int]]


def cooccurrences(events: Iterable[EngagementEvent], window: int) -> list[tuple[str, str, int]]:
    """The pipeline state store's co-occurrence counts for these events (in event-time order)."""
    with tempfile.TemporaryDirectory() as tmp:
        # Every event counts, however late: a data set is not a stream that can deliver duplicates late.
        folding = UserFoldSettings(RewardConfig(), cooccurrence_window=window, retention_s=2**40)
        store = PipelineStateStore(Path(tmp) / "state.db", folding)
        batch: list = []
        for event in events:
            batch.append(event)
            if len(batch) == 10_000:
                store.begin()
                store.apply_events(batch)
                store.commit()
                batch = []
        if batch:
            store.begin()
            store.apply_events(batch)
            store.commit()
        pairs = store.cooccurrence()
        store.close()
    return pairs


def catalogue_frame(ds: Dataset) -> pd.DataFrame:
    """The data set's items as the tokenizer's jobs take them (published_at in unix seconds or None)."""
    items = ds.items
    return pd.DataFrame({
        "item_id": items["item_id"], "title": items["title"], "tags": items["tags"],
        "published_at": [None if pd.isna(t) else int(t.timestamp()) for t in items["published_at"]],
    })


def _training_events(events: list[EngagementEvent], split: Split, sequences: UserSequences
                     ) -> list[EngagementEvent]:
    """Each user's training events (everything before the validation item), in the given order."""
    user_index = {u: k for k, u in enumerate(sequences.user_ids)}
    seen: dict[int, int] = {}
    kept = []
    for event in events:
        u = user_index[event.user_id]
        seen[u] = seen.get(u, 0) + 1
        if seen[u] <= len(split.train[u]):
            kept.append(event)
    return kept


def prepare(name: str, cfg: PlumConfig, max_history: int = MAX_HISTORY) -> ProtocolData:
    """Load a data set and split it; rewards by the configured reward function."""
    ds = load_dataset(name, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    frame = ds.interactions
    sequences = sequences_from_events(frame["user_id"], frame["item_id"], frame["timestamp"], ds.items["item_id"])
    split = leave_one_out(sequences, max_history)
    users = {u: k for k, u in enumerate(sequences.user_ids)}
    items = {i: k for k, i in enumerate(sequences.item_ids)}
    events = list(to_events(ds))  # interactions order: event time, ties as sequences_from_events keeps them
    reward_of = {(users[e.user_id], items[e.item_id]): e.reward(cfg.pipeline.reward) for e in events}
    train = RewardedSequences(split.train, tuple(np.array([reward_of[(u, int(i))] for i in seq], np.float32)
                                                 for u, seq in enumerate(split.train)))
    test_rewards, valid_rewards = ([[reward_of[(int(u), int(i))] for i in h] for u, h in zip(side.users, side.histories)]
                                   for side in (split.test, split.valid))
    # Pairs seen at least twice: a single co-occurrence is mostly noise (as in `bench sid`).
    pairs = [(a, b, n) for a, b, n in cooccurrences(_training_events(events, split, sequences),
                                                    cfg.pipeline.cooccurrence_window) if n >= 2]
    return ProtocolData(ds, sequences, split, train, test_rewards, valid_rewards, pairs)


def test_sample(data: ProtocolData, users: int | None) -> tuple[EvalSet, list[list[float]]]:
    """The first `users` test users (all when None)."""
    sample = data.split.test.head(users)
    return sample, data.test_rewards[:len(sample.targets)]


def retrieval_row(settings: RetrievalSettings, layout: VocabLayout, catalogue: Catalogue, data: ProtocolData,
                  gguf: Path | None = None, bos_eos: tuple[int, int] | None = None, eval_users: int | None = None,
                  invalid_rate_users: int = 1000, codebooks: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Train (CPT if asked, then SFT) and evaluate on the test users; settings, metrics and timings.
    `codebooks`: the SID table's RQ-VAE codebooks, for settings.sid_init == "codebook"."""
    started = time.monotonic()
    model = init_model(settings, layout, gguf, bos_eos, codebooks)
    validation = Validation(data.split.valid, data.valid_rewards)
    model, histories = train_stages(model, settings, layout, catalogue, data.train, say=click.echo,
                                    validation=validation)
    trained = time.monotonic() - started
    eval_set, rewards = test_sample(data, eval_users)
    metrics, _ = evaluate(Recommender(model, layout, catalogue, settings.max_history), eval_set, rewards,
                          settings.beam_width, settings.eval_batch, invalid_rate_users=invalid_rate_users)
    row = {"settings": dataclasses.asdict(settings), "model": dataclasses.asdict(model.cfg), "metrics": metrics,
           "train_seconds": round(trained, 1), "eval_seconds": round(time.monotonic() - started - trained, 1),
           "final_loss": {stage: histories[stage][-1]["loss"] for stage in ("cpt", "sft") if stage in histories},
           # real (not padding) tokens per padded token in the training batches, averaged over the progress rows
           "real_token_share": {stage: round(float(np.mean([r["real_share"] for r in histories[stage]])), 3)
                                for stage in ("cpt", "sft") if stage in histories}}
    if "sft_selection" in histories:
        row["validation"] = histories["sft_selection"]
    return row
