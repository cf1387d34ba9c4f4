import json

import numpy as np
import pytest

from tokenizer.sid_table import (
    SIDTableError, collision_metrics, load_params, load_table, new_table, save_table, update_items, versions,
)

pytestmark = pytest.mark.unit

SIZES = (8, 4)


def table(version=1):
    ids = ["b", "a", "c", "d"]
    codes = np.array([[1, 2], [1, 2], [3, 0], [1, 2]])
    return new_table(version, ids, codes, SIZES, config={"latent_dim": 4})


def test_suffixes_make_every_sid_unique_and_metrics_see_collisions():
    t = table()
    assert {t.sid(i) for i in "abcd"} == {(1, 2, 0), (1, 2, 1), (1, 2, 2), (3, 0, 0)}
    assert t.sid("a") == (1, 2, 0) and t.sid("b") == (1, 2, 1)  # item-id order inside a group
    assert t.suffix_size == 3
    assert t.metrics["uniqueness_before_suffix"] == 0.5
    assert t.metrics["largest_collision_group"] == 3
    assert t.metrics["levels"][0]["utilisation"] == 2 / 8
    assert len(t.item_for_sid()) == 4


def test_round_trip_with_params(tmp_path):
    t = table()
    save_table(tmp_path, t, {"encoder/w": np.arange(6.0).reshape(2, 3)})
    again = load_table(tmp_path)
    assert again.codes == t.codes and again.suffix == t.suffix and again.codebook_sizes == SIZES
    assert again.config == {"latent_dim": 4} and again.metrics == t.metrics
    np.testing.assert_array_equal(load_params(tmp_path, 1)["encoder/w"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(SIDTableError, match="already exists"):
        save_table(tmp_path, table())


def test_adding_items_keeps_existing_sids(tmp_path):
    t = table()
    save_table(tmp_path, t)
    before = {i: t.sid(i) for i in "abcd"}
    added = t.add(["e", "a", "f"], np.array([[1, 2], [7, 3], [5, 1]]))
    assert added == ["e", "f"]
    update_items(tmp_path, t)
    again = load_table(tmp_path, 1)
    assert {i: again.sid(i) for i in "abcd"} == before
    assert again.sid("e") == (1, 2, 3) and again.sid("f") == (5, 1, 0)
    assert len(set(again.item_for_sid())) == 6
    with pytest.raises(SIDTableError, match="do not fit"):
        t.add(["g"], np.array([[9, 0]]))


def test_incomplete_or_missing_versions_are_clear_errors(tmp_path):
    with pytest.raises(SIDTableError, match="plum tokenize fit"):
        load_table(tmp_path)
    (tmp_path / "2").mkdir()
    save_table(tmp_path, table(1))
    assert versions(tmp_path) == [1]
    with pytest.raises(SIDTableError, match="incomplete"):
        load_table(tmp_path, 2)
    meta = tmp_path / "1" / "meta.json"
    data = json.loads(meta.read_text())
    data["items"] = 99
    meta.write_text(json.dumps(data))
    with pytest.raises(SIDTableError, match="lists 99 items but holds 4"):
        load_table(tmp_path, 1)


def test_metrics_perplexity_is_uniform_maximum():
    codes = {str(i): (i % 4, 0) for i in range(8)}
    m = collision_metrics(codes, (4, 2))
    assert m["levels"][0]["perplexity"] == pytest.approx(4.0)
    assert m["levels"][1]["perplexity"] == pytest.approx(1.0)
