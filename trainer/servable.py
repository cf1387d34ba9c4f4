"""Servable versions (DESIGN.md, contracts: servable version), written by the trainer, read by serving.

<model_dir>/<int version>/
  params/         orbax parameters of the decoder
  manifest.json   model config, vocabulary layout, sid_version, prompt schema, data watermark, eval
                  figures, parent checkpoint, created_at (trainer/checkpoint.py), and "search":
                  {"beam_width": N}, the search its gates judged and serving runs
  items.parquet   item_id and full SID (codes + suffix) of every item the version can recommend: a
                  snapshot, so items the tokenizer adds later do not change a published version
<model_dir>/labels.json   {"stable": N, "canary": M}: which versions the labels point at (ops writes)

A version is written under a temporary name and renamed into place: every numeric directory is
complete, and readers ignore everything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenizer.sid_table import SIDTable
from trainer.checkpoint import MANIFEST, CheckpointError, load_model, read_manifest, restore_params, save_model
from trainer.data import Catalogue
from trainer.model import Decoder
from trainer.vocab import VocabLayout

ITEMS = "items.parquet"
LABELS = "labels.json"
DECODER = "plum-decoder"  # manifest "kind": generative retrieval (the default)
SASREC = "sasrec-dot"  # the SASRec baseline: dot-product top-K over its item embeddings
SEARCH = "search"  # manifest key: {"beam_width": N}


@dataclass(frozen=True)
class ItemCatalogue:
    """The items of one SID table version that fit a vocabulary: ids, raw SIDs, token-space catalogue."""

    item_ids: tuple[str, ...]
    index: dict[str, int]
    sids: np.ndarray  # [n, levels + 1] codes and suffix
    catalogue: Catalogue
    unfit: int  # items whose suffix the vocabulary has no token for

    @classmethod
    def build(cls, layout: VocabLayout, item_ids: Sequence[str], sids: np.ndarray) -> "ItemCatalogue":
        sids = np.asarray(sids, np.int64).reshape(len(item_ids), -1)
        fits = sids[:, -1] < layout.suffix_size if len(sids) else np.zeros(0, bool)
        kept = [item for item, ok in zip(item_ids, fits) if ok]
        kept_sids = sids[fits]
        tokens = np.array([layout.sid_tokens(row) for row in kept_sids.tolist()], np.int32).reshape(
            len(kept), layout.sid_depth)
        return cls(tuple(kept), {item: k for k, item in enumerate(kept)}, kept_sids,
                   Catalogue(tokens, tuple(() for _ in kept)), int((~fits).sum()))

    @classmethod
    def from_table(cls, layout: VocabLayout, table: SIDTable) -> "ItemCatalogue":
        item_ids = sorted(table.codes)
        return cls.build(layout, item_ids, np.array([table.sid(i) for i in item_ids], np.int64))


def version_numbers(model_dir: Path) -> list[int]:
    """Complete versions under model_dir, oldest first."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file())


def labels(model_dir: Path) -> dict[str, int]:
    path = Path(model_dir) / LABELS
    if not path.is_file():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a JSON object of label -> version: {exc}") from None


def served_version(model_dir: Path) -> int | None:
    """The version labelled stable, or else the newest complete version; None when there is none."""
    stable = labels(model_dir).get("stable")
    if stable is not None and stable in version_numbers(model_dir):
        return stable
    numbers = version_numbers(model_dir)
    return numbers[-1] if numbers else None


def recorded_beam_width(manifest: dict[str, Any]) -> int | None:
    """The beam width a version's manifest records: the search its export and promotion gates judged,
    and the one serving runs. None for versions exported before the manifest recorded it."""
    width = (manifest.get(SEARCH) or {}).get("beam_width")
    return None if width is None else int(width)


def export_version(model_dir: Path, model: Decoder, manifest: dict[str, Any], item_ids: Sequence[str],
                   sids: np.ndarray) -> Path:
    """Publish the model as the next version number with its catalogue snapshot; returns its directory."""
    if len(item_ids) != len(sids):
        raise ValueError("one SID row per item is needed")
    version = max(version_numbers(model_dir), default=0) + 1

    def write_items(directory: Path) -> None:
        table = pa.table({"item_id": pa.array(list(item_ids), pa.string()),
                          "sid": pa.array(np.asarray(sids, np.int64).tolist(), pa.list_(pa.int64()))})
        pq.write_table(table, directory / ITEMS)

    return save_model(Path(model_dir) / str(version), model, {**manifest, "version": version}, write_items)


def load_version(model_dir: Path, version: int) -> tuple[Decoder, dict[str, Any], list[str], np.ndarray]:
    """A complete version's decoder, manifest, item ids and SIDs [n_items, levels + 1]."""
    directory = Path(model_dir) / str(version)
    if version not in version_numbers(model_dir):
        raise CheckpointError(f"Version {version} is not a complete version in {model_dir}.")
    model, manifest = load_model(directory)
    if not (directory / ITEMS).is_file():
        raise CheckpointError(f"Version {version} in {model_dir} has no {ITEMS}.")
    items = pq.read_table(directory / ITEMS).to_pydict()
    return model, manifest, list(items["item_id"]), np.array(items["sid"], np.int64).reshape(len(items["item_id"]), -1)


def export_sasrec_version(model_dir: Path, model: Any, item_ids: Sequence[str], manifest: dict[str, Any]) -> Path:
    """Publish a SASRec model (trainer/sasrec.py) as the next version: the serving tier answers it by a
    dot-product top-K, the reference an embedding-table system would serve. items.parquet lists the
    items in the model's index order (their SID column is empty)."""
    sids = np.zeros((len(item_ids), 0), np.int64)
    return export_version(model_dir, model, {**manifest, "kind": SASREC}, item_ids, sids)


def load_sasrec_version(model_dir: Path, version: int) -> tuple[Any, dict[str, Any], list[str]]:
    """A SASRec version's model, manifest and item ids (index order)."""
    import dataclasses

    from flax import nnx

    from trainer.sasrec import SASRec, SASRecConfig

    directory = Path(model_dir) / str(version)
    if version not in version_numbers(model_dir):
        raise CheckpointError(f"Version {version} is not a complete version in {model_dir}.")
    manifest = read_manifest(directory)
    known = {f.name for f in dataclasses.fields(SASRecConfig)}
    cfg = SASRecConfig(**{k: v for k, v in manifest["model_config"].items() if k in known})
    model = restore_params(directory, nnx.eval_shape(lambda: SASRec(cfg, nnx.Rngs(0))))
    items = pq.read_table(directory / ITEMS, columns=["item_id"]).to_pydict()["item_id"]
    return model, manifest, list(items)
