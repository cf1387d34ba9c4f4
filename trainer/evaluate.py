"""The evaluation protocol shared by every model: sequences, leave-one-out split, ranking metrics.

Protocol (DESIGN.md "Assets and data"):
- Each user's interactions in time order form one sequence of dense item indices 0..n_items-1.
  Equal timestamps keep the order the events were given in (the loaders' file order).
- Leave-one-out: the last item is the test target, the second-to-last the validation target,
  everything before that the training sequence. The model sees at most the last `max_history`
  items before a target (20 on Amazon Beauty); test histories include the validation item.
  Users with fewer than 3 items have no validation and test targets: their whole sequence is
  training data and they are not evaluated (none exist in Beauty 5-core or MovieLens-100K).
- Ranking is over the full catalogue. By default the items the user interacted with before the
  target (the whole prefix, training items included, not only the capped history) are removed
  from the ranking: MovieLens users never rate a movie twice and Beauty 5-core sequences almost
  never repeat an item, so a seen item is not a useful recommendation. A repeated target then
  counts as a miss. `top_k_excluding(..., exclude=None)` ranks seen items too; whichever is
  chosen, every model in a comparison must be evaluated the same way.
- Metrics: Recall@K (= hit rate, one relevant item per user) and NDCG@K = 1/log2(rank + 2) for
  a hit at 0-based rank, else 0, averaged over users; and the PLUM paper's effective vocabulary
  (how many distinct items fill 95% of all recommendation slots).
- The popularity floor: a model that does not beat recommending the items most frequent among
  recent events (seen items excluded, top-10) on the same held-out users, by Recall@10, is never
  exported or promoted (`popularity_baseline`, `popularity_floor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

Which = Literal["valid", "test"]


@dataclass(frozen=True, eq=False)
class UserSequences:
    """Per-user item sequences in time order.

    user_ids: [n_users] original user ids; item_ids: [n_items] original item id of each dense
    index; sequences: n_users int32 arrays of item indices, oldest first.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    sequences: tuple[np.ndarray, ...]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True, eq=False)
class EvalSet:
    """The held-out targets of one split side (validation or test).

    users: [n] rows of the evaluated users in UserSequences; histories: n int32 arrays (the last
    max_history items before the target); targets: [n] int32; seen: n int32 arrays (every item
    before the target, for excluding seen items from the ranking).
    """

    users: np.ndarray
    histories: tuple[np.ndarray, ...]
    targets: np.ndarray
    seen: tuple[np.ndarray, ...]

    def head(self, n: int | None) -> "EvalSet":
        """The first n evaluated users (all when n is None)."""
        return self if n is None else EvalSet(self.users[:n], self.histories[:n], self.targets[:n], self.seen[:n])

    def where(self, keep: np.ndarray) -> "EvalSet":
        """The evaluated users for which keep [n] is true, in order."""
        rows = np.flatnonzero(keep)
        return EvalSet(self.users[rows], tuple(self.histories[r] for r in rows), self.targets[rows],
                       tuple(self.seen[r] for r in rows))


@dataclass(frozen=True, eq=False)
class Split:
    """A leave-one-out split: train holds one int32 array per user (all users), valid/test the targets."""

    n_items: int
    max_history: int
    train: tuple[np.ndarray, ...]
    valid: EvalSet
    test: EvalSet

    def eval_set(self, which: Which) -> EvalSet:
        """The validation or the test side."""
        if which not in ("valid", "test"):
            raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
        return self.valid if which == "valid" else self.test


def sequences_from_events(
    user_ids: Sequence | np.ndarray | pd.Series,
    item_ids: Sequence | np.ndarray | pd.Series,
    timestamps: Sequence[float] | np.ndarray | pd.Series | None = None,
    catalogue: Sequence | np.ndarray | pd.Series | None = None,
) -> UserSequences:
    """Group events [n_events] into per-user sequences ordered by timestamp (ties: given order).

    Without timestamps the given order is the time order. Items are indexed in the order of
    `catalogue` when given (it must hold every interacted item once), else in sorted id order.
    Users come out in sorted id order.
    """
    users = np.asarray(user_ids, dtype=object)
    items = np.asarray(item_ids, dtype=object)
    if users.ndim != 1 or users.shape != items.shape:
        raise ValueError(f"user_ids and item_ids must be 1-D and of equal length, got {users.shape} and {items.shape}")
    if len(users) == 0:
        raise ValueError("there are no events to build sequences from")
    times = np.zeros(len(users)) if timestamps is None else np.asarray(timestamps, dtype=np.float64)
    if times.shape != users.shape:
        raise ValueError(f"timestamps must have one value per event ({len(users)}), got shape {times.shape}")
    if catalogue is None:
        item_codes, item_index = pd.factorize(items, sort=True)
        catalogue_ids = np.asarray(item_index, dtype=object)
    else:
        catalogue_ids = np.asarray(catalogue, dtype=object)
        index = pd.Index(catalogue_ids)
        if not index.is_unique:
            raise ValueError("the catalogue lists an item id more than once")
        item_codes = index.get_indexer(items)
        if (item_codes < 0).any():
            missing = items[item_codes < 0][0]
            raise ValueError(f"item {missing!r} of the events is not in the catalogue; pass the full item list")
    user_codes, user_index = pd.factorize(users, sort=True)
    # lexsort: the last key is primary, so user, then time, then the given position.
    order = np.lexsort((np.arange(len(users)), times, user_codes))
    bounds = np.cumsum(np.bincount(user_codes, minlength=len(user_index)))[:-1]
    sequences = tuple(np.split(item_codes[order].astype(np.int32), bounds))
    return UserSequences(np.asarray(user_index, dtype=object), catalogue_ids, sequences)


def leave_one_out(sequences: UserSequences, max_history: int) -> Split:
    """Last item test, second-to-last validation, the rest training; histories capped at max_history.

    Users with fewer than 3 items are kept in training only (their whole sequence) and not evaluated.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    if not sequences.sequences:
        raise ValueError("there are no user sequences to split")
    train: list[np.ndarray] = []
    sides: dict[str, tuple[list[int], list[np.ndarray], list[int], list[np.ndarray]]] = {
        "valid": ([], [], [], []), "test": ([], [], [], []),
    }
    for user, sequence in enumerate(sequences.sequences):
        if len(sequence) < 3:
            train.append(sequence)
            continue
        train.append(sequence[:-2])
        for name, cut in (("valid", len(sequence) - 2), ("test", len(sequence) - 1)):
            users, histories, targets, seen = sides[name]
            users.append(user)
            histories.append(sequence[max(0, cut - max_history):cut])
            targets.append(int(sequence[cut]))
            seen.append(sequence[:cut])
    valid, test = (
        EvalSet(np.asarray(u, np.int64), tuple(h), np.asarray(t, np.int32), tuple(s))
        for u, h, t, s in (sides["valid"], sides["test"])
    )
    return Split(sequences.n_items, max_history, tuple(train), valid, test)


def rank_metrics(ranked: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall@K and NDCG@K ("recall@5", "ndcg@5", ...) of ranked [n_users, K_max] against targets [n_users].

    -1 in `ranked` is padding (fewer than K_max results) and never hits.
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"need ranked [n_users, K] and targets [n_users], got {ranked.shape} and {targets.shape}")
    if ranked.shape[0] == 0:
        raise ValueError("there are no users to evaluate")
    if (targets < 0).any():
        raise ValueError("targets must be item indices >= 0")
    if not ks or any(k < 1 or k > ranked.shape[1] for k in ks):
        raise ValueError(f"every K must be between 1 and the ranked list length {ranked.shape[1]}, got {tuple(ks)}")
    # One relevant item: its 0-based rank, or -1 when it is not in the list.
    ranks = target_ranks(ranked, targets)
    return {f"{name}@{k}": float(user_values(ranks, f"{name}@{k}").mean()) for k in ks for name in ("recall", "ndcg")}


def top_k_excluding(
    scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """The k best items [n_users, k] of scores [n_users, n_items], best first, -1 where fewer remain.

    exclude: per user, item indices that may not be recommended (seen items), or None. Equal
    scores rank the lower item index first. Scores must be finite.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_users, n_items], got shape {scores.shape}")
    n_users, n_items = scores.shape
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be between 1 and the catalogue size {n_items}, got {k}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; the model has diverged or the input is broken")
    key = scores.astype(np.result_type(scores.dtype, np.float32))
    excluded = np.zeros(scores.shape, dtype=bool)
    if exclude is not None:
        if len(exclude) != n_users:
            raise ValueError(f"exclude needs one item array per user ({n_users}), got {len(exclude)}")
        lengths = [len(items) for items in exclude]
        columns = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(items, np.int64) for items in exclude])
        if columns.size and (columns.min() < 0 or columns.max() >= n_items):
            raise ValueError(f"excluded item indices must lie in 0..{n_items - 1}")
        excluded[np.repeat(np.arange(n_users), lengths), columns] = True
        key[excluded] = -np.inf
    # Exactly k per row: everything above the k-th best score, then ties at it by lowest index.
    kth = np.partition(key, n_items - k, axis=1)[:, n_items - k][:, None]
    above = key > kth
    ties = key == kth
    wanted = k - above.sum(axis=1)
    crowded = np.flatnonzero(ties.sum(axis=1) > wanted)  # rare: more ties than places; cumsum only there
    ties[crowded] &= np.cumsum(ties[crowded], axis=1) <= wanted[crowded, None]
    chosen = above | ties
    columns = np.nonzero(chosen)[1].reshape(n_users, k)
    chosen_scores = np.take_along_axis(key, columns, axis=1)
    order = np.lexsort((columns, -chosen_scores), axis=1)
    ranked = np.take_along_axis(columns, order, axis=1)
    return np.where(np.take_along_axis(excluded, ranked, axis=1), -1, ranked)


def effective_vocabulary(ranked: np.ndarray, coverage: float = 0.95) -> int:
    """How many distinct items fill `coverage` of all recommendation slots of ranked [n_users, K].

    Items are counted by how often they are recommended, most frequent first; -1 padding is not
    a slot. The PLUM paper's effective vocabulary size.
    """
    ranked = np.asarray(ranked)
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    slots = ranked[ranked >= 0]
    if slots.size == 0:
        raise ValueError("the ranked lists hold no items")
    counts = np.sort(np.bincount(slots))[::-1]
    # Rounding guards against 0.95 * 100 landing a hair above 95.
    needed = math.ceil(round(coverage * slots.size, 9))
    return int(np.searchsorted(np.cumsum(counts), needed) + 1)


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each user's 0-based rank of the target in `ranked` [n_users, K], -1 when it is not there."""
    hits = np.asarray(ranked) == np.asarray(targets)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def user_values(ranks: Sequence[int], metric: str) -> np.ndarray:
    """Per-user Recall@K ("recall@10") or NDCG@K ("ndcg@10") from target ranks (-1: not ranked)."""
    name, _, k = metric.partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit():
        raise ValueError(f"unknown metric {metric!r}; use recall@K or ndcg@K")
    rank = np.asarray(ranks)
    hit = (rank >= 0) & (rank < int(k))
    return hit.astype(float) if name == "recall" else np.where(hit, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus reference on one metric over the same users: the mean per-user difference
    and the upper end of its one-sided confidence interval (normal approximation of the mean of the
    paired differences). `upper < -margin` says the candidate is worse by more than the margin at
    that confidence; a point estimate below -margin on a few users does not."""

    metric: str
    difference: float
    upper: float
    users: int
    confidence: float
    paired: bool  # False: no per-user ranks to pair, the point estimates were compared

    def trails(self, margin: float) -> bool:
        return self.upper < -margin

    def describe(self) -> str:
        if not self.paired:
            return f"difference {self.difference:+.4f} (point estimates: no per-user ranks recorded)"
        return (f"difference {self.difference:+.4f} on the same {self.users} users, at {self.confidence:.0%} "
                f"confidence at most {self.upper:+.4f}")


def paired_difference(candidate: dict, reference: dict, metric: str, confidence: float) -> PairedDifference:
    """Compare two evaluations of the same events (each with its metric and, when recorded, the
    per-user "target_ranks" in the same user order)."""
    from statistics import NormalDist

    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    mine, theirs = candidate.get("target_ranks"), reference.get("target_ranks")
    if mine is None or theirs is None or len(mine) != len(theirs) or len(mine) < 2:
        difference = float(candidate[metric] - reference[metric])
        return PairedDifference(metric, difference, difference, int(candidate.get("examples", 0) or 0),
                                confidence, paired=False)
    diffs = user_values(mine, metric) - user_values(theirs, metric)
    standard_error = float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
    mean = float(diffs.mean())
    return PairedDifference(metric, mean, mean + NormalDist().inv_cdf(confidence) * standard_error, len(diffs),
                            confidence, paired=True)


GATE_METRICS = ("recall@10", "ndcg@10")


def quality_gate(candidate: dict, reference: dict, margin: float, confidence: float
                 ) -> tuple[PairedDifference | None, list[PairedDifference]]:
    """The quality gate shared by export and promotion: the first gate metric on which the candidate
    trails the reference by more than `margin` at `confidence` (None: it passes), and every comparison."""
    compared = [paired_difference(candidate, reference, metric, confidence) for metric in GATE_METRICS]
    return next((d for d in compared if d.trails(margin)), None), compared


# The popularity floor ----------------------------------------------------------------------------
POPULARITY_WINDOW = 10_000  # the newest events (before the evaluated ones) whose items popularity counts
POPULARITY_K = 10


def popularity_baseline(recent_items: Sequence, seen: Sequence[Sequence], targets: Sequence,
                        k: int = POPULARITY_K) -> dict[str, Any]:
    """The recent-popularity recommender on held-out users: Recall@k, NDCG@k and per-user target ranks.

    recent_items: the item ids of the recent events, oldest first (each event counts once);
    seen[u]: the items user u interacted with before its target, never recommended to u (as the
    model's search excludes them); targets[u]: u's held-out item. Every user is recommended the k
    most frequent items of `recent_items` that u has not seen; items with equal counts rank the one
    with the newer last occurrence first. An item absent from `recent_items` is never recommended.
    """
    if len(seen) != len(targets):
        raise ValueError(f"need one seen list per target, got {len(seen)} and {len(targets)}")
    if not targets:
        raise ValueError("there are no held-out users to evaluate popularity on")
    counts: dict[Any, int] = {}
    last: dict[Any, int] = {}
    for position, item in enumerate(recent_items):
        counts[item] = counts.get(item, 0) + 1
        last[item] = position
    popular = sorted(counts, key=lambda item: (-counts[item], -last[item]))
    ranks = []
    for before, target in zip(seen, targets):
        excluded = set(before)
        top = list(islice((item for item in popular if item not in excluded), k))
        ranks.append(top.index(target) if target in top else -1)
    figures: dict[str, Any] = {f"{name}@{k}": float(user_values(ranks, f"{name}@{k}").mean())
                               for name in ("recall", "ndcg")}
    return {**figures, "examples": len(targets), "recent_events": len(recent_items), "target_ranks": ranks}


def popularity_floor(candidate: dict, popularity: dict) -> tuple[bool, str]:
    """The absolute floor of export and promotion: the candidate's Recall@10 must be strictly above
    recent popularity's on the same held-out users. A tie fails (equal recall does not beat it), so
    a candidate that hits nothing never passes, whatever the baseline."""
    if candidate.get("examples") != popularity.get("examples"):
        raise ValueError(f"the candidate ({candidate.get('examples')} users) and popularity "
                         f"({popularity.get('examples')} users) must be evaluated on the same held-out users")
    mine, theirs = candidate["recall@10"], popularity["recall@10"]
    verdict = "beats" if mine > theirs else "does not beat"
    return mine > theirs, (f"recall@10 {mine:.4f} {verdict} recent popularity's {theirs:.4f} on the same "
                           f"{popularity['examples']} held-out users")
