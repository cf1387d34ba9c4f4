import numpy as np
import pytest

from tokenizer.content import (
    ContentError, MetadataVocabulary, build_content, collaborative_features, metadata_features,
)

pytestmark = pytest.mark.unit


def test_metadata_multi_hot_and_year_with_missing_values():
    tags, years = [["drama", "war"], ["drama"], []], [1990.0, None, None]
    vocabulary = MetadataVocabulary.fit(tags, years, max_tags=8)
    assert vocabulary.tags == ("drama", "war")
    x, present = metadata_features(tags, years, vocabulary)
    assert x.shape == (3, 2 + 2)
    assert list(x[0, :2]) == [1.0, 1.0] and list(x[1, :2]) == [1.0, 0.0]  # drama is the most frequent tag
    assert x[0, -1] == 1.0 and x[1, -1] == 0.0
    assert list(present) == [True, True, False]  # no tags and no year: metadata absent
    later, _ = metadata_features([["war", "unseen-tag"]], [2000.0], vocabulary)  # frozen vocabulary
    assert list(later[0, :2]) == [0.0, 1.0] and later.shape == (1, 4)


def test_collaborative_vectors_put_co_occurring_items_together():
    items = [f"i{k}" for k in range(12)]
    # two communities, each item paired with every other item of its community
    pairs = [(a, b, 5) for group in (items[:6], items[6:11]) for i, a in enumerate(group) for b in group[i + 1:]]
    x, present = collaborative_features(items, pairs, dim=4)
    assert list(present) == [True] * 11 + [False]  # i11 never co-occurs
    assert not x[11].any()
    unit = x[:11] / np.linalg.norm(x[:11], axis=1, keepdims=True)
    sim = unit @ unit.T
    assert sim[0, 1] > 0.9 and sim[6, 7] > 0.9
    assert sim[0, 7] < 0.2


def test_build_content_concatenates_in_modality_order_and_validates():
    ids = ["a", "b"]
    meta = (np.ones((2, 3), np.float32), np.array([True, False]))
    collab = (np.zeros((2, 2), np.float32), np.array([False, True]))
    content = build_content(ids, {"collaborative": collab, "metadata": meta})
    assert content.modality_dims == (("metadata", 3), ("collaborative", 2))
    assert content.x.shape == (2, 5)
    assert content.presence.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    np.testing.assert_allclose(content.block("metadata"), meta[0] / np.sqrt(3))  # unit norm per item
    with pytest.raises(ContentError, match="empty"):
        build_content([], {"metadata": meta})
    bad = (np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32), np.array([True, True]))
    with pytest.raises(ContentError, match="1 items are NaN"):
        build_content(ids, {"metadata": bad})
