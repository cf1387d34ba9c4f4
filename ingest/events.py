"""The event contract (DESIGN.md): EngagementEvent on plum.events, ItemUpsert on plum.items.

Field lists may grow; a field never silently changes meaning. Times are timezone-aware and kept
in UTC; a naive datetime is a producer bug and is refused.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from enum import Enum
from typing import Literal, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from ingest.config import RewardConfig

SCHEMA_VERSION = 1
ContextValue = Union[bool, int, float, str]


class EventType(str, Enum):
    """What the user did with the item."""

    IMPRESSION = "impression"
    CLICK = "click"
    WATCH = "watch"
    LIKE = "like"
    DISLIKE = "dislike"
    RATING = "rating"


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


class EngagementEvent(BaseModel):
    """One engagement of a user with an item. Kafka key: user_id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    event_type: EventType
    event_time: AwareDatetime
    watch_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    item_duration_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    rating: float | None = Field(None, ge=0, allow_inf_nan=False)
    # The top of the scale the rating is on (5 for MovieLens, 10 for MovieTweetings).
    rating_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    surface: str | None = Field(None, max_length=64)
    context: dict[str, ContextValue] = Field(default_factory=dict, max_length=64)

    _utc = field_validator("event_time")(_to_utc)

    @model_validator(mode="after")
    def _type_specific_fields(self) -> "EngagementEvent":
        if self.event_type is EventType.RATING and self.rating is None:
            raise ValueError("a rating event needs a rating")
        if self.rating is not None and self.rating_scale is not None and self.rating > self.rating_scale:
            raise ValueError(f"rating {self.rating} is above its scale {self.rating_scale}")
        return self

    def reward(self, cfg: RewardConfig) -> float:
        """The configured reward of this event, in [0, 1] with the default configuration."""
        if self.event_type is EventType.RATING:
            scale = self.rating_scale or 5.0
            return min(1.0, float(self.rating) / scale)
        if self.event_type is EventType.WATCH:
            if self.watch_seconds is not None and self.item_duration_seconds:
                return min(1.0, self.watch_seconds / self.item_duration_seconds)
            return cfg.watch_without_duration
        return float(getattr(cfg, self.event_type.value))


class ItemUpsert(BaseModel):
    """Create or replace an item's metadata. Kafka key: item_id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    item_id: str = Field(min_length=1, max_length=128)
    title: str = Field(max_length=1024)
    description: str | None = Field(None, max_length=16384)
    tags: list[str] = Field(default_factory=list, max_length=256)
    published_at: AwareDatetime | None = None

    @field_validator("published_at")
    @classmethod
    def _published_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _to_utc(value)


def stable_event_id(namespace: str, user_id: str, item_id: str, event_type: str, event_time: datetime) -> str:
    """A deterministic event id: the same engagement always gets the same id, so retries de-duplicate."""
    key = f"{namespace}\x1f{user_id}\x1f{item_id}\x1f{event_type}\x1f{event_time.astimezone(timezone.utc).isoformat()}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
