"""Where the runner-state sinks write, and the one rule for the Feast online store: a key's
absolute value is written by the stateful DoFn that owns the key, at the end of its bundle.

A runner processes one bundle per key at a time and commits the key's state only after the bundle
(finish_bundle included) is done, so the owner's writes of one key land in the order its state
changed. Anything downstream of a shuffle may see two batches of one user in either order, and a
later write of an older value would win in the online store. A retried bundle recomputes the same
values from the same committed state and writes them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features import FeatureStoreClient
from features.config import FeastConfig
from ingest.folds import ItemMetadata, ItemStats, UserContext, UserHistory
from ingest.frames import view_frames


@dataclass(frozen=True)
class StoreSettings:
    """Where the sinks write; picklable so Beam can ship it to workers."""

    feast: FeastConfig
    feast_repo_dir: str
    training_log_dir: str
    durable: bool = True

    def open_features(self) -> FeatureStoreClient:
        return FeatureStoreClient(Path(self.feast_repo_dir), self.feast, self.durable)


class OnlineWrites:
    """The latest value per entity of one bundle, pushed to the online store when the bundle ends."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.users: dict[str, UserHistory] = {}
        self.contexts: dict[str, UserContext] = {}
        self.items: dict[str, ItemStats] = {}
        self.metadata: dict[str, ItemMetadata] = {}

    def flush(self, features: FeatureStoreClient | None) -> None:
        if features is not None:
            specs = features.context_specs() if self.contexts else []
            frames = view_frames(list(self.users.values()), list(self.items.values()),
                                 list(self.metadata.values()), list(self.contexts.values()), specs)
            for view, frame in frames.items():
                features.push_online(view, frame)
        self.clear()
