"""The decoder's vocabulary: specials, SID tokens per level, collision suffixes, reward buckets,
text tokens and context-feature tokens, in that order (features last, so registering a new
feature appends rows and every existing row keeps its id). The layout travels in every checkpoint's
manifest (`to_json` / `from_json`), so a model always says which token means what.

Text tokens are the SmolLM2 byte-level BPE ids that the catalogue's texts actually use, kept in a
compact range (`text_ids`, the original ids in layout order). A catalogue of a few thousand titles
uses a few thousand of the 49,152 BPE tokens; the output softmax over the full BPE vocabulary would
cost more than the rest of a small model on a CPU. The warm start copies the pre-trained rows of
exactly these ids.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<hist>", "<item>", "<title>", "<sid>", "<ctx>")
PAD, BOS, EOS, UNK, HIST, ITEM, TITLE, SID, CTX = range(len(SPECIALS))


def suffix_capacity(needed: int) -> int:
    """Collision-suffix tokens a new vocabulary reserves: the table's need plus headroom, so items
    the tokenizer adds later (which may collide more) still fit without a new vocabulary."""
    return needed + max(4, needed)


@dataclass(frozen=True)
class FeatureSpec:
    """A context feature as prompt tokens: one token per categorical value, or per numeric bucket.

    Categorical: `values` lists the known values; anything else becomes the feature's unknown token.
    Numeric: `edges` are increasing bucket boundaries; len(edges) + 1 buckets.
    """

    name: str
    kind: str
    values: tuple[str, ...] = ()
    edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "numeric"):
            raise ValueError(f"feature {self.name!r}: kind must be 'categorical' or 'numeric', got {self.kind!r}")
        if self.kind == "categorical" and len(set(self.values)) != len(self.values):
            raise ValueError(f"feature {self.name!r}: categorical values must be distinct")
        if self.kind == "numeric" and (not self.edges or list(self.edges) != sorted(set(self.edges))):
            raise ValueError(f"feature {self.name!r}: numeric edges must be a non-empty increasing list")

    @property
    def size(self) -> int:
        """Tokens this feature takes: values + unknown, or buckets."""
        return len(self.values) + 1 if self.kind == "categorical" else len(self.edges) + 1

    def index(self, value: Any) -> int:
        """The feature-local token index of a value."""
        if self.kind == "categorical":
            return self.values.index(str(value)) + 1 if str(value) in self.values else 0
        try:
            return bisect_right(self.edges, float(value))
        except (TypeError, ValueError):  # not a number: as if missing
            return 0


@dataclass(frozen=True)
class VocabLayout:
    """Token id ranges of every section. SID token of level l, code c: `sid_token(l, c)`;
    the collision suffix is the last SID position (level == len(codebook_sizes))."""

    codebook_sizes: tuple[int, ...]
    suffix_size: int
    reward_buckets: int = 5
    features: tuple[FeatureSpec, ...] = ()
    text_ids: tuple[int, ...] = ()
    _text_index: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(n < 1 for n in self.codebook_sizes) or self.suffix_size < 1:
            raise ValueError("a vocabulary needs at least one codebook level and one suffix token")
        if self.reward_buckets < 1:
            raise ValueError("reward_buckets must be at least 1")
        if len({f.name for f in self.features}) != len(self.features):
            raise ValueError("feature names in a vocabulary must be distinct")
        self._text_index.update({orig: k for k, orig in enumerate(self.text_ids)})

    # Section offsets -------------------------------------------------------------------------
    @property
    def sid_widths(self) -> tuple[int, ...]:
        """Tokens per SID position: each level's codebook, then the suffix."""
        return (*self.codebook_sizes, self.suffix_size)

    @property
    def sid_depth(self) -> int:
        """Tokens in one item's SID (levels + suffix)."""
        return len(self.codebook_sizes) + 1

    @property
    def sid_offsets(self) -> tuple[int, ...]:
        """First token id of each SID position."""
        offsets, start = [], len(SPECIALS)
        for width in self.sid_widths:
            offsets.append(start)
            start += width
        return tuple(offsets)

    @property
    def sid_levels(self) -> tuple[tuple[int, int], ...]:
        """(first token id, width) of each SID position: the ranges the SFT loss normalises over and
        the beam search chooses from, one position at a time."""
        return tuple(zip(self.sid_offsets, self.sid_widths))

    @property
    def reward_offset(self) -> int:
        return self.sid_offsets[-1] + self.suffix_size

    @property
    def text_offset(self) -> int:
        return self.reward_offset + self.reward_buckets

    @property
    def feature_offsets(self) -> tuple[int, ...]:
        offsets, start = [], self.text_offset + len(self.text_ids)
        for spec in self.features:
            offsets.append(start)
            start += spec.size
        return tuple(offsets)

    @property
    def size(self) -> int:
        return self.text_offset + len(self.text_ids) + sum(f.size for f in self.features)

    # Token builders --------------------------------------------------------------------------
    def sid_tokens(self, sid: Sequence[int]) -> list[int]:
        """An item's full SID (codes per level + suffix) as token ids."""
        if len(sid) != self.sid_depth:
            raise ValueError(f"a SID has {self.sid_depth} positions (levels + suffix), got {len(sid)}")
        out = []
        for code, offset, width in zip(sid, self.sid_offsets, self.sid_widths):
            if not 0 <= code < width:
                raise ValueError(f"SID {tuple(sid)} does not fit the vocabulary's widths {self.sid_widths}")
            out.append(offset + int(code))
        return out

    def reward_token(self, reward: float) -> int:
        """Rewards in [0, 1] fall into equal-width buckets (values outside are clipped)."""
        bucket = min(self.reward_buckets - 1, max(0, int(float(reward) * self.reward_buckets)))
        return self.reward_offset + bucket

    def feature_tokens(self, context: Mapping[str, Any]) -> list[int]:
        """One token per registered feature, in registration order; a missing value is the unknown/first token."""
        out = []
        for spec, offset in zip(self.features, self.feature_offsets):
            value = context.get(spec.name)
            out.append(offset + (0 if value is None else spec.index(value)))
        return out

    def text_tokens(self, bpe_ids: Sequence[int]) -> list[int]:
        """BPE ids in layout space; ids the catalogue never used become <unk>."""
        return [self.text_offset + self._text_index[i] if i in self._text_index else UNK for i in bpe_ids]

    # Manifest --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "specials": list(SPECIALS), "codebook_sizes": list(self.codebook_sizes),
            "suffix_size": self.suffix_size, "reward_buckets": self.reward_buckets,
            "features": [{"name": f.name, "kind": f.kind, "values": list(f.values), "edges": list(f.edges)}
                         for f in self.features],
            "text_ids": list(self.text_ids),
            "offsets": {"sid": list(self.sid_offsets), "reward": self.reward_offset,
                        "features": list(self.feature_offsets), "text": self.text_offset},
            "size": self.size,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VocabLayout":
        if tuple(data.get("specials", ())) != SPECIALS:
            raise ValueError("the manifest's vocabulary has other special tokens than this version of the trainer")
        layout = cls(
            codebook_sizes=tuple(data["codebook_sizes"]), suffix_size=int(data["suffix_size"]),
            reward_buckets=int(data["reward_buckets"]),
            features=tuple(FeatureSpec(f["name"], f["kind"], tuple(f["values"]), tuple(f["edges"]))
                           for f in data["features"]),
            text_ids=tuple(data["text_ids"]),
        )
        if layout.size != data.get("size", layout.size):
            raise ValueError("the manifest's vocabulary size does not match its own layout")
        return layout

    def with_features(self, features: Sequence[FeatureSpec]) -> "VocabLayout":
        """The same layout with more features appended: every existing token keeps its id."""
        return VocabLayout(self.codebook_sizes, self.suffix_size, self.reward_buckets,
                           (*self.features, *features), self.text_ids)
