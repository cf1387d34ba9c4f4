"""Configuration of the Feast feature store: project, online store and offline store."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class OnlineStoreConfig(BaseModel):
    """SQLite by default; Redis is the scale option (`type: redis`, `connection_string: host:port`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sqlite", "redis"] = "sqlite"
    path: str | None = None  # sqlite only; default: <feast repo>/online_store.db
    connection_string: str = "localhost:6379"  # redis only


class FeastConfig(BaseModel):
    """The Feast project. The repo directory is derived from the state directory unless given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = "plum"
    repo_dir: str | None = None  # default: <state_dir>/feast
    online_store: OnlineStoreConfig = OnlineStoreConfig()
