from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from ingest.producer import new_event
from ingest.training_log import TrainingLogWriter, read_training_log

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, 10, 30, tzinfo=timezone.utc)


def events(n, start=T0):
    return [new_event("t", user_id=f"u{i}", item_id="i", event_type="click", event_time=start + timedelta(minutes=20 * i))
            for i in range(n)]


def test_staged_batch_is_invisible_until_published_and_lands_by_event_hour(tmp_path):
    writer = TrainingLogWriter(tmp_path)
    batch = events(6)  # 10:30 .. 12:10: three event hours
    writer.stage("plum.events-0-1-7", batch, [0.3] * 6, 0, list(range(1, 7)))
    assert len(read_training_log(tmp_path)) == 0
    assert len(pd.read_parquet(tmp_path)) == 0 if any(tmp_path.glob("event_hour=*")) else True
    assert writer.staged_batches() == ["plum.events-0-1-7"]
    assert writer.publish("plum.events-0-1-7") == 3
    assert writer.publish("plum.events-0-1-7") == 0  # idempotent
    log = read_training_log(tmp_path)
    assert sorted(log["event_id"]) == sorted(e.event_id for e in batch)
    assert sorted(p.name for p in tmp_path.glob("event_hour=*")) == [
        "event_hour=2024-01-01T10", "event_hour=2024-01-01T11", "event_hour=2024-01-01T12"]
    assert list(log.sort_values("kafka_offset")["kafka_offset"]) == list(range(1, 7))
    assert writer.staged_batches() == []


def test_discarded_batch_leaves_nothing(tmp_path):
    writer = TrainingLogWriter(tmp_path)
    writer.stage("b", events(3), [0.0] * 3, 0, [0, 1, 2])
    writer.discard("b")
    assert writer.staged_batches() == []
    assert writer.publish("b") == 0
    assert len(read_training_log(tmp_path)) == 0
