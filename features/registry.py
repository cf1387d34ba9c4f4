"""The context-feature registry (DESIGN.md, features/): what feature teams register, kept as one
JSON file beside the Feast repo. A spec says how a value of the event's context becomes a prompt
token: a categorical vocabulary (anything else is the feature's unknown token) or numeric bucket
edges. The trainer adopts newly registered features at its next checkpoint boundary; serving
builds each version's prompts from that version's own schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from features.errors import FeatureStoreError

REGISTRY_FILE = "context_features.json"
RESERVED = {"user_id", "item_id", "event_id", "event_time", "event_type", "reward"}


class ContextFeatureSpec(BaseModel):
    """One context feature: its name in events' `context`, its type and how it is tokenised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    entity: Literal["event"] = "event"  # values arrive in each event's context
    type: Literal["categorical", "numeric"]
    values: tuple[str, ...] = ()  # categorical: the known values
    buckets: tuple[float, ...] = ()  # numeric: increasing bucket edges (len + 1 buckets)
    description: str = ""

    @model_validator(mode="after")
    def _tokenisation(self) -> "ContextFeatureSpec":
        if self.name in RESERVED:
            raise ValueError(f"{self.name!r} is an event field, not a context feature name")
        if self.type == "categorical":
            if not self.values or self.buckets:
                raise ValueError("a categorical feature lists its values and no buckets")
            if len(set(self.values)) != len(self.values):
                raise ValueError("categorical values must be distinct")
        else:
            if not self.buckets or self.values:
                raise ValueError("a numeric feature lists its bucket edges and no values")
            if list(self.buckets) != sorted(set(self.buckets)):
                raise ValueError("bucket edges must be strictly increasing")
        return self


class ContextFeatureRegistry:
    """Registered specs in registration order (the order their tokens take in the prompt)."""

    def __init__(self, repo_dir: Path) -> None:
        self.path = Path(repo_dir) / REGISTRY_FILE

    def specs(self) -> list[ContextFeatureSpec]:
        if not self.path.is_file():
            return []
        try:
            return [ContextFeatureSpec.model_validate(s) for s in json.loads(self.path.read_text())]
        except (json.JSONDecodeError, ValidationError, TypeError) as exc:
            raise FeatureStoreError(f"The context-feature registry {self.path} is damaged: {exc}") from None

    def register(self, spec: ContextFeatureSpec) -> None:
        """Append a spec; a name already registered is refused (registered features never change)."""
        specs = self.specs()
        if any(s.name == spec.name for s in specs):
            raise FeatureStoreError(f"A context feature named {spec.name!r} is already registered; "
                                    "choose another name (registered features never change).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([s.model_dump(mode="json") for s in [*specs, spec]], indent=2))
        os.replace(tmp, self.path)
