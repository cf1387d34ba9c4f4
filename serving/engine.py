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

from trainer.checkpoint import read_manifest
from trainer.evaluate import top_k_excluding
from trainer.retrieval import Recommender
from trainer.sasrec import score_users
from trainer.servable import DECODER, SASREC, ItemCatalogue, load_sasrec_version, load_version, recorded_beam_width
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
    kind = manifest.get("kind", DECODER)
    if kind == SASREC:
        return
    if kind != DECODER:
        raise IncompatibleVersion(f"model kind {kind!r} is not one of {DECODER!r}, {SASREC!r}")
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
    """A version's decoder, catalogue and prompt schema, ready to answer batches of requests.

    It searches with the beam width its manifest records (the search its gates judged), capped at
    `beam_width` (serving.beam_width); a manifest that records none gets `beam_width`.
    `recorded_beam_width` keeps the manifest's figure, so the server can say when the two differ."""

    def __init__(self, model_dir: Path, version: int, beam_width: int) -> None:
        model, manifest, item_ids, sids = load_version(model_dir, version)
        check_manifest(manifest)
        self.version, self.manifest = version, manifest
        self.recorded_beam_width = recorded_beam_width(manifest)
        self.beam_width = min(self.recorded_beam_width or beam_width, beam_width)
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


class DotProductVersion:
    """A SASRec version: the user's history -> SASRec's last hidden state -> dot product with every
    item embedding -> top-k (seen items excluded). The reference an embedding-table system serves."""

    def __init__(self, model_dir: Path, version: int) -> None:
        self.model, self.manifest, item_ids = load_sasrec_version(model_dir, version)
        self.version = version
        self.items = ItemCatalogue(tuple(item_ids), {i: k for k, i in enumerate(item_ids)},
                                   np.zeros((len(item_ids), 0), np.int64), None, 0)  # type: ignore[arg-type]

    def warm_up(self, max_batch: int) -> None:
        for size in BATCH_BUCKETS:
            if size > batch_bucket(max_batch):
                break
            score_users(self.model, [np.zeros(0, np.int32)] * size, batch_size=size)

    def recommend(self, requests: Sequence[Request], histories: Sequence[tuple[Sequence[str], Sequence[float]]]
                  ) -> list[Recommendation]:
        index = self.items.index
        known = [np.array([index[i] for i in items if i in index], np.int32) for items, _ in histories]
        scores = score_users(self.model, known, batch_size=batch_bucket(len(requests)))
        k = max(r.k for r in requests)
        exclude = [seen if r.exclude_seen else np.zeros(0, np.int32) for r, seen in zip(requests, known)]
        ranked = top_k_excluding(scores, k, exclude)
        out = []
        for request, row, row_scores in zip(requests, ranked, scores):
            kept = [int(i) for i in row if i >= 0][:request.k]
            out.append(Recommendation(tuple(self.items.item_ids[i] for i in kept), tuple(() for _ in kept),
                                      tuple(float(row_scores[i]) for i in kept), self.version))
        return out


def load_servable(model_dir: Path, version: int, beam_width: int) -> ServableVersion | DotProductVersion:
    """The servable of a version directory, by its manifest's kind (beam_width: serving's cap, see
    ServableVersion)."""
    manifest = read_manifest(Path(model_dir) / str(version))
    check_manifest(manifest)
    if manifest.get("kind", DECODER) == SASREC:
        return DotProductVersion(model_dir, version)
    return ServableVersion(model_dir, version, beam_width)
