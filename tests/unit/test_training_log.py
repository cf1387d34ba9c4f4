import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.files import PublishConflictError
from ingest.producer import new_event
from ingest.training_log import TrainingLogWriter, events_table, read_training_log

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


def _published(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.glob("event_hour=*/*.parquet")}


def test_publishing_never_replaces_a_published_file(tmp_path):
    writer = TrainingLogWriter(tmp_path)
    first = events(2)
    writer.stage("b", first, [0.3] * 2, 0, [0, 1])
    writer.publish("b")
    before = _published(tmp_path)
    # The same name for other events (what offset-only batch ids did after a broker restart): refused.
    writer.stage("b", events(2, start=T0 + timedelta(seconds=1)), [0.3] * 2, 0, [0, 1], epoch=1)
    with pytest.raises(PublishConflictError, match="Refusing to overwrite"):
        writer.publish("b")
    assert _published(tmp_path) == before
    assert writer.staged_batches() == ["b"]  # kept for inspection
    writer.discard("b")
    # The same batch again (recovery after a crash between the rename and its bookkeeping): a no-op.
    writer.stage("b", first, [0.3] * 2, 0, [0, 1])
    assert writer.publish("b") == 0
    assert _published(tmp_path) == before and writer.staged_batches() == []


def test_rows_carry_their_log_epoch_and_files_from_before_it_read_as_epoch_0(tmp_path):
    from trainer.stream import read_events

    writer = TrainingLogWriter(tmp_path)
    writer.stage("new", events(2), [0.3] * 2, 1, [5, 6], epoch=3)
    writer.publish("new")
    old = events_table(events(1, start=T0 + timedelta(minutes=1)), [0.5], 0, [9]).drop_columns(["log_epoch"])
    pq.write_table(old, tmp_path / "event_hour=2024-01-01T10" / "old.parquet")  # as the log was written before
    log = read_training_log(tmp_path).set_index("kafka_offset")
    assert log["log_epoch"].to_dict() == {5: 3, 6: 3, 9: 0}
    assert [e.epoch for e in read_events(tmp_path, "event_hour=2024-01-01T10/old.parquet")] == [0]
    assert [e.log_position for e in read_events(tmp_path, "event_hour=2024-01-01T10/new.parquet")] == [(3, 5), (3, 6)]


def test_a_durable_batch_is_on_disk_before_the_commit_and_its_rename_after_publication(tmp_path, monkeypatch):
    import features.files

    synced = []
    monkeypatch.setattr(features.files, "fsync_path", lambda path: synced.append(Path(path)))
    writer = TrainingLogWriter(tmp_path)
    writer.stage("b", events(1), [0.3], 0, [0])
    staged = tmp_path / "_staging" / "b.2024-01-01T10.parquet"
    assert synced[-2:] == [staged, tmp_path / "_staging"]  # the file, then its directory entry
    synced.clear()
    writer.publish("b")
    hour = tmp_path / "event_hour=2024-01-01T10"
    assert synced == [tmp_path, staged, hour]  # the new hour directory's entry, the file, its new name
    synced.clear()
    fast = TrainingLogWriter(tmp_path / "fast", durable=False)
    fast.stage("b", events(1), [0.3], 0, [0])
    fast.publish("b")
    assert synced == [] and len(read_training_log(tmp_path / "fast")) == 1
