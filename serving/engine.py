"""One loaded servable version: requests in, items out (the shared decoding module does the search).

A request names a user and k; the user's history comes from the Feast online store unless the
request overrides it. The prompt is built from the version's own manifest (its vocabulary and
prompt schema: history length, context features), so versions with different schemas serve side
by side. A user with no history gets context-only generation: the prompt `<bos> [<ctx> ...] <hist>`
with nothing after it, i.e. the model's most likely next items for anyone in that context (in
practice the items popular in the training stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.retrieval import Recommender
from trainer.servable import ItemCatalogue, load_version
from trainer.vocab import VocabLayout

SUPPORTED_PROMPT_FORMATS = ("behaviour-v1",)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class IncompatibleVersion(Exception):
    """A version directory this server cannot serve (its manifest says why)."""


@dataclass(frozen=True)
class Request:
    """One user's recommendation request (already validated)."""

    user_id: str
    k: int
    history: tuple[str, ...] | None = None  # overrides the online store's history
    rewards: tuple[float, ...] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    exclude_seen: bool = True


@dataclass(frozen=True)
class Recommendation:
    item_ids: tuple[str, ...]
    sids: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...]
    version: int


def check_manifest(manifest: dict[str, Any]) -> None:
    """Refuse a version whose manifest this server cannot build prompts for."""
    for key in ("vocabulary", "prompt_schema", "model_config", "sid_version"):
        if key not in manifest:
            raise IncompatibleVersion(f"its manifest has no {key!r}")
    fmt = manifest["prompt_schema"].get("format")
    if fmt not in SUPPORTED_PROMPT_FORMATS:
        raise IncompatibleVersion(f"prompt format {fmt!r} is not one of {', '.join(SUPPORTED_PROMPT_FORMATS)}")
    try:
        VocabLayout.from_json(manifest["vocabulary"])
    except (KeyError, ValueError, TypeError) as exc:
        raise IncompatibleVersion(f"its vocabulary cannot be read: {exc}") from None


def batch_bucket(n: int) -> int:
    for size in BATCH_BUCKETS:
        if n <= size:
            return size
    return BATCH_BUCKETS[-1]


class ServableVersion:
    """A version's decoder, catalogue and prompt schema, ready to answer batches of requests."""

    def __init__(self, model_dir: Path, version: int, beam_width: int) -> None:
        model, manifest, item_ids, sids = load_version(model_dir, version)
        check_manifest(manifest)
        self.version, self.manifest, self.beam_width = version, manifest, beam_width
        self.layout = VocabLayout.from_json(manifest["vocabulary"])
        self.items = ItemCatalogue.build(self.layout, item_ids, sids)
        if not self.items.item_ids:
            raise IncompatibleVersion("its catalogue holds no item with a SID that fits its vocabulary")
        self.max_history = int(manifest["prompt_schema"].get("max_history", 20))
        self.features = [f["name"] for f in manifest["prompt_schema"].get("features", [])]
        self.recommender = Recommender(model, self.layout, self.items.catalogue, self.max_history)

    def warm_up(self, max_batch: int) -> None:
        """Compile the search for every batch shape the batcher can send, before taking traffic."""
        for size in BATCH_BUCKETS:
            if size > batch_bucket(max_batch):
                break
            self.recommender.search([np.zeros(0, np.int32)] * size, [[]] * size, self.beam_width, size,
                                    exclude=[np.zeros(0, np.int64)] * size)

    def recommend(self, requests: Sequence[Request], histories: Sequence[tuple[Sequence[str], Sequence[float]]]
                  ) -> list[Recommendation]:
        """Top-k per request; `histories` are (item ids, rewards) per request, oldest first."""
        index = self.items.index
        prompts, rewards, exclude = [], [], []
        for request, (items, item_rewards) in zip(requests, histories):
            pairs = [(index[i], r) for i, r in zip(items, item_rewards) if i in index]
            prompts.append(np.array([p[0] for p in pairs[-self.max_history:]], np.int32))
            rewards.append([p[1] for p in pairs[-self.max_history:]])
            exclude.append(np.array([p[0] for p in pairs], np.int64) if request.exclude_seen else np.zeros(0, np.int64))
        size = batch_bucket(len(requests))
        beams, scores = self.recommender.search(prompts, rewards, self.beam_width, size,
                                                contexts=[r.context for r in requests], exclude=exclude)
        out = []
        for request, row, row_scores in zip(requests, beams, scores):
            kept = [(int(i), float(s)) for i, s in zip(row, row_scores) if i >= 0][:request.k]
            out.append(Recommendation(tuple(self.items.item_ids[i] for i, _ in kept),
                                      tuple(tuple(int(c) for c in self.items.sids[i]) for i, _ in kept),
                                      tuple(s for _, s in kept), self.version))
        return out
