"""Fixtures shared by every tier: where the public data sets and the asset cache live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ops.config import PathsConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder: $PLUM_DATA_DIR, else ../shared/data beside the repository."""
    path = Path(os.environ.get("PLUM_DATA_DIR") or REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"data folder {path} is missing; set PLUM_DATA_DIR to the shared data")
    return path


@pytest.fixture(scope="session")
def asset_cache_dir() -> Path:
    """The user's asset cache (XDG cache/plum-stream), where fetched wheels are extracted."""
    return Path(PathsConfig().cache_dir)
