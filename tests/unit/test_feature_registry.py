"""The context-feature registry: specs are validated and a registered name never changes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from features.errors import FeatureStoreError
from features.registry import ContextFeatureRegistry, ContextFeatureSpec

pytestmark = pytest.mark.unit


def test_registered_specs_come_back_in_order_and_a_name_is_taken_once(tmp_path):
    registry = ContextFeatureRegistry(tmp_path)
    assert registry.specs() == []
    device = ContextFeatureSpec(name="device", type="categorical", values=("tv", "phone"))
    hour = ContextFeatureSpec(name="hour", type="numeric", buckets=(6, 12, 18))
    registry.register(device)
    registry.register(hour)
    assert ContextFeatureRegistry(tmp_path).specs() == [device, hour]
    with pytest.raises(FeatureStoreError, match="already registered"):
        registry.register(ContextFeatureSpec(name="device", type="categorical", values=("car",)))
    registry.path.write_text("{not json")
    with pytest.raises(FeatureStoreError, match="damaged"):
        registry.specs()


@pytest.mark.parametrize("fields, message", [
    ({"name": "Device", "type": "categorical", "values": ("a",)}, "pattern"),
    ({"name": "user_id", "type": "categorical", "values": ("a",)}, "reserved"),
    ({"name": "event_count", "type": "numeric", "buckets": (1,)}, "reserved"),  # a user_history feature
    ({"name": "device", "type": "categorical", "values": ("a",), "entity": "item"}, "user"),
    ({"name": "device", "type": "color", "values": ("a",)}, "categorical"),
    ({"name": "device", "type": "categorical"}, "lists its values"),
    ({"name": "device", "type": "categorical", "values": ("a", "a")}, "distinct"),
    ({"name": "hour", "type": "numeric", "buckets": (12, 6)}, "increasing"),
    ({"name": "hour", "type": "numeric", "values": ("a",), "buckets": (1,)}, "no values"),
])
def test_bad_specs_are_refused_with_a_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        ContextFeatureSpec(**fields)


def test_a_failed_apply_registers_nothing(tmp_path):
    registry = ContextFeatureRegistry(tmp_path)
    seen = []

    def apply(specs):
        seen.append([s.name for s in specs])
        raise FeatureStoreError("Feast refused")

    with pytest.raises(FeatureStoreError, match="Feast refused"):
        registry.register(ContextFeatureSpec(name="device", type="categorical", values=("tv",)), apply=apply)
    assert seen == [["device"]] and registry.specs() == []
