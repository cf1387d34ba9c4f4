"""The popularity floor: the recent-popularity baseline against counts done by hand, the strict floor
(a tie does not beat popularity), the export gate that applies it, and which events popularity counts."""

from __future__ import annotations

import math

import pytest

from trainer.continuous import HeldOut, export_gate, popularity_on
from trainer.evaluate import popularity_baseline, popularity_floor
from trainer.stream import LoggedEvent

pytestmark = pytest.mark.unit

# Counts by hand: a 3, b 2, c 2, d 1. b and c tie; c's last event (position 7) is newer than b's (4), so
# the popularity order is a, c, b, d. "e" never occurs in the recent events.
RECENT = ["a", "b", "a", "c", "b", "a", "d", "c"]
SEEN = [[], ["a"], ["c"], ["a", "c"], []]
TARGETS = ["c", "b", "d", "b", "e"]


def test_popularity_ranks_the_most_frequent_unseen_items_counted_by_hand():
    top_2 = popularity_baseline(RECENT, SEEN, TARGETS, k=2)
    # Each user's top 2 without its seen items: [a, c] [c, b] [a, b] [b, d] [a, c].
    assert top_2["target_ranks"] == [1, 1, -1, 0, -1]
    assert top_2["recall@2"] == pytest.approx(3 / 5)
    assert top_2["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(3) + 1) / 5)
    assert top_2["examples"] == 5 and top_2["recent_events"] == 8
    top_10 = popularity_baseline(RECENT, SEEN, TARGETS)  # the floor's top 10: every item that occurs
    assert top_10["target_ranks"] == [1, 1, 2, 0, -1]  # user 2: [a, b, d]; "e" is never recommended
    assert top_10["recall@10"] == pytest.approx(4 / 5)


def test_a_tie_with_popularity_does_not_pass_the_floor():
    popularity = {"examples": 40, "recall@10": 0.25}
    passed, detail = popularity_floor({"examples": 40, "recall@10": 0.25}, popularity)
    assert not passed and detail == "recall@10 0.2500 does not beat recent popularity's 0.2500 on the same 40 " \
                                    "held-out users"
    assert popularity_floor({"examples": 40, "recall@10": 0.275}, popularity)[0]
    assert not popularity_floor({"examples": 40, "recall@10": 0.0}, {"examples": 40, "recall@10": 0.0})[0]
    with pytest.raises(ValueError, match="same held-out users"):
        popularity_floor({"examples": 39, "recall@10": 0.5}, popularity)


def test_the_export_gate_applies_the_floor_with_or_without_a_served_version():
    candidate = {"examples": 100, "invalid_sid_rate": 0.0, "recall@10": 0.30, "ndcg@10": 0.15}
    popular = {"examples": 100, "recall@10": 0.30, "ndcg@10": 0.2}
    ok, reason, gate = export_gate(candidate, None, None, 50, 0.01, popularity=popular)
    assert not ok and reason.startswith("popularity_floor: recall@10 0.3000 does not beat recent popularity's 0.3000")
    ok, reason, gate = export_gate(candidate, dict(candidate), 4, 50, 0.01, popularity=popular)
    assert not ok and reason.startswith("popularity_floor:")  # also when it equals the served version
    ok, reason, gate = export_gate(candidate, None, None, 50, 0.01, popularity={**popular, "recall@10": 0.29})
    assert ok and reason == ("no served version yet; recall@10 0.3000 beats recent popularity's 0.2900 on the "
                             "same 100 held-out users")


def _event(event_id: str, item: str, minute: int) -> LoggedEvent:
    return LoggedEvent(event_id, f"user-{event_id}", item, 1.0, (minute * 60_000_000, 0, minute))


def test_popularity_counts_the_newest_events_that_are_not_evaluated():
    events = [_event("e1", "x", 1), _event("e2", "x", 2), _event("e3", "y", 3), _event("e4", "y", 4),
              _event("e5", "z", 5), _event("target", "z", 6)]
    held = HeldOut(("target",), (("y",),), ((1.0,),), (("y",),), ("z",), ({},))
    # The window of 3 newest non-target events is e3, e4, e5: y twice (seen by the user), z once: z first.
    assert popularity_on(held, reversed(events), window=3)["target_ranks"] == [0]
    # The whole log: x (2) outranks z (1). The target's own event is not counted, else z (2, newer) would be first.
    assert popularity_on(held, events, window=10)["target_ranks"] == [1]
    assert popularity_on(held, events, window=10)["recent_events"] == 5


def test_the_promotion_gate_with_the_floor_off_passes_but_records_it_as_not_applied():
    from ops.config import PromoteSettings
    from ops.promote import FreshEvaluation, gate_popularity_floor

    candidate = {"examples": 30, "recall@10": 0.1, "ndcg@10": 0.05, "beam_width": 10}
    popular = {"examples": 30, "recall@10": 0.2, "ndcg@10": 0.1, "recent_events": 500}
    fresh = FreshEvaluation(30, {3: candidate}, popular)
    on = gate_popularity_floor(3, {}, fresh, PromoteSettings())
    assert not on.passed and on.figures["applied"] and on.detail.startswith("recall@10 0.1000 does not beat")
    off = gate_popularity_floor(3, {}, fresh, PromoteSettings(popularity_floor=False))
    assert off.passed and off.detail.startswith("NOT APPLIED (promote.popularity_floor false): recall@10 0.1000 "
                                                "does not beat")
    assert off.figures["applied"] is False and off.figures["would_pass"] is False
    assert off.figures["popularity"]["recall@10"] == 0.2
    # Too few fresh users and no figures recorded at export: refused when on, not applied when off.
    few = FreshEvaluation(4, {}, None)
    assert not gate_popularity_floor(3, {"eval": {}}, few, PromoteSettings()).passed
    assert gate_popularity_floor(3, {"eval": {}}, few, PromoteSettings(popularity_floor=False)).passed


def test_the_demo_stops_waiting_only_once_no_export_can_come():
    from ops.demo import refused_for_good

    refused = {"state": "idle", "held_out": 0, "events_read": 3000,
               "last_eval": {"export_refused": "popularity_floor: recall@10 0.0667 does not beat ..."}}
    assert refused_for_good(refused, 3000) == "popularity_floor: recall@10 0.0667 does not beat ..."
    assert refused_for_good({**refused, "events_read": 2900}, 3000) is None  # live events not read yet
    assert refused_for_good({**refused, "state": "training"}, 3000) is None
    assert refused_for_good({**refused, "held_out": 12}, 3000) is None  # an evaluation is still to come
    assert refused_for_good({**refused, "last_eval": {}}, 3000) is None  # exported, or not evaluated
