"""The real pinned assets: the recbole wheel (downloaded with pip, verified, extracted, and loadable as
MovieLens-100K), the Kafka jars (Maven, sha256 checked) and Prism (built with Go against a pinned go.sum)."""

from __future__ import annotations

import dataclasses
import subprocess

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


def test_prism_is_built_against_the_pinned_go_sum_cached_and_a_tampered_sum_is_refused(tmp_path, asset_cache_dir):
    from ops.assets import fetch_spec, prism_binary

    cache = tmp_path / "cache"
    cache.mkdir()
    if (asset_cache_dir / ".go").is_dir():
        # The user's Go module and build caches: still a real `go build` and link, minus downloads and recompiles.
        (cache / ".go").symlink_to(asset_cache_dir / ".go")
    spec = get_spec("prism")
    binary = prism_binary(cache)
    assert binary == cache / "prism-v2.77.0" / "prism"
    assert (binary.parent / COMPLETE_MARKER).read_text().strip() == spec.sha256
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == 0 and "-job_port" in usage.stdout + usage.stderr

    built = binary.stat().st_mtime_ns
    assert fetch_asset("prism", cache) == binary.parent == asset_path("prism", cache)
    assert binary.stat().st_mtime_ns == built  # a cache hit: nothing rebuilt

    pinned = next(line for line in spec.go_sum.splitlines() if line.startswith(f"{spec.module} {spec.version} h1:"))
    digest = pinned.rsplit("h1:", 1)[1]
    wrong = pinned.replace(digest, ("B" if digest[0] == "A" else "A") + digest[1:])
    tampered = dataclasses.replace(spec, name="prism-tampered", go_sum=spec.go_sum.replace(pinned, wrong))
    with pytest.raises(AssetError, match=f"go build of prism-tampered v2.77.0 failed: verifying {spec.module}@"
                                         f"{spec.version}: checksum mismatch"):
        fetch_spec(tampered, cache)
    assert sorted(path.name for path in cache.iterdir()) == [".go", "prism-v2.77.0"]  # no partial folder left


def test_building_prism_without_go_says_to_install_it(tmp_path, monkeypatch):
    import ops.assets

    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(ops.assets, "_GO_FALLBACK", tmp_path / "go" / "bin" / "go")
    with pytest.raises(AssetError, match=r"^Prism is built from the Go module proxy: install Go >= 1\.26 "
                                         r"\(found none on PATH\)$"):
        fetch_asset("prism", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
