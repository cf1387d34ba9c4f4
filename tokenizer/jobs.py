"""The tokenizer's jobs: fit a new SID version, and assign SIDs to new items with a frozen one.

The catalogue arrives as a DataFrame (item_id, title, tags, published_at in unix seconds or
null) and co-occurrences as (item_a, item_b, count) triples; where they come from (Feast, the
pipeline's state) is the caller's business.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from tokenizer.config import TokenizeSettings
from tokenizer.content import (
    ContentError, ItemContent, MetadataVocabulary, build_content, collaborative_features,
    metadata_features, text_features,
)
from tokenizer.rqvae import RQVAEConfig, default_codebook_sizes
from tokenizer.rqvae_train import assign_codes, model_params, restore_model, train
from tokenizer.sid_table import SIDTable, load_params, load_table, new_table, save_table, update_items, versions
from tokenizer.text_encoder import TextEncoder

Progress = Callable[[str], None]


def release_years(published_at: Sequence[Any]) -> list[float | None]:
    """Years of unix-second publication times; None where unknown."""
    years: list[float | None] = []
    for value in published_at:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            years.append(None)
        else:
            years.append(float(pd.Timestamp(int(value), unit="s", tz="UTC").year))
    return years


def rqvae_config(modality_dims: tuple[tuple[str, int], ...], n_items: int, overrides: dict[str, Any]) -> RQVAEConfig:
    """The RQ-VAE config of a fit: codebooks sized to the catalogue unless `overrides` names them."""
    sizes = {} if "codebook_sizes" in overrides else {"codebook_sizes": default_codebook_sizes(n_items)}
    return RQVAEConfig(modality_dims=modality_dims, **{**sizes, **overrides})


def catalogue_content(catalogue: pd.DataFrame, pairs: Sequence[tuple[str, str, int]], encoder: TextEncoder | None,
                      modalities: Sequence[str], vocabulary: MetadataVocabulary, collaborative_dim: int,
                      with_collaborative: bool = True) -> ItemContent:
    """Features of every catalogue item in the given modality layout."""
    ids = [str(i) for i in catalogue["item_id"]]
    blocks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if "text" in modalities:
        if encoder is None:
            raise ContentError("The text modality needs the MiniLM encoder.")
        blocks["text"] = text_features(list(catalogue["title"]), [None] * len(ids), encoder)
    if "metadata" in modalities:
        blocks["metadata"] = metadata_features([list(t) if t is not None else [] for t in catalogue["tags"]],
                                               release_years(list(catalogue["published_at"])), vocabulary)
    if "collaborative" in modalities:
        if with_collaborative:
            blocks["collaborative"] = collaborative_features(ids, pairs, collaborative_dim)
        else:  # a frozen SVD basis has no row for a new item: the modality is absent for it
            blocks["collaborative"] = (np.zeros((len(ids), collaborative_dim), np.float32), np.zeros(len(ids), bool))
    return build_content(ids, blocks)


def fit(root: Path, catalogue: pd.DataFrame, pairs: Sequence[tuple[str, str, int]], encoder: TextEncoder | None,
        settings: TokenizeSettings, say: Progress = print) -> tuple[SIDTable, int | None]:
    """Train a new RQ-VAE, write SID version N+1; returns it and how many items' SIDs changed vs N."""
    vocabulary = MetadataVocabulary.fit([list(t) if t is not None else [] for t in catalogue["tags"]],
                                        release_years(list(catalogue["published_at"])), settings.max_tags)
    content = catalogue_content(catalogue, pairs, encoder, settings.modalities, vocabulary, settings.collaborative_dim)
    say(f"tokenize: {len(content.item_ids):,} items, modalities "
        + ", ".join(f"{n} ({int(content.presence[:, k].sum()):,} items, {d} dims)"
                    for k, (n, d) in enumerate(content.modality_dims)))
    cfg = rqvae_config(content.modality_dims, len(content.item_ids), settings.rqvae)
    index = {item: k for k, item in enumerate(content.item_ids)}
    pair_index = np.array([(index[a], index[b]) for a, b, _ in pairs if a in index and b in index],
                          np.int32).reshape(-1, 2)

    def report(step: int, loss: float, metrics: dict[str, Any]) -> None:
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            say(f"tokenize: step {step}/{settings.steps} loss {loss:.4f}")

    model, history = train(cfg, content.x, content.presence, pair_index, settings.steps, settings.batch_size,
                           settings.learning_rate, progress=report)
    codes = assign_codes(model, content.x, content.presence, settings.batch_size)
    existing = versions(root)
    parent = existing[-1] if existing else None
    table = new_table((parent or 0) + 1, list(content.item_ids), codes, cfg.level_sizes, parent_version=parent,
                      config={"rqvae": asdict(cfg), "settings": settings.model_dump(mode="json"),
                              "metadata_vocabulary": asdict(vocabulary)})
    table.metrics["training"] = {k: float(v) for k, v in (history[-1] if history else {}).items()
                                 if np.ndim(v) == 0}
    changed = None
    if parent is not None:
        previous = load_table(root, parent)
        common = [i for i in table.codes if i in previous.codes]
        changed = sum(previous.sid(i) != table.sid(i) for i in common)
        table.metrics["sids_changed_vs_parent"] = changed
    save_table(root, table, model_params(model))
    return table, changed


def assign(root: Path, catalogue: pd.DataFrame, encoder: TextEncoder | None, say: Progress = print) -> list[str]:
    """Give SIDs to catalogue items the newest version lacks, with its frozen model; returns them."""
    table = load_table(root)
    new = catalogue[~catalogue["item_id"].astype(str).isin(table.codes)].reset_index(drop=True)
    if new.empty:
        say(f"tokenize: SID version {table.version} already covers all {len(catalogue):,} items")
        return []
    settings = table.config["settings"]
    vocabulary = MetadataVocabulary(**{**table.config["metadata_vocabulary"],
                                       "tags": tuple(table.config["metadata_vocabulary"]["tags"])})
    content = catalogue_content(new, [], encoder, settings["modalities"], vocabulary, settings["collaborative_dim"],
                                with_collaborative=False)
    cfg = RQVAEConfig(**_config_from_json(table.config["rqvae"]))
    if content.modality_dims != cfg.modality_dims:
        raise ContentError(f"New items' features {content.modality_dims} do not match SID version "
                           f"{table.version}'s {cfg.modality_dims}.")
    model = restore_model(cfg, load_params(root, table.version))
    codes = assign_codes(model, content.x, content.presence, settings["batch_size"])
    added = table.add(list(content.item_ids), codes)
    update_items(root, table)
    say(f"tokenize: gave {len(added):,} new items SIDs in version {table.version} "
        f"(uniqueness before suffix now {table.metrics['uniqueness_before_suffix']:.3f})")
    return added


def _config_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back into the tuples a frozen config holds."""
    out = {}
    for key, value in data.items():
        if key == "modality_dims":
            out[key] = tuple((str(n), int(d)) for n, d in value)
        elif isinstance(value, list):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out
