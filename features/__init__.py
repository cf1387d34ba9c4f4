"""Feast feature repo and store wrapper: user_history, item_stats, item_metadata."""

from features.errors import FeatureStoreError
from features.repo import ITEM_METADATA, ITEM_SID, ITEM_STATS, USER_HISTORY, VIEWS, feature_objects
from features.store import FeatureStoreClient

__all__ = ["FeatureStoreClient", "FeatureStoreError", "feature_objects", "VIEWS", "USER_HISTORY", "ITEM_STATS",
           "ITEM_METADATA", "ITEM_SID"]
