"""The real pinned recbole wheel: downloaded with pip, verified, extracted, and loadable as MovieLens-100K."""

from __future__ import annotations

import pytest

from ingest.datasets import MOVIELENS_100K
from ops.datasets import load_dataset
from ops.assets import COMPLETE_MARKER, asset_path, fetch_asset, get_spec
from ops.errors import AssetError

pytestmark = pytest.mark.integration


def test_recbole_wheel_is_fetched_verified_and_holds_movielens(tmp_path, data_dir):
    cache = tmp_path / "cache"
    target = fetch_asset("recbole", cache)
    assert target == cache / "recbole-1.2.1"
    assert (target / "ml-100k.inter").is_file() and (target / "ml-100k.item").is_file()
    assert (target / COMPLETE_MARKER).read_text().strip() == get_spec("recbole").sha256
    assert asset_path("recbole", cache) == target
    assert sorted(path.name for path in cache.iterdir()) == ["recbole-1.2.1"]

    movielens = load_dataset(MOVIELENS_100K, data_dir, cache)
    assert len(movielens.interactions) == 100_000
    assert movielens.interactions["user_id"].nunique() == 943
    assert len(movielens.items) == 1_682


def test_the_kafka_jars_are_fetched_with_maven_and_a_wrong_digest_keeps_nothing(tmp_path):
    from ops.assets import MavenSetSpec, fetch_spec

    cache = tmp_path / "cache"
    target = fetch_asset("kafka", cache)
    spec = get_spec("kafka")
    assert sorted(p.name for p in target.glob("*.jar")) == sorted(MavenSetSpec.file_name(c) for c, _ in spec.jars)
    assert (target / COMPLETE_MARKER).read_text().strip() == spec.sha256

    coordinate, digest = spec.jars[0]
    tampered = MavenSetSpec("kafka-tampered", spec.version, ((coordinate, "0" * 64),) + spec.jars[1:])
    with pytest.raises(AssetError, match=f"Checksum mismatch for {MavenSetSpec.file_name(coordinate)}"):
        fetch_spec(tampered, cache)
    assert sorted(path.name for path in cache.iterdir()) == ["kafka-4.4.0"]  # no partial folder left
