"""The runner-state transforms on Beam's DirectRunner (TestPipeline): what each emits from
hand-made batches, keyed state carried from one batch to the next included (a TestStream hands
the batches over one at a time, in order)."""

from datetime import datetime, timedelta, timezone

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from ingest.config import RewardConfig
from ingest.events import EngagementEvent, ItemUpsert
from ingest.folds import UserFoldSettings
from ingest.parse import ParsedBatch, Reject
from ingest.pipeline import pipeline_options
from ingest.transforms.batches import GatherUserBatches
from ingest.transforms.dead_letters import DEAD_LETTERS, EXPIRED_REASON, split_dead_letters
from ingest.transforms.item_state import FoldItems, KeepItemMetadata
from ingest.transforms.user_state import FoldUsers

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
DAY_MINUTES = 24 * 60
SETTINGS = UserFoldSettings(RewardConfig(), history_length=3, cooccurrence_window=2, retention_s=2 * 86400)


def ev(event_id, user, item, minutes):
    return EngagementEvent(event_id=event_id, user_id=user, item_id=item, event_type="click",
                           event_time=T0 + timedelta(minutes=minutes))


def upsert(item, title):
    return ItemUpsert(item_id=item, title=title)


def batch(start, records, topic="events"):
    offsets = list(range(start, start + len(records)))
    return ParsedBatch(topic, 0, start, start + len(records), list(records), offsets,
                       [1_700_000_000_000 + 1000 * o for o in offsets])


def in_order(p, batches):
    """The batches one at a time: each is folded before the next arrives."""
    stream = TestStream()
    for i, b in enumerate(batches):
        stream = stream.add_elements([b]).advance_watermark_to(i + 1).advance_processing_time(1)
    return p | stream.advance_watermark_to_infinity()


def pipeline():
    return TestPipeline(options=pipeline_options("DirectRunner", streaming=True))


FIRST = batch(0, [ev("a", "u1", "i1", 0), ev("b", "u2", "i2", 0), ev("c", "u1", "i3", 10)])
# u1 again: a duplicate of "a" and an event three days on; then an event older than the
# retention allows behind that one.
SECOND = batch(3, [ev("a", "u1", "i1", 0), ev("d", "u1", "i4", 3 * DAY_MINUTES)])
THIRD = batch(5, [ev("e", "u1", "i5", 20)])


def test_fold_users_carries_each_users_state_from_batch_to_batch():
    with pipeline() as p:
        folded = in_order(p, [FIRST, SECOND, THIRD]) | FoldUsers(SETTINGS)
        updates = folded.updates | beam.Map(lambda u: (u.batch_id, u.user_id, tuple(e.event_id for e in u.new_events),
                                                       u.duplicates, tuple(u.history.item_ids), u.users_in_batch))
        assert_that(updates, equal_to([
            (FIRST.batch_id, "u1", ("a", "c"), 0, ("i1", "i3"), 2),
            (FIRST.batch_id, "u2", ("b",), 0, ("i2",), 2),
            (SECOND.batch_id, "u1", ("d",), 1, ("i1", "i3", "i4"), 1),
            (THIRD.batch_id, "u1", (), 0, ("i1", "i3", "i4"), 1),
        ]), label="updates")
        dead = folded[DEAD_LETTERS] | beam.Map(lambda r: (r.topic, r.offset, r.key, r.reason))
        assert_that(dead, equal_to([("events", 5, b"u1", EXPIRED_REASON)]), label="dead letters")


def test_gather_user_batches_puts_a_batch_back_together_once_every_user_is_folded():
    with pipeline() as p:
        gathered = (in_order(p, [FIRST, SECOND]) | FoldUsers(SETTINGS)).updates | GatherUserBatches()
        out = gathered | beam.Map(lambda b: (b.batch_id, [e.event_id for e in b.new_events], b.offsets, b.duplicates,
                                             sorted(u.user_id for u in b.users)))
        assert_that(out, equal_to([
            (FIRST.batch_id, ["a", "b", "c"], [0, 1, 2], 0, ["u1", "u2"]),
            (SECOND.batch_id, ["d"], [4], 1, ["u1"]),
        ]))


def test_fold_items_gives_each_batch_the_absolute_stats_of_the_items_it_touched():
    later = batch(3, [ev("f", "u3", "i1", 30)])
    with pipeline() as p:
        stats = ((in_order(p, [FIRST, later]) | FoldUsers(SETTINGS)).updates | GatherUserBatches() | FoldItems()
                 | beam.Map(lambda kv: (kv[0], sorted((part.stats.item_id, part.stats.clicks) for part in kv[1]))))
        assert_that(stats, equal_to([
            (FIRST.batch_id, [("i1", 1), ("i2", 1), ("i3", 1)]),
            (later.batch_id, [("i1", 2)]),  # i1's running count, not the batch's contribution
        ]))


def test_keep_item_metadata_applies_an_upsert_only_if_no_later_one_of_the_item_was_applied():
    newer = batch(1, [upsert("i1", "new title"), upsert("i2", "two")], topic="items")
    older = batch(0, [upsert("i1", "old title")], topic="items")  # arrives after the newer batch
    with pipeline() as p:
        kept = in_order(p, [newer, older]) | KeepItemMetadata() | beam.Map(lambda m: (m.item_id, m.title, m.updated_at))
        assert_that(kept, equal_to([("i1", "new title", 1_700_000_001), ("i2", "two", 1_700_000_002)]))


def test_split_dead_letters_tags_the_rejects_and_passes_the_batch_on_without_them():
    bad = Reject("events", 0, 7, b"k", b"{", "record: Invalid JSON")
    parsed = batch(0, [ev("a", "u1", "i1", 0)])
    parsed.rejects.append(bad)
    out = list(split_dead_letters(parsed))
    assert [o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput)] == [bad]
    assert [o.tag for o in out if isinstance(o, beam.pvalue.TaggedOutput)] == [DEAD_LETTERS]
    passed = [o for o in out if isinstance(o, ParsedBatch)]
    assert len(passed) == 1 and passed[0].rejects == [] and passed[0].records == parsed.records
    assert parsed.rejects == [bad]  # the input batch is left as it was
