"""Model checkpoints: orbax parameters plus `manifest.json` (DESIGN.md, contracts: servable version).

<directory>/
  params/        orbax checkpoint of the decoder's parameters (a pure dict pytree)
  manifest.json  model config, vocabulary layout, sid_version, prompt schema, data watermark,
                 eval metrics, parent checkpoint, created_at (and whatever the caller adds)
A checkpoint is written under a temporary sibling name and renamed into place, so a reader sees a
complete directory or none; `load_model` refuses a directory without a manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from trainer.model import Decoder, DecoderConfig

MANIFEST = "manifest.json"
PARAMS = "params"


class CheckpointError(Exception):
    """A checkpoint directory is missing, incomplete or does not match its manifest."""


def decoder_config_json(cfg: DecoderConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def decoder_config_from_json(data: dict[str, Any]) -> DecoderConfig:
    known = {f.name for f in dataclasses.fields(DecoderConfig)}
    return DecoderConfig(**{k: v for k, v in data.items() if k in known})


def save_model(directory: Path, model: nnx.Module, manifest: dict[str, Any],
               write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write params + manifest (+ whatever `write_extra` writes into the directory) atomically;
    refuses to overwrite an existing checkpoint."""
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"Checkpoint {directory} already exists; choose a new directory or version.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / PARAMS).resolve(), params)
        checkpointer.wait_until_finished()
        full = {"model_config": decoder_config_json(model.cfg),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest}
        if write_extra is not None:
            write_extra(tmp)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MANIFEST}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def restore_params(directory: Path, abstract: nnx.Module) -> nnx.Module:
    """The module `abstract` (from nnx.eval_shape) with the checkpoint's parameters."""
    graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(param_state))
    try:
        params = ocp.StandardCheckpointer().restore((Path(directory) / PARAMS).resolve(), target)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"Checkpoint {directory} does not match its manifest: {exc}") from None
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(graphdef, param_state, rest)


def load_model(directory: Path) -> tuple[Decoder, dict[str, Any]]:
    """The decoder of a checkpoint and its manifest."""
    manifest = read_manifest(directory)
    cfg = decoder_config_from_json(manifest["model_config"])
    return restore_params(directory, nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))), manifest
