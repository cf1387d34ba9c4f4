"""Changing a trained model's vocabulary at a checkpoint boundary, keeping what it has learned.

Two reasons (trainer/continuous.py): a feature team registers a context feature (its tokens are
appended; every existing row keeps its id), or the tokenizer is refitted into a new SID version
(the SID section changes meaning). Each token of the new layout starts from the rows of old tokens
that meant the same thing:

- specials, reward buckets, text tokens (by BPE id) and feature tokens (by feature name and value
  or bucket) copy their old row;
- a SID token of a new version (level l, code c) starts from the mean of the old level-l rows of
  the items whose new level-l code is c, so an item's new SID begins near where its old SID was;
  a suffix token copies the old suffix token of the same index;
- anything else (a new feature's tokens, a code no item uses) is a fresh row: the mean row plus
  a little noise (warm_start.new_rows), as for the SID rows of the CPT warm start.

Adam's moments move with their rows; a fresh or averaged row starts with zero moments.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from trainer.vocab import SPECIALS, VocabLayout
from trainer.warm_start import new_rows

Sources = list[list[int]]  # per new token id: the old token ids whose rows it starts from ([] = fresh)


def token_sources(old: VocabLayout, new: VocabLayout, old_sids: Mapping[str, Sequence[int]] | None = None,
                  new_sids: Mapping[str, Sequence[int]] | None = None) -> Sources:
    """Where each token of `new` takes its row from. Without SIDs per item, SID tokens are copied
    by (position, code) (same SID version); with them, they are averaged over the items (refit)."""
    sources: Sources = [[] for _ in range(new.size)]
    for token in range(len(SPECIALS)):
        sources[token] = [token]
    if new.reward_buckets == old.reward_buckets:
        for b in range(new.reward_buckets):
            sources[new.reward_offset + b] = [old.reward_offset + b]
    old_text = {orig: old.text_offset + k for k, orig in enumerate(old.text_ids)}
    for k, orig in enumerate(new.text_ids):
        if orig in old_text:
            sources[new.text_offset + k] = [old_text[orig]]
    old_features = {spec.name: (spec, offset) for spec, offset in zip(old.features, old.feature_offsets)}
    for spec, offset in zip(new.features, new.feature_offsets):
        if spec.name in old_features:
            before, before_offset = old_features[spec.name]
            for local in range(spec.size):
                match = _same_feature_token(before, spec, local)
                if match is not None:
                    sources[offset + local] = [before_offset + match]
    depth, old_depth = len(new.codebook_sizes), len(old.codebook_sizes)
    if old_sids is None or new_sids is None:
        for level in range(min(depth, old_depth)):
            for code in range(min(new.codebook_sizes[level], old.codebook_sizes[level])):
                sources[new.sid_offsets[level] + code] = [old.sid_offsets[level] + code]
    else:
        pooled: dict[tuple[int, int], set[int]] = defaultdict(set)
        for item, sid in new_sids.items():
            if item in old_sids:
                for level in range(min(depth, old_depth)):
                    pooled[(level, int(sid[level]))].add(old.sid_offsets[level] + int(old_sids[item][level]))
        for (level, code), rows in pooled.items():
            sources[new.sid_offsets[level] + code] = sorted(rows)
    for code in range(min(new.suffix_size, old.suffix_size)):
        sources[new.sid_offsets[depth] + code] = [old.sid_offsets[old_depth] + code]
    return sources


def _same_feature_token(old, new, local: int) -> int | None:
    """The old feature-local index meaning the same as `local` in the new spec, if any."""
    if old.kind != new.kind:
        return None
    if new.kind == "categorical":
        if local == 0:
            return 0  # unknown value
        value = new.values[local - 1]
        return old.values.index(value) + 1 if value in old.values else None
    return local if old.edges == new.edges else None


def _rows(table: np.ndarray, sources: Sources, fresh: np.ndarray) -> np.ndarray:
    out = np.empty((len(sources), table.shape[1]), table.dtype)
    for token, rows in enumerate(sources):
        out[token] = table[rows].mean(axis=0) if rows else fresh[token]
    return out


def resize_state(state: dict[Any, Any], old_size: int, sources: Sources, seed: int = 0) -> dict[Any, Any]:
    """The TrainLoop state dict (model under key 0, optimizer under key 1) with every vocabulary-sized
    table re-rowed for the new layout: the embedding [V, D] and an untied output head [D, V]."""
    rng = np.random.default_rng(seed)

    def visit(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, (*path, k)) for k, v in node.items()}
        array = np.asarray(node)
        is_model = path[0] == 0
        if path[-2:] == ("embed", "embedding") and array.shape[0] == old_size:
            fresh = new_rows(array, len(sources), rng) if is_model else np.zeros((len(sources), array.shape[1]),
                                                                                 array.dtype)
            return _rows(array, sources, fresh)
        if path[-2:] == ("lm_head", "kernel") and array.shape[-1] == old_size:
            fresh = new_rows(array.T, len(sources), rng) if is_model else np.zeros((len(sources), array.shape[0]),
                                                                                   array.dtype)
            return _rows(array.T, sources, fresh).T
        return node

    return visit(state, ())
