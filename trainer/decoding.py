"""Beam search over Semantic ID tokens, constrained to a trie of valid SIDs (shared by eval and serving).

The engine knows nothing about tokenisation or the model: it sees token ids, a `SIDTrie` and a step function

    step_fn(tokens: int32 [N, T], mask: bool [N, T], cache) -> (logits float32 [N, T, V], new_cache)
    init_cache(N, max_len) -> cache

where the cache is a pytree whose leaves with ndim >= 1 carry the batch on axis 0 (0-d leaves are shared
scalars), so beams are reordered by indexing every such leaf with the same row index.

Jit it once per prompt shape with the model and the static settings bound, the trie passed as an argument:

    search = jax.jit(functools.partial(beam_search, step_fn, init_cache, beam_width=10))
    result = search(prompt_tokens, prompt_mask, trie)

Whatever `step_fn` closes over (model parameters) is baked into that compiled function; to swap parameters
without recompiling, jit a function that takes them and builds `step_fn` inside.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Cache = Any
StepFn = Callable[[jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]
InitCache = Callable[[int, int], Cache]


class BeamSteps(NamedTuple):
    """Decoding that shares each user's prompt cache among its beams (the model provides both):

    start(cache, beam_width, steps) -> beam cache, from the prefilled prompt cache;
    step(tokens int32 [B, W], parent int32 [B, W], beam cache) -> (logits [B, W, V], beam cache), where
    parent[b, w] is the beam that new beam w continues. Without it, beam_search copies every prompt's
    cache once per beam and reorders the copies at every step.
    """

    start: Callable[[Cache, int, int], Cache]
    step: Callable[[jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]


@jax.tree_util.register_pytree_node_class
class SIDTrie:
    """Every valid SID as dense per-depth child tables, ready for jitted decoding.

    `children[d]: int32 [n_nodes_d, width_d]` gives, for a node at depth d (depth 0 is the root, one node)
    and the local token `token - offset_d`, the child node at depth d + 1, or -1 where that token does not
    continue any valid SID. At the last depth D - 1 the entry is the item index instead: the position of the
    SID in the list the trie was built from (the caller maps it to an item id). Memory is
    sum_d n_nodes_d * width_d int32, never [n_nodes, vocabulary].

    The trie is immutable. When items are added (re-tokenisation gives new items SIDs from the frozen
    RQ-VAE) or a refit produces SID version v + 1, build a new trie from the full SID list and swap it in
    with the servable that uses it. A larger catalogue changes the table shapes and hence recompiles the
    jitted search once; `node_bucket` pads node counts to a multiple so that small growth keeps the shapes.

    The trie is a pytree (tables are leaves, ranges static), so it is passed straight into jitted code;
    `jax.device_put(trie)` moves the tables to the device once instead of on every call.
    """

    def __init__(self, sids: Sequence[tuple[int, ...]], ranges: Sequence[tuple[int, int]], node_bucket: int = 1):
        """Build from `sids` (token ids, all of depth D) and the per-depth token ranges `(offset_d, width_d)`."""
        ranges = tuple((int(offset), int(width)) for offset, width in ranges)
        if not ranges or any(offset < 0 or width < 1 for offset, width in ranges):
            raise ValueError(f"SID token ranges must be non-empty (offset >= 0, width >= 1) pairs, got {ranges}.")
        if node_bucket < 1:
            raise ValueError(f"node_bucket must be at least 1, got {node_bucket}.")
        depth = len(ranges)
        if len(sids) == 0:
            raise ValueError("A SID trie needs at least one SID; the catalogue is empty.")
        if any(len(sid) != depth for sid in sids):
            bad = next(sid for sid in sids if len(sid) != depth)
            raise ValueError(f"Every SID must have {depth} tokens (one per range), got {tuple(bad)}.")
        tokens = np.asarray(sids, dtype=np.int64).reshape(len(sids), depth)
        offsets = np.array([offset for offset, _ in ranges])
        widths = np.array([width for _, width in ranges])
        local = tokens - offsets
        out_of_range = (local < 0) | (local >= widths)
        if out_of_range.any():
            row, d = np.argwhere(out_of_range)[0]
            raise ValueError(
                f"SID {tuple(tokens[row].tolist())} has token {tokens[row, d]} at depth {d}, outside that depth's "
                f"range [{offsets[d]}, {offsets[d] + widths[d]}); check the vocabulary layout."
            )
        children = []
        parent = np.zeros(len(tokens), dtype=np.int64)  # node index of each SID's prefix at the current depth
        n_parents = 1
        for d, width in enumerate(widths):
            # a node at depth d + 1 is identified by (parent node, token): number the distinct pairs
            keys = parent * width + local[:, d]
            unique_keys, child, counts = np.unique(keys, return_inverse=True, return_counts=True)
            table = np.full((_round_up(n_parents, node_bucket) if d else 1, width), -1, dtype=np.int32)
            if d < depth - 1:
                table[parent, local[:, d]] = child
            else:
                if (counts > 1).any():
                    dup = tuple(tokens[np.flatnonzero(child == np.flatnonzero(counts > 1)[0])[0]].tolist())
                    raise ValueError(f"SID {dup} appears more than once; every item needs a distinct SID.")
                table[parent, local[:, d]] = np.arange(len(tokens))
            children.append(table)
            parent, n_parents = child, len(unique_keys)
        self.children: tuple[np.ndarray | jax.Array, ...] = tuple(children)
        self.ranges: tuple[tuple[int, int], ...] = ranges

    @property
    def depth(self) -> int:
        """D: the number of tokens in every SID."""
        return len(self.ranges)

    @property
    def vocab_start(self) -> int:
        """The smallest SID token id: logits from here to `vocab_end` are all the search reads."""
        return min(offset for offset, _ in self.ranges)

    @property
    def vocab_end(self) -> int:
        """One past the largest SID token id; the model's vocabulary must be at least this large."""
        return max(offset + width for offset, width in self.ranges)

    def item_of(self, sequence: Sequence[int]) -> int:
        """Host-side lookup: the item index of a full SID token sequence, or -1 if it is not a valid SID."""
        if len(sequence) != self.depth:
            return -1
        node = 0
        for table, (offset, width), token in zip(self.children, self.ranges, sequence):
            local = int(token) - offset
            if not 0 <= local < width:
                return -1
            node = int(table[node, local])  # one element, also from a device-resident table
            if node < 0:
                return -1
        return node

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[tuple[int, int], ...]]:
        """Pytree protocol: the tables are leaves, the ranges static (so equal shapes share a compilation)."""
        return self.children, self.ranges

    @classmethod
    def tree_unflatten(cls, ranges: tuple[tuple[int, int], ...], children: Sequence[Any]) -> "SIDTrie":
        """Pytree protocol: rebuild around new leaves (tracers, device arrays) without re-validating."""
        trie = object.__new__(cls)
        trie.children, trie.ranges = tuple(children), ranges
        return trie


class BeamResult(NamedTuple):
    """Beams per user, best first. Beams that do not exist (fewer valid SIDs than beams) have score -inf,
    item -1 and tokens -1.

    sequences: int32 [B, beam_width, D] SID token ids.
    scores: float32 [B, beam_width] sum of the SID tokens' log-probabilities, each a log-softmax over its own
        SID position's tokens (the normaliser the SFT loss trains).
    items: int32 [B, beam_width] item index in the trie, -1 where the sequence is not a valid SID.
    """

    sequences: jax.Array
    scores: jax.Array
    items: jax.Array


def beam_search(
    step_fn: StepFn,
    init_cache: InitCache,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    trie: SIDTrie,
    beam_width: int,
    constrained: bool = True,
    max_len: int | None = None,
    banned: jax.Array | None = None,
    beams: BeamSteps | None = None,
    logits_offset: int = 0,
) -> BeamResult:
    """Top `beam_width` SIDs per user for left-padded prompts `[B, T]` (jittable; D steps unrolled).

    One prefill of the B prompts, then D selection steps over B * beam_width cache rows. Constrained: at depth
    d only tokens that continue a valid SID prefix may be chosen, so every live beam is a distinct item.
    Unconstrained: any token of the SID position may be chosen; items are looked up afterwards (-1 = invalid
    SID), which measures the model's invalid-SID rate. At every depth the log-probabilities are a softmax over
    that position's tokens only (the SFT loss's normaliser), so the step functions may return the logits of
    the SID rows alone: column c is token `logits_offset + c`. `max_len` is the cache length, at least T + D - 1 (the default).
    `banned: bool [B, n_items]` (constrained only) removes items per user: a prefix whose every item is
    banned is pruned as well, so a user's beams are spent only on items not banned (the items a user has
    already seen, when the caller excludes them). `beams`: decode the SID tokens with shared prompt caches
    (same results, far less memory traffic); the prefill cache then needs only T slots.
    """
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f"prompt_tokens and prompt_mask must both be [batch, length], got {prompt_tokens.shape} and "
            f"{prompt_mask.shape}."
        )
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}.")
    batch, length = prompt_tokens.shape
    needed = length if beams is not None else length + trie.depth - 1
    max_len = needed if max_len is None else max_len
    if max_len < needed:
        raise ValueError(f"max_len {max_len} cannot hold a {length}-token prompt plus a {trie.depth}-token SID.")

    logits, cache = step_fn(prompt_tokens.astype(jnp.int32), prompt_mask.astype(bool), init_cache(batch, max_len))
    vocab = logits.shape[-1]
    if trie.vocab_end > logits_offset + vocab or trie.vocab_start < logits_offset:
        raise ValueError(f"The SID ranges span tokens {trie.vocab_start}..{trie.vocab_end - 1} but the "
                         f"model gives logits of tokens {logits_offset}..{logits_offset + vocab - 1}.")
    blocked = _blocked_children(trie, banned) if banned is not None and constrained else None
    last_logits = logits[:, -1:, :].astype(jnp.float32)  # [B, beams_in=1, V]
    scores = jnp.zeros((batch, 1), jnp.float32)  # only one live beam per user before the first step
    nodes = jnp.zeros((batch, 1), jnp.int32)
    sequences = jnp.zeros((batch, 1, 0), jnp.int32)
    for d, (table, (offset, width)) in enumerate(zip(trie.children, trie.ranges)):
        beams_in = scores.shape[1]
        level = last_logits[..., offset - logits_offset:offset - logits_offset + width]  # [B, beams_in, width]
        # log-softmax over the position's tokens = logit - log-normaliser; ranking within a beam needs only logits
        beam_bias = scores - jax.nn.logsumexp(level, axis=-1)  # [B, beams_in]
        if constrained:
            # dead beams (node -1) read row 0, harmlessly: their bias is already -inf
            child = jnp.asarray(table)[jnp.maximum(nodes, 0)]  # [B, beams_in, width]
            valid = child >= 0
            if blocked is not None:
                flat = jnp.maximum(child, 0).reshape(batch, -1)
                valid = valid & ~jnp.take_along_axis(blocked[d], flat, axis=1).reshape(child.shape)
            scores, parent, token = _top_k(jnp.where(valid, level, -jnp.inf), beam_bias, beam_width)
        else:
            scores, parent, token = _top_k(level, beam_bias, beam_width)
        token = token + offset
        nodes = _child(table, jnp.take_along_axis(nodes, parent, axis=1), token - offset, width)
        sequences = jnp.concatenate([jnp.take_along_axis(sequences, parent[..., None], axis=1), token[..., None]], -1)
        if d < trie.depth - 1 and beams is not None:
            if d == 0:
                cache = beams.start(cache, beam_width, trie.depth - 1)
            logits, cache = beams.step(token, parent, cache)
            last_logits = logits.astype(jnp.float32)
        elif d < trie.depth - 1:
            rows = (jnp.arange(batch)[:, None] * beams_in + parent).reshape(-1)  # step 0 repeats each user's cache
            cache = jax.tree.map(lambda a: a[rows] if a.ndim else a, cache)
            logits, cache = step_fn(token.reshape(-1, 1), jnp.ones((batch * beam_width, 1), bool), cache)
            last_logits = logits[:, -1, :].astype(jnp.float32).reshape(batch, beam_width, vocab)
    alive = scores > -jnp.inf  # dead: no valid path left, or the model gave a valid token probability 0
    return BeamResult(
        sequences=jnp.where(alive[..., None], sequences, -1),
        scores=scores,
        items=jnp.where(alive, nodes, -1),
    )


def greedy_search(
    step_fn: StepFn,
    init_cache: InitCache,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    trie: SIDTrie,
    constrained: bool = True,
    max_len: int | None = None,
) -> BeamResult:
    """The single most likely SID per user, token by token: `beam_search` with beam_width 1."""
    return beam_search(step_fn, init_cache, prompt_tokens, prompt_mask, trie, 1, constrained, max_len)


def invalid_sid_rate(result: BeamResult) -> float:
    """Fraction of the generated beams (score > -inf) whose SID maps to no item; 0 for constrained search."""
    return invalid_share(result.items, result.scores)


def invalid_share(items: np.ndarray | jax.Array, scores: np.ndarray | jax.Array) -> float:
    """`invalid_sid_rate` on beam items and scores gathered over several searches."""
    live = np.asarray(scores) > -np.inf
    if not live.any():
        raise ValueError("The result holds no generated beams, so it has no invalid-SID rate.")
    return float((np.asarray(items)[live] < 0).mean())


def _top_k(logits: jax.Array, beam_bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best k of `beam_bias[..., None] + logits` over `[B, beams_in, C]`: (scores, parent beam, column), each [B, k].

    The overall best k are among each beam's best k, so the beams are cut to k first: the search never
    materialises [B, beams_in, vocabulary] scores (unconstrained mode).
    """
    batch, beams_in, columns = logits.shape
    per_beam = min(k, columns)
    best_logits, best_columns = jax.lax.top_k(logits, per_beam)  # [B, beams_in, per_beam]
    flat = (beam_bias[..., None] + best_logits).reshape(batch, beams_in * per_beam)
    if flat.shape[1] < k:  # fewer candidates than beams (narrow first level): the rest are dead beams
        flat = jnp.pad(flat, ((0, 0), (0, k - flat.shape[1])), constant_values=-jnp.inf)
    scores, index = jax.lax.top_k(flat, k)
    index = jnp.minimum(index, beams_in * per_beam - 1)
    column = jnp.take_along_axis(best_columns.reshape(batch, -1), index, axis=1)
    return scores, index // per_beam, column.astype(jnp.int32)


def _blocked_children(trie: SIDTrie, banned: jax.Array) -> list[jax.Array]:
    """Per depth d, bool [B, n_nodes_{d+1}]: the nodes a step at depth d may not enter for each user (at the
    last depth the banned items; above, nodes with no item left that is not banned), bottom-up.

    Counts each node's open (not banned) items with a segment sum over the node's parent, so the work is
    B * (items + nodes) per depth; the tables themselves are read once, not once per user.
    """
    blocked = [banned]
    open_items = (~banned).astype(jnp.int32).T  # [n_nodes_{d+1}, B]: open items under each node
    for table in reversed(trie.children[1:]):
        table = jnp.asarray(table)  # [n_nodes_d, width_d] child node, or -1
        rows, width = table.shape
        children = table.reshape(-1)
        # parent of every node one depth down; nodes no table entry points at (padding) get none
        parent = jnp.full((open_items.shape[0],), rows, jnp.int32).at[
            jnp.where(children >= 0, children, open_items.shape[0])].set(
            jnp.repeat(jnp.arange(rows, dtype=jnp.int32), width), mode="drop")
        open_items = jax.ops.segment_sum(open_items, parent, num_segments=rows)  # parent == rows: dropped
        blocked.insert(0, (open_items == 0).T)
    return blocked


def _child(table: jax.Array | np.ndarray, nodes: jax.Array, local: jax.Array, width: int) -> jax.Array:
    """Child node (item index at the last depth) of `nodes` under local tokens, -1 off the trie."""
    on_trie = (nodes >= 0) & (local >= 0) & (local < width)
    child = jnp.asarray(table)[jnp.maximum(nodes, 0), jnp.clip(local, 0, width - 1)]
    return jnp.where(on_trie, child, -1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
