"""Data sets by name: MovieLens-100K from the pinned recbole asset, the others from the data dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ingest.datasets import (
    AMAZON_BEAUTY, MOVIELENS_100K, MOVIETWEETINGS_100K, Dataset, DatasetError, load_amazon_beauty, load_movielens_100k,
    load_movietweetings,
)
from ops.assets import fetch_asset
from ops.errors import PlumError

_SOURCES: dict[str, Callable[[Path, Path], Dataset]] = {
    MOVIELENS_100K: lambda data_dir, cache_dir: load_movielens_100k(fetch_asset("recbole", cache_dir)),
    MOVIETWEETINGS_100K: lambda data_dir, cache_dir: load_movietweetings(data_dir / MOVIETWEETINGS_100K),
    AMAZON_BEAUTY: lambda data_dir, cache_dir: load_amazon_beauty(data_dir / AMAZON_BEAUTY),
}


def known_datasets() -> tuple[str, ...]:
    """The names load_dataset accepts."""
    return tuple(_SOURCES)


def load_dataset(name: str, data_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Dataset:
    """Load a data set by name (fetching the MovieLens asset when needed)."""
    try:
        source = _SOURCES[name]
    except KeyError:
        raise PlumError(f"Unknown data set {name!r}; known data sets: {', '.join(known_datasets())}.") from None
    try:
        return source(Path(data_dir), Path(cache_dir))
    except DatasetError as exc:
        raise PlumError(str(exc)) from None
