"""Version policies and routing (serving/versions.py): which versions are served, who answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from serving.versions import ServingConfig, UnknownVersion, VersionManager, VersionPolicy, VersionStatus

pytestmark = pytest.mark.unit


def test_policies_choose_versions_and_always_keep_labelled_ones():
    assert VersionPolicy("latest", 2).select([1, 2, 3, 5], {}) == {3, 5}
    assert VersionPolicy("latest", 1).select([1, 2, 3], {"stable": 1}) == {1, 3}
    assert VersionPolicy("specific", versions=(2, 9)).select([1, 2, 3], {}) == {2}
    assert VersionPolicy("all").select([1, 2], {"canary": 7}) == {1, 2}  # a label on a missing version is ignored


def _manager(tmp_path, labels: dict[str, int] | None, canary_share: float = 0.0, available=(1, 2, 3)):
    manager = VersionManager(ServingConfig("plum", tmp_path, labels=labels, canary_share=canary_share),
                             beam_width=10, max_batch=8, say=lambda m: None)
    manager.statuses = {v: VersionStatus(v, "AVAILABLE") for v in available}
    return manager


def test_requests_go_to_stable_with_a_canary_share(tmp_path):
    manager = _manager(tmp_path, {"stable": 2, "canary": 3}, canary_share=0.2)
    counts = Counter(manager.choose() for _ in range(5000))
    assert set(counts) == {2, 3} and 0.17 < counts[3] / 5000 < 0.23
    assert manager.choose(label="canary") == 3 and manager.choose(version=1) == 1


def test_without_labels_the_newest_available_answers_and_labels_json_is_read(tmp_path):
    assert _manager(tmp_path, None).choose() == 3
    (tmp_path / "labels.json").write_text(json.dumps({"stable": 1}))
    assert _manager(tmp_path, None).choose() == 1


def test_unknown_versions_and_labels_are_refused_with_what_exists(tmp_path):
    manager = _manager(tmp_path, {"stable": 2})
    with pytest.raises(UnknownVersion, match="version 9 .* not available"):
        manager.choose(version=9)
    with pytest.raises(UnknownVersion, match="label 'canary'"):
        manager.choose(label="canary")
    with pytest.raises(UnknownVersion, match="no available version"):
        _manager(tmp_path, None, available=()).choose()
