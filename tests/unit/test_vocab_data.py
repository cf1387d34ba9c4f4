"""The vocabulary layout and the documents/examples built from it."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data import (
    Catalogue, RewardedSequences, behaviour_document, cpt_batches, history_tokens, left_pad, metadata_documents,
    pack_batch, sft_batches, sft_windows, target_weights,
)
from trainer.vocab import BOS, EOS, HIST, PAD, SPECIALS, UNK, FeatureSpec, VocabLayout

pytestmark = pytest.mark.unit


def _layout(**kw) -> VocabLayout:
    return VocabLayout(codebook_sizes=(4, 3), suffix_size=2, text_ids=(500, 17, 9000), **kw)


def test_sections_are_disjoint_and_cover_the_vocabulary():
    layout = _layout(features=(FeatureSpec("surface", "categorical", ("home", "search")),
                               FeatureSpec("hour", "numeric", edges=(6.0, 12.0, 18.0))))
    ids = [*range(len(SPECIALS))]
    for offset, width in zip(layout.sid_offsets, layout.sid_widths):
        ids += range(offset, offset + width)
    ids += range(layout.reward_offset, layout.reward_offset + layout.reward_buckets)
    ids += range(layout.text_offset, layout.text_offset + len(layout.text_ids))
    for spec, offset in zip(layout.features, layout.feature_offsets):
        ids += range(offset, offset + spec.size)
    assert sorted(ids) == list(range(layout.size))


def test_sid_tokens_and_their_range_checks():
    layout = _layout()
    assert layout.sid_tokens((3, 0, 1)) == [layout.sid_offsets[0] + 3, layout.sid_offsets[1], layout.sid_offsets[2] + 1]
    with pytest.raises(ValueError, match="does not fit"):
        layout.sid_tokens((4, 0, 0))
    with pytest.raises(ValueError, match="positions"):
        layout.sid_tokens((1, 1))


def test_rewards_features_and_text_map_to_their_sections():
    layout = _layout(features=(FeatureSpec("surface", "categorical", ("home", "search")),
                               FeatureSpec("hour", "numeric", edges=(6.0, 12.0, 18.0))))
    assert layout.reward_token(0.0) == layout.reward_offset
    assert layout.reward_token(1.0) == layout.reward_offset + layout.reward_buckets - 1
    assert layout.reward_token(0.5) == layout.reward_offset + 2
    surface, hour = layout.feature_offsets
    assert layout.feature_tokens({"surface": "search", "hour": 13}) == [surface + 2, hour + 2]
    assert layout.feature_tokens({"surface": "tv"}) == [surface, hour]  # unknown value, missing value
    assert layout.text_tokens([17, 4242, 9000]) == [layout.text_offset + 1, UNK, layout.text_offset + 2]


def test_adding_a_feature_keeps_every_existing_token_id():
    old = _layout(features=(FeatureSpec("surface", "categorical", ("home",)),))
    new = old.with_features([FeatureSpec("device", "categorical", ("tv", "phone"))])
    assert new.size == old.size + 3
    assert new.sid_offsets == old.sid_offsets and new.text_offset == old.text_offset
    assert new.feature_offsets[0] == old.feature_offsets[0]


def test_layout_round_trips_through_the_manifest():
    layout = _layout(features=(FeatureSpec("hour", "numeric", edges=(6.0, 12.0)),))
    again = VocabLayout.from_json(layout.to_json())
    assert again == layout and again.size == layout.size
    assert again.text_tokens([9000]) == layout.text_tokens([9000])
    broken = {**layout.to_json(), "specials": ["<pad>"]}
    with pytest.raises(ValueError, match="special tokens"):
        VocabLayout.from_json(broken)


def _catalogue(layout: VocabLayout) -> Catalogue:
    sids = np.array([layout.sid_tokens(s) for s in [(0, 0, 0), (1, 2, 0), (1, 2, 1), (3, 1, 0)]], np.int32)
    return Catalogue(sids, ((layout.text_offset,), (), (layout.text_offset + 1, layout.text_offset + 2), ()))


def test_sft_weights_cover_exactly_the_kept_targets_sids():
    layout = _layout()
    cat = _catalogue(layout)
    tokens = history_tokens(layout, cat, [0, 3, 2], [1.0, 0.2, 1.0])
    weights = target_weights(layout, 3, [False, True, True])
    assert tokens[:2] == [BOS, HIST] and len(weights) == len(tokens)
    predicted = [tokens[t + 1] for t, w in enumerate(weights) if w]
    assert predicted == cat.item_sids[3].tolist() + cat.item_sids[2].tolist()
    # The prompt of a one-target example is the window up to the target: the same tokens.
    prompt = history_tokens(layout, cat, [0, 3], [1.0, 0.2])
    assert tokens[:len(prompt)] == prompt and tokens[len(prompt):len(prompt) + layout.sid_depth] == cat.item_sids[2].tolist()


def test_cpt_documents_predict_every_next_token():
    layout = _layout()
    cat = _catalogue(layout)
    tokens, weights = behaviour_document(layout, cat, [0, 1], [1.0, 1.0])
    assert tokens[-1] == EOS and sum(weights) == len(tokens) - 1 and weights[-1] == 0
    docs = metadata_documents(layout, cat, 2)
    assert len(docs) == 2 and all(cat.item_sids[2][0] in d for d, _ in docs)
    assert metadata_documents(layout, cat, 1) == []  # no title, no document


def test_batches_are_padded_to_buckets_and_fixed_size():
    batch = pack_batch([([1, 2, 3], [1, 1, 0]), ([4], [0])], buckets=(8, 16), batch_size=4)
    assert batch["tokens"].shape == (4, 8)
    assert batch["mask"].sum() == 4 and (batch["tokens"][~batch["mask"]] == PAD).all()
    assert batch["weights"][2:].sum() == 0
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        pack_batch([(list(range(20)), [0] * 20)], buckets=(8, 16))


def test_left_pad_aligns_prompts_at_the_end():
    tokens, mask = left_pad([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def _drawn_targets(reward_sampling: bool) -> np.ndarray:
    """How often each item is an SFT target in one large batch where items 1 (reward 1.0), 2
    (reward 0.0) and 3 (reward 0.5) always follow item 0."""
    layout = _layout()
    cat = _catalogue(layout)
    seqs = RewardedSequences((np.array([0, 1]), np.array([0, 2]), np.array([0, 3])),
                             (np.array([1.0, 1.0]), np.array([1.0, 0.0]), np.array([1.0, 0.5])))
    batch = next(sft_batches(layout, cat, seqs, batch_size=600, max_history=5, buckets=(32,),
                             rng=np.random.default_rng(0), reward_sampling=reward_sampling))
    drawn = []
    for tokens, weights in zip(batch["tokens"], batch["weights"]):
        target = tokens[np.flatnonzero(weights) + 1].tolist()
        if target:
            drawn.append(next(i for i, sid in enumerate(cat.item_sids.tolist()) if sid == target))
    return np.bincount(drawn, minlength=4)


def test_sft_targets_are_drawn_in_proportion_to_reward():
    counts = _drawn_targets(reward_sampling=True)
    assert counts[0] == 0 and counts[2] == 0  # the window's first item, and a zero-reward target
    assert 1.6 < counts[1] / counts[3] < 2.5  # reward 1.0 against 0.5


def test_sft_without_reward_sampling_keeps_every_target():
    counts = _drawn_targets(reward_sampling=False)
    assert counts[0] == 0  # the window's first item is never a target
    assert counts[1:].sum() == 600  # every window's target kept, the zero-reward one included
    assert min(counts[1:]) > 150  # windows drawn uniformly: about 200 each


def test_all_zero_rewards_stop_reward_sampling_but_not_training_on_every_target():
    layout = _layout()
    cat = _catalogue(layout)
    seqs = RewardedSequences((np.array([0, 1]), np.array([0, 2])), (np.zeros(2), np.zeros(2)))

    def draw(sampling: bool) -> dict[str, np.ndarray]:
        return next(sft_batches(layout, cat, seqs, batch_size=8, max_history=5, buckets=(32,),
                                rng=np.random.default_rng(0), reward_sampling=sampling))

    with pytest.raises(ValueError, match="every training reward is zero"):
        draw(True)
    assert draw(False)["weights"].sum() == 8 * layout.sid_depth  # one target SID per window


def test_cpt_mixture_holds_both_kinds_of_documents():
    layout = _layout()
    cat = _catalogue(layout)
    seqs = RewardedSequences((np.array([0, 1, 2, 3]),), (np.ones(4),))
    batch = next(cpt_batches(layout, cat, seqs, batch_size=200, max_history=3, buckets=(32,),
                             rng=np.random.default_rng(0)))
    behaviour = (batch["tokens"][:, 1] == HIST).mean()
    assert 0.4 < behaviour < 0.6


def test_cpt_batches_group_documents_by_length_and_keep_the_mixture():
    layout = _layout()
    titles = ((layout.text_offset,), (), tuple(range(layout.text_offset, layout.text_offset + 3)) * 8, ())
    cat = Catalogue(_catalogue(layout).item_sids, titles)
    lengths = (1, 3, 12)  # users whose windows fall in different buckets
    seqs = RewardedSequences(tuple(np.arange(n) % 4 for n in lengths), tuple(np.ones(n) for n in lengths))
    batches = cpt_batches(layout, cat, seqs, batch_size=8, max_history=10, buckets=(16, 32, 64),
                          rng=np.random.default_rng(0))
    users, items, widths = [], [], set()
    for _ in range(600):
        batch = next(batches)
        real = batch["mask"].sum(1)
        width = batch["tokens"].shape[1]
        assert width == min(b for b in (16, 32, 64) if b >= real.max())  # padded to its longest document
        assert (real > max([0] + [b for b in (16, 32, 64) if b < width])).all()  # which all share its bucket
        widths.add(width)
        for row, n in zip(batch["tokens"], real):
            if row[1] == HIST:
                users.append({1: 0, 3: 1, 10: 2}[(n - 3) // (layout.sid_depth + 1)])  # <bos> <hist> ... <eos>
            else:
                items.append(0 if n < 16 else 2)
    assert widths == {16, 32, 64}  # short documents are not padded to the longest window
    assert 0.45 < len(users) / (len(users) + len(items)) < 0.55  # the 50/50 mixture, as without grouping
    assert all(0.28 < users.count(u) / len(users) < 0.39 for u in range(3))  # users equally likely
    assert 0.45 < items.count(0) / len(items) < 0.55  # titled items equally likely


def test_sft_batches_group_windows_by_length():
    layout = _layout()
    cat = _catalogue(layout)
    seqs = RewardedSequences((np.array([0, 1]), np.arange(16) % 4), (np.ones(2), np.ones(16)))
    batches = sft_batches(layout, cat, seqs, batch_size=4, max_history=15, buckets=(16, 32, 128),
                          rng=np.random.default_rng(0))
    widths = {next(batches)["tokens"].shape[1] for _ in range(40)}
    assert 16 in widths and 128 in widths  # short windows are not padded to the longest bucket


def test_sft_windows_make_every_position_a_target_once():
    lengths = (1, 2, 5, 6, 11, 23)
    seqs = RewardedSequences(tuple(np.arange(n) for n in lengths), tuple(np.ones(n) for n in lengths))
    ends, top = sft_windows(seqs, max_history=5)
    assert top == 1.0
    for u, n in enumerate(lengths):
        targets = [p for user, end in ends if user == u for p in range(max(0, end - 5) + 1, end + 1)]
        assert sorted(targets) == list(range(1, n))  # each position after the first, exactly once
    assert max(end for user, end in ends if user == 5) == 22  # the most recent item is always a target
