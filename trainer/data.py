"""Training documents and examples as token ids (host side, numpy), shared by CPT and SFT.

- Behaviour sequence: `<bos> [<ctx> features] <hist> SID(i1) r1 SID(i2) r2 ...`, each item's SID
  followed by its reward bucket. The retrieval prompt (SFT, evaluation, serving) is exactly this
  for a history; the model then writes the next item's SID.
- CPT trains on behaviour sequences (every next token a target, `<eos>` at the end) and on item
  metadata documents in both directions: `<bos> <item> SID <title> text <eos>` and
  `<bos> <title> text <sid> SID <eos>`; the paper's mixture is 50/50.
- SFT trains on windows of behaviour sequences with loss only on the SID tokens of target items.
  In a causal model the SID of item t in a window is predicted from exactly the prompt a
  one-target example would have (the window's earlier items), so one window carries up to
  max_history examples for the price of one forward pass. Reward sampling: each target is kept
  with probability reward / (the largest training reward), and kept targets weigh equally, so
  targets are drawn in proportion to reward as the paper does.

Items are dense indices into `item_sids` (one row of SID token ids per item). Batches are padded to
a few fixed lengths (`bucket_length`) so the jitted step compiles once per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from trainer.vocab import BOS, CTX, EOS, HIST, ITEM, PAD, SID, TITLE, VocabLayout


@dataclass(frozen=True)
class Catalogue:
    """Per item (dense index): SID token ids [n_items, sid_depth] and title tokens in layout space."""

    item_sids: np.ndarray
    titles: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.item_sids.ndim != 2 or len(self.item_sids) != len(self.titles):
            raise ValueError("item_sids must be [n_items, sid_depth] with one title per item")


def history_tokens(layout: VocabLayout, catalogue: Catalogue, items: Sequence[int], rewards: Sequence[float],
                   context: Mapping[str, object] | None = None) -> list[int]:
    """`<bos> [<ctx> features] <hist> SID r SID r ...` for a history (oldest first): the retrieval prompt."""
    tokens = [BOS]
    if layout.features:
        tokens += [CTX, *layout.feature_tokens(context or {})]
    tokens.append(HIST)
    for item, reward in zip(items, rewards):
        tokens += [*catalogue.item_sids[item].tolist(), layout.reward_token(reward)]
    return tokens


def prefix_length(layout: VocabLayout) -> int:
    """Tokens before the first item of a behaviour sequence."""
    return 2 + (1 + len(layout.features) if layout.features else 0)


def target_weights(layout: VocabLayout, n_items: int, keep: Sequence[bool]) -> list[float]:
    """Weights of a behaviour sequence of n_items items (no `<eos>`) with loss on the SIDs of the
    items where keep is True; weight[t] weighs the prediction of token t + 1."""
    step = layout.sid_depth + 1
    weights = [0.0] * (prefix_length(layout) + n_items * step)
    for j in range(n_items):
        if keep[j]:
            first = prefix_length(layout) + j * step
            for t in range(first - 1, first + layout.sid_depth - 1):
                weights[t] = 1.0
    return weights


def behaviour_document(layout: VocabLayout, catalogue: Catalogue, items: Sequence[int], rewards: Sequence[float],
                       context: Mapping[str, object] | None = None) -> tuple[list[int], list[float]]:
    """A user's sequence for CPT, every next token a target (the last position predicts nothing)."""
    tokens = [*history_tokens(layout, catalogue, items, rewards, context), EOS]
    return tokens, [1.0] * (len(tokens) - 1) + [0.0]


def metadata_documents(layout: VocabLayout, catalogue: Catalogue, item: int) -> list[tuple[list[int], list[float]]]:
    """The item's SID next to its title, in both directions (none for an item without a title)."""
    title = list(catalogue.titles[item])
    if not title:
        return []
    sid = catalogue.item_sids[item].tolist()
    docs = [[BOS, ITEM, *sid, TITLE, *title, EOS], [BOS, TITLE, *title, SID, *sid, EOS]]
    return [(doc, [1.0] * (len(doc) - 1) + [0.0]) for doc in docs]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n tokens."""
    for size in buckets:
        if n <= size:
            return size
    raise ValueError(f"a sequence of {n} tokens is longer than the largest bucket {max(buckets)}")


def pack_batch(examples: Sequence[tuple[Sequence[int], Sequence[float]]], buckets: Sequence[int],
               batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded tokens [B, T], mask [B, T], weights [B, T] (loss on predicting token t+1 at t).

    Missing rows up to batch_size are all padding with zero weight, so a batch shape never changes.
    """
    rows = batch_size or len(examples)
    if len(examples) > rows:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {rows}")
    length = bucket_length(max(len(t) for t, _ in examples), buckets)
    tokens = np.full((rows, length), PAD, np.int32)
    mask = np.zeros((rows, length), bool)
    weights = np.zeros((rows, length), np.float32)
    for r, (toks, w) in enumerate(examples):
        tokens[r, :len(toks)] = toks
        mask[r, :len(toks)] = True
        weights[r, :len(w)] = w
    return {"tokens": tokens, "mask": mask, "weights": weights}


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to one length (all end at the same slot, as decoding expects)."""
    length = length or max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), PAD, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for r, prompt in enumerate(prompts):
        if len(prompt) > length:
            prompt = prompt[-length:]
        tokens[r, length - len(prompt):] = prompt
        mask[r, length - len(prompt):] = True
    return tokens, mask


@dataclass(frozen=True)
class RewardedSequences:
    """Training sequences per user (item indices, oldest first) with the reward of each event."""

    items: tuple[np.ndarray, ...]
    rewards: tuple[np.ndarray, ...]


def sft_windows(sequences: RewardedSequences, max_history: int) -> tuple[np.ndarray, float]:
    """The (user, last position) of every SFT window, and the largest reward (for sampling).

    A user's sequence is tiled from its end: windows of max_history + 1 items end at its last item,
    then max_history items earlier, and so on, so every position after the first is a target of
    exactly one window (the causal loss covers every prefix of a window at once). Windows ending
    at every position instead would make a user's early items targets in up to max_history windows
    and the most recent in one, and weight long histories quadratically.
    """
    ends = [np.stack([np.full(len(last), u), last], 1)
            for u, items in enumerate(sequences.items) if len(items) > 1
            for last in [np.arange(len(items) - 1, 0, -max_history)]]
    if not ends:
        raise ValueError("no user has two or more training items: nothing to learn from")
    return np.concatenate(ends), max(float(np.max(r)) for r in sequences.rewards if len(r))


def sft_batches(layout: VocabLayout, catalogue: Catalogue, sequences: RewardedSequences, batch_size: int,
                max_history: int, buckets: Sequence[int], rng: np.random.Generator,
                context: Sequence[Mapping[str, object]] | None = None, reward_sampling: bool = True,
                ) -> Iterator[dict[str, np.ndarray]]:
    """Endless SFT batches of the windows of `sft_windows` (at most max_history + 1 items), drawn
    uniformly; every item after the window's first is a target, kept with probability
    reward / max reward (the paper's reward sampling), or always with reward_sampling=False.

    Windows are grouped by padded length and a batch comes from one group (groups drawn in
    proportion to their size, so every window is still equally likely): short histories are not
    padded to the longest bucket, which on Amazon Beauty's short sequences halves the tokens.
    """
    ends, top = sft_windows(sequences, max_history)
    if reward_sampling and top <= 0:
        raise ValueError("every training reward is zero: reward sampling has nothing to draw")
    items_in = np.minimum(ends[:, 1], max_history) + 1
    lengths = prefix_length(layout) + items_in * (layout.sid_depth + 1)
    groups = [g for g in (np.flatnonzero(np.array([bucket_length(n, buckets) for n in lengths]) == b)
                          for b in buckets) if len(g)]
    sizes = np.array([len(g) for g in groups], np.float64)
    while True:
        group = groups[rng.choice(len(groups), p=sizes / sizes.sum())]
        examples = []
        for u, end in ends[group[rng.integers(len(group), size=batch_size)]]:
            start = max(0, end - max_history)
            items, rewards = sequences.items[u][start:end + 1], sequences.rewards[u][start:end + 1]
            keep = (rng.random(len(items)) < np.asarray(rewards, np.float64) / top if reward_sampling
                    else np.ones(len(items), bool))
            keep[0] = False  # the window's first item has no history inside the window
            tokens = history_tokens(layout, catalogue, items, rewards, None if context is None else context[u])
            examples.append((tokens, target_weights(layout, len(items), keep)))
        yield pack_batch(examples, buckets, batch_size)


def cpt_batches(layout: VocabLayout, catalogue: Catalogue, sequences: RewardedSequences, batch_size: int,
                max_history: int, buckets: Sequence[int], rng: np.random.Generator,
                behaviour_share: float = 0.5) -> Iterator[dict[str, np.ndarray]]:
    """Endless CPT batches: `behaviour_share` of documents are windows of user sequences (at most
    max_history items), the rest item metadata documents; the paper's mixture is 50/50.

    As in `sft_batches`, a batch comes from one padded length: a bucket is drawn with the share of
    the mixture its documents carry, then documents within it with their kinds' shares, so every
    document is exactly as likely as in an unsorted draw. A user's window length does not depend
    on where it starts; without grouping, every batch would pad short documents to the longest
    behaviour window.
    """
    users = [u for u, items in enumerate(sequences.items) if len(items)]
    titled = [i for i in range(len(catalogue.titles)) if catalogue.titles[i]]
    if not users:
        raise ValueError("no user sequences to continue pre-training on")
    share = behaviour_share if titled else 1.0

    def window(u: int, start: int) -> tuple[list[int], list[float]]:
        end = start + max_history
        return behaviour_document(layout, catalogue, sequences.items[u][start:end], sequences.rewards[u][start:end])

    user_bucket = np.array([bucket_length(len(window(u, 0)[0]), buckets) for u in users])
    item_bucket = np.array([bucket_length(len(metadata_documents(layout, catalogue, i)[0][0]), buckets)
                            for i in titled], np.int64)
    groups = []  # per bucket: its users, its items, its share of the mixture, the behaviour part of it
    for b in buckets:
        in_users = [users[k] for k in np.flatnonzero(user_bucket == b)]
        in_items = [titled[k] for k in np.flatnonzero(item_bucket == b)]
        behaviour = share * len(in_users) / len(users)
        mass = behaviour + ((1 - share) * len(in_items) / len(titled) if titled else 0.0)
        if mass > 0:
            groups.append((in_users, in_items, mass, behaviour / mass))
    masses = np.array([g[2] for g in groups])
    while True:
        in_users, in_items, _, behaviour = groups[rng.choice(len(groups), p=masses / masses.sum())]
        examples = []
        for _ in range(batch_size):
            if rng.random() < behaviour:
                u = in_users[rng.integers(len(in_users))]
                examples.append(window(u, int(rng.integers(max(1, len(sequences.items[u]) - max_history + 1)))))
            else:
                docs = metadata_documents(layout, catalogue, in_items[rng.integers(len(in_items))])
                examples.append(docs[rng.integers(len(docs))])
        yield pack_batch(examples, buckets, batch_size)
