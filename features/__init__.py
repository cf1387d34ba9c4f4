"""Feast feature repo and store wrapper: user_history, item_stats, item_metadata, item_sid, and
user_context (registered context features).

Public surface: FeatureStoreClient, FeatureStoreError, feature_objects, the view names and
VIEW_COLUMNS (each view's DataFrame columns), the context-feature registry (ContextFeatureSpec,
ContextFeatureRegistry), and PublishConflictError (features/files.py: durable publication of
files that never overwrites one, also used by the training log). They are loaded on first use,
so that importing `features.config` does not import Feast (seconds).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FeatureStoreClient": "features.store",
    "FeatureStoreError": "features.errors",
    "feature_objects": "features.repo",
    "VIEWS": "features.repo",
    "VIEW_COLUMNS": "features.repo",
    "USER_HISTORY": "features.repo",
    "ITEM_STATS": "features.repo",
    "ITEM_METADATA": "features.repo",
    "ITEM_SID": "features.repo",
    "USER_CONTEXT": "features.repo",
    "ContextFeatureSpec": "features.registry",
    "ContextFeatureRegistry": "features.registry",
    "PublishConflictError": "features.files",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'features' has no attribute {name!r}")
