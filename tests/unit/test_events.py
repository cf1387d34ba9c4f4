from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from ingest.config import RewardConfig
from ingest.events import EngagementEvent, ItemUpsert, stable_event_id
from ingest.producer import new_event

pytestmark = pytest.mark.unit

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def test_event_time_is_normalised_to_utc():
    event = EngagementEvent(event_id="e", user_id="u", item_id="i", event_type="click",
                            event_time="2024-05-01T14:00:00+02:00")
    assert event.event_time == T0
    assert event.event_time.tzinfo == timezone.utc


@pytest.mark.parametrize("change", [
    {"event_time": "2024-05-01T12:00:00"},          # naive
    {"event_type": "teleport"},                     # unknown type
    {"watch_seconds": -1},                          # negative watch time
    {"event_type": "rating"},                       # rating event without a rating
    {"rating": 11, "rating_scale": 10, "event_type": "rating"},
    {"user_id": ""},
    {"unexpected": 1},
])
def test_invalid_events_are_refused(change):
    fields = {"event_id": "e", "user_id": "u", "item_id": "i", "event_type": "click", "event_time": T0, **change}
    with pytest.raises(ValidationError):
        EngagementEvent(**fields)


def test_reward_is_a_configured_function_of_the_event():
    cfg = RewardConfig(click=0.25)
    assert new_event("t", user_id="u", item_id="i", event_type="click", event_time=T0).reward(cfg) == 0.25
    rating = new_event("t", user_id="u", item_id="i", event_type="rating", event_time=T0, rating=8, rating_scale=10)
    assert rating.reward(cfg) == pytest.approx(0.8)
    watch = new_event("t", user_id="u", item_id="i", event_type="watch", event_time=T0,
                      watch_seconds=300, item_duration_seconds=200)
    assert watch.reward(cfg) == 1.0
    half = new_event("t", user_id="u", item_id="i", event_type="watch", event_time=T0,
                     watch_seconds=50, item_duration_seconds=200)
    assert half.reward(cfg) == 0.25


def test_stable_event_ids_are_deterministic_and_distinct():
    a = stable_event_id("ml", "u1", "i1", "rating", T0)
    assert a == stable_event_id("ml", "u1", "i1", "rating", T0.astimezone(timezone(timedelta(hours=3))))
    assert a != stable_event_id("ml", "u1", "i1", "rating", T0 + timedelta(seconds=1))
    assert a != stable_event_id("other", "u1", "i1", "rating", T0)


def test_event_json_round_trip():
    event = new_event("t", user_id="u", item_id="i", event_type="watch", event_time=T0, watch_seconds=3.5,
                      context={"device": "tv", "hour": 12})
    again = EngagementEvent.model_validate_json(event.model_dump_json(exclude_none=True))
    assert again == event


def test_item_upsert_needs_aware_published_at():
    with pytest.raises(ValidationError):
        ItemUpsert(item_id="i", title="t", published_at="2020-01-01T00:00:00")
    assert ItemUpsert(item_id="i", title="t", tags=["a"]).tags == ["a"]
