"""The SID table artifact: one directory per version (DESIGN.md, contracts: SID table).

<root>/<version>/
  meta.json     version, parent version, codebook sizes, suffix size, RQ-VAE config, metrics,
                item count, created_at
  items.parquet item_id, codes (one per level), suffix (collision suffix token)
  rqvae.npz     the frozen RQ-VAE parameters (flattened pytree), for re-tokenization
A version directory is written under a temporary name and renamed into place, so it is either
complete or absent; adding items rewrites items.parquet by an atomic replace. Within a version an
item's SID never changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

META = "meta.json"
ITEMS = "items.parquet"
PARAMS = "rqvae.npz"


class SIDTableError(Exception):
    """A SID table version is missing, incomplete or inconsistent."""


@dataclass
class SIDTable:
    """item_id -> (codes per level, collision suffix). `sid(item)` is the full token tuple."""

    version: int
    codebook_sizes: tuple[int, ...]
    codes: dict[str, tuple[int, ...]]
    suffix: dict[str, int]
    parent_version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def suffix_size(self) -> int:
        """Suffix tokens needed: the size of the largest group of items sharing a code tuple."""
        return max(self.suffix.values(), default=0) + 1

    def sid(self, item_id: str) -> tuple[int, ...]:
        return (*self.codes[item_id], self.suffix[item_id])

    def item_for_sid(self) -> dict[tuple[int, ...], str]:
        """The inverse map, full SID -> item; unique by construction."""
        return {self.sid(item): item for item in self.codes}

    def add(self, item_ids: Sequence[str], codes: np.ndarray) -> list[str]:
        """Give new items their codes and the next free suffix of their tuple; existing items keep theirs."""
        taken: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for item, tup in self.codes.items():
            taken[tup].add(self.suffix[item])
        added = []
        for item, row in zip(item_ids, np.asarray(codes)):
            if item in self.codes:
                continue
            tup = tuple(int(c) for c in row)
            if len(tup) != self.levels or any(not 0 <= c < n for c, n in zip(tup, self.codebook_sizes)):
                raise SIDTableError(f"Codes {tup} of item {item} do not fit codebook sizes {self.codebook_sizes}.")
            suffix = 0
            while suffix in taken[tup]:
                suffix += 1
            taken[tup].add(suffix)
            self.codes[item], self.suffix[item] = tup, suffix
            added.append(item)
        return added


def collision_metrics(codes: dict[str, tuple[int, ...]], codebook_sizes: Sequence[int]) -> dict[str, Any]:
    """Uniqueness before the suffix, per-level utilisation and perplexity, largest collision group."""
    if not codes:
        return {"items": 0}
    matrix = np.array(list(codes.values()), np.int64)
    groups: dict[tuple[int, ...], int] = defaultdict(int)
    for tup in codes.values():
        groups[tup] += 1
    levels = []
    for level, size in enumerate(codebook_sizes):
        counts = np.bincount(matrix[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        levels.append({"codebook_size": int(size), "utilisation": round(float((counts > 0).mean()), 4),
                       "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2)})
    return {
        "items": len(codes),
        "uniqueness_before_suffix": round(len(groups) / len(codes), 4),
        "largest_collision_group": max(groups.values()),
        "levels": levels,
    }


def save_table(root: Path, table: SIDTable, params: dict[str, np.ndarray] | None = None) -> Path:
    """Write a new version directory atomically; refuses to overwrite an existing version."""
    target = root / str(table.version)
    if target.exists():
        raise SIDTableError(f"SID table version {table.version} already exists in {root}.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{table.version}-", dir=root))
    try:
        _write_items(tmp / ITEMS, table)
        if params is not None:
            np.savez(tmp / PARAMS, **params)
        table.created_at = table.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / META).write_text(json.dumps(_meta(table), indent=2))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def update_items(root: Path, table: SIDTable) -> None:
    """Rewrite a version's items (after `add`) and its metrics, each file by atomic replace."""
    directory = root / str(table.version)
    if not (directory / META).is_file():
        raise SIDTableError(f"SID table version {table.version} does not exist in {root}.")
    table.metrics = {**table.metrics, **collision_metrics(table.codes, table.codebook_sizes)}
    tmp_items = directory / f".{ITEMS}.tmp"
    _write_items(tmp_items, table)
    os.replace(tmp_items, directory / ITEMS)
    tmp_meta = directory / f".{META}.tmp"
    tmp_meta.write_text(json.dumps(_meta(table), indent=2))
    os.replace(tmp_meta, directory / META)


def versions(root: Path) -> list[int]:
    """Complete versions, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / META).is_file())


def load_table(root: Path, version: int | None = None) -> SIDTable:
    """A version (default: the newest) with its items; a clear error if it is missing or incomplete."""
    available = versions(root)
    if version is None:
        if not available:
            raise SIDTableError(f"No SID table in {root}; run `plum tokenize fit` first.")
        version = available[-1]
    directory = root / str(version)
    if version not in available:
        hint = "it is incomplete (no meta.json)" if directory.exists() else "it does not exist"
        raise SIDTableError(f"SID table version {version} in {root} cannot be used: {hint}.")
    meta = json.loads((directory / META).read_text())
    items = pq.read_table(directory / ITEMS).to_pydict()
    table = SIDTable(
        version=meta["version"], codebook_sizes=tuple(meta["codebook_sizes"]),
        codes={i: tuple(c) for i, c in zip(items["item_id"], items["codes"])},
        suffix=dict(zip(items["item_id"], items["suffix"])),
        parent_version=meta.get("parent_version"), metrics=meta.get("metrics", {}),
        config=meta.get("config", {}), created_at=meta.get("created_at", ""),
    )
    if len(table.codes) != meta["items"]:
        raise SIDTableError(f"SID table version {version} lists {meta['items']} items but holds {len(table.codes)}.")
    return table


def load_params(root: Path, version: int) -> dict[str, np.ndarray]:
    path = root / str(version) / PARAMS
    if not path.is_file():
        raise SIDTableError(f"SID table version {version} has no RQ-VAE parameters ({path}).")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _write_items(path: Path, table: SIDTable) -> None:
    ids = sorted(table.codes)
    pq.write_table(pa.table({
        "item_id": pa.array(ids, pa.string()),
        "codes": pa.array([list(table.codes[i]) for i in ids], pa.list_(pa.int32())),
        "suffix": pa.array([table.suffix[i] for i in ids], pa.int32()),
    }), path)


def _meta(table: SIDTable) -> dict[str, Any]:
    return {
        "version": table.version, "parent_version": table.parent_version,
        "codebook_sizes": list(table.codebook_sizes), "suffix_size": table.suffix_size,
        "items": len(table.codes), "metrics": table.metrics, "config": table.config,
        "created_at": table.created_at,
    }


def new_table(version: int, item_ids: Sequence[str], codes: np.ndarray, codebook_sizes: Sequence[int],
              parent_version: int | None = None, config: dict[str, Any] | None = None) -> SIDTable:
    """A table from fitted codes: suffixes in item-id order within each colliding group."""
    table = SIDTable(version, tuple(int(n) for n in codebook_sizes), {}, {}, parent_version, {}, config or {})
    order = np.argsort(np.asarray(item_ids, dtype=object), kind="stable")
    table.add([item_ids[i] for i in order], np.asarray(codes)[order])
    table.metrics = collision_metrics(table.codes, table.codebook_sizes)
    return table
