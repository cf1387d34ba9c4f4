"""Feature-store errors that a user can act on."""


class FeatureStoreError(Exception):
    """The Feast repo is missing, not applied, or a request names an unknown view or entity."""
