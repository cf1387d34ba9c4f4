"""`plum features register` / `plum features list`: context features for feature teams.

A registration validates the spec (pydantic, features/registry.py), re-applies the Feast repo with
the grown user_context view and records the spec in the registry. From there on, without a
restart: the pipeline fills the feature from events' context (and first backfills every user's
latest value it has seen), the continuous trainer adds its tokens at its next checkpoint boundary,
the next exported version's prompt schema names it, and serving reads it from Feast for versions
whose schema has it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from features import FeatureStoreClient
from features.registry import ContextFeatureSpec
from ops.config import PlumConfig
from ops.errors import PlumError
from trainer.checkpoint import CheckpointError, read_manifest
from trainer.servable import version_numbers


def parse_spec(text: str) -> ContextFeatureSpec:
    """A spec from a YAML/JSON file path, or from the YAML/JSON text itself; clear errors."""
    path = Path(text)
    source = f"file {path}" if _is_file(path) else "the spec text"
    raw = path.read_text() if _is_file(path) else text
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PlumError(f"The spec in {source} is not valid YAML or JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise PlumError(f"The spec in {source} must be a mapping (name, type, values or buckets, ...); "
                        f"got {type(data).__name__}. Pass a file path or text such as "
                        "'{name: device, type: categorical, values: [tv, phone]}'.")
    try:
        return ContextFeatureSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
                             for err in exc.errors())
        raise PlumError(f"Invalid context-feature spec ({source}): {problems}.") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # text too long to be a path
        return False


def register(cfg: PlumConfig, text: str) -> list[ContextFeatureSpec]:
    """Validate and register one spec; returns every registered feature."""
    spec = parse_spec(text)
    return FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).register_context_feature(spec)


def versions_using(model_dir: Path) -> dict[str, list[int]]:
    """Feature name -> the servable versions whose prompt schema holds it."""
    using: dict[str, list[int]] = {}
    for version in version_numbers(model_dir):
        try:
            manifest = read_manifest(model_dir / str(version))
        except CheckpointError:
            continue
        for feature in (manifest.get("prompt_schema") or {}).get("features", []):
            using.setdefault(feature["name"], []).append(version)
    return using


def listing(cfg: PlumConfig) -> list[dict[str, Any]]:
    """Every registered feature with how it is tokenised and which versions use it."""
    specs = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).registry.specs()
    using = versions_using(cfg.paths.model_dir)
    return [{**spec.model_dump(mode="json"), "versions": using.get(spec.name, [])} for spec in specs]


def format_listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No context features registered (plum features register SPEC adds one)."
    lines = []
    for row in rows:
        tokens = (f"values {', '.join(row['values'])} (+ unknown)" if row["type"] == "categorical"
                  else f"buckets at {', '.join(f'{b:g}' for b in row['buckets'])}")
        used = (f"versions {', '.join(map(str, row['versions']))}" if row["versions"]
                else "no version yet (joins the next exported version)")
        description = f" - {row['description']}" if row["description"] else ""
        lines.append(f"{row['name']}: {row['type']}, {tokens}; used by {used}{description}")
    return "\n".join(lines)


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
