"""The context-feature registry (DESIGN.md, features/): what feature teams register, kept as one
JSON file beside the Feast repo. A spec says how a value of the event's context becomes a prompt
token: a categorical vocabulary (anything else is the feature's unknown token) or numeric bucket
edges. Values arrive in events' `context`; the pipeline keeps each user's latest value in the
Feast view user_context (features/repo.py). The trainer adopts newly registered features at its
next checkpoint boundary; serving builds each version's prompts from that version's own schema,
with the user's stored values unless the request gives its own.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from features.errors import FeatureStoreError

REGISTRY_FILE = "context_features.json"
# Event fields, and the names user_context's lookups share with user_history.
RESERVED = {"user_id", "item_id", "event_id", "event_time", "event_type", "reward", "event_timestamp",
            "history_item_ids", "history_rewards", "history_times", "event_count"}


class ContextFeatureSpec(BaseModel):
    """One context feature: its name in events' `context`, its type and how it is tokenised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    entity: Literal["user"] = "user"  # values arrive in events' context; Feast keeps each user's latest
    type: Literal["categorical", "numeric"]
    values: tuple[str, ...] = ()  # categorical: the known values
    buckets: tuple[float, ...] = ()  # numeric: increasing bucket edges (len + 1 buckets)
    description: str = ""

    @model_validator(mode="after")
    def _tokenisation(self) -> "ContextFeatureSpec":
        if self.name in RESERVED:
            raise ValueError(f"{self.name!r} is reserved (an event field or a user_history feature); choose another name")
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

    def fingerprint(self) -> tuple[int, int] | None:
        """Changes whenever the registry file is replaced (None while there is none): for caches."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_ino

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def register(self, spec: ContextFeatureSpec,
                 apply: Callable[[list[ContextFeatureSpec]], None] | None = None) -> list[ContextFeatureSpec]:
        """Append a spec and return the new list; a name already registered is refused (registered
        features never change). `apply(new_specs)` runs before the file is replaced (the Feast apply),
        so a failed apply registers nothing. Registrations are serialised by a lock file."""
        with self._locked():
            specs = self.specs()
            if any(s.name == spec.name for s in specs):
                raise FeatureStoreError(f"A context feature named {spec.name!r} is already registered; "
                                        "choose another name (registered features never change).")
            new = [*specs, spec]
            if apply is not None:
                apply(new)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps([s.model_dump(mode="json") for s in new], indent=2))
            os.replace(tmp, self.path)
            return new
