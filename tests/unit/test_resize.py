"""Vocabulary changes keep what each old token meant (trainer/resize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.resize import resize_state, token_sources
from trainer.vocab import SPECIALS, FeatureSpec, VocabLayout

pytestmark = pytest.mark.unit

OLD = VocabLayout((4, 8), 2, features=(FeatureSpec("device", "categorical", ("tv", "phone")),), text_ids=(10, 20))


def test_same_sid_version_copies_every_kept_token():
    new = VocabLayout((4, 8), 3, features=(FeatureSpec("device", "categorical", ("phone", "tv", "car")),
                                           FeatureSpec("hour", "numeric", edges=(12.0,))), text_ids=(20, 30, 10))
    sources = token_sources(OLD, new)
    assert sources[:len(SPECIALS)] == [[t] for t in range(len(SPECIALS))]
    assert sources[new.sid_offsets[1] + 5] == [OLD.sid_offsets[1] + 5]
    assert sources[new.sid_offsets[2] + 1] == [OLD.sid_offsets[2] + 1] and sources[new.sid_offsets[2] + 2] == []
    assert sources[new.text_offset] == [OLD.text_offset + 1] and sources[new.text_offset + 1] == []
    device_new, device_old = new.feature_offsets[0], OLD.feature_offsets[0]
    assert sources[device_new + 1] == [device_old + 2]  # "phone" moved, its row follows it
    assert sources[device_new + 3] == []  # "car" is new
    assert sources[new.feature_offsets[1]] == []  # a new feature starts fresh


def test_a_new_sid_version_averages_the_old_rows_of_the_items_sharing_a_code():
    new = VocabLayout((2, 8), 2, features=OLD.features, text_ids=OLD.text_ids)
    old_sids = {"a": (0, 1, 0), "b": (3, 2, 0), "c": (1, 1, 1)}
    new_sids = {"a": (1, 4, 0), "b": (1, 5, 0), "c": (0, 4, 1)}
    sources = token_sources(OLD, new, old_sids, new_sids)
    assert sources[new.sid_offsets[0] + 1] == [OLD.sid_offsets[0] + 0, OLD.sid_offsets[0] + 3]
    assert sources[new.sid_offsets[1] + 4] == [OLD.sid_offsets[1] + 1]  # a and c had the same level-1 code
    assert sources[new.sid_offsets[1] + 0] == []


def test_resize_moves_rows_and_moments_and_starts_fresh_rows_near_the_mean():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 3)).astype(np.float32)
    state = {0: {"embed": {"embedding": table}, "other": np.ones(2)},
             1: {"opt_state": {"mu": {"embed": {"embedding": table * 2}}}}}
    sources = [[0], [1, 2], [], [4]]
    out = resize_state(state, 5, sources)
    new = out[0]["embed"]["embedding"]
    np.testing.assert_allclose(new[0], table[0])
    np.testing.assert_allclose(new[1], table[1:3].mean(0))
    np.testing.assert_allclose(new[3], table[4])
    assert np.abs(new[2] - table.mean(0)).max() < 0.5 * table.std(0).max() + 1e-6
    moments = out[1]["opt_state"]["mu"]["embed"]["embedding"]
    np.testing.assert_allclose(moments[3], table[4] * 2)
    np.testing.assert_array_equal(moments[2], 0)
    np.testing.assert_array_equal(out[0]["other"], np.ones(2))
