"""The continuous trainer's pure parts: the stream's read position and queues, the export gate,
the Prometheus gauges."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest

from tests.support.stream_world import LogWriter, user_events
from trainer.continuous import export_gate
from trainer.metrics import TrainerMetrics
from trainer.stream import Stream, event_digest

FIGURES = {"examples": 100, "invalid_sid_rate": 0.0, "recall@10": 0.30, "ndcg@10": 0.15}


def test_polling_reads_each_published_file_once_and_splits_history_from_fresh(tmp_path):
    log = LogWriter(tmp_path / "log")
    covered = log.publish([e for u in range(3) for e in user_events(u, 4)])
    stream = Stream(tmp_path / "log", {"offsets": {"0": covered[-1]}})
    assert stream.poll() == 12 and stream.pending == [] and len(stream.pool) == 12
    assert stream.poll() == 0  # nothing new
    fresh = [e for u in range(3) for e in user_events(u, 2, start_step=4)]
    log.publish(fresh)
    (tmp_path / "log" / "_staging").mkdir(exist_ok=True)
    (tmp_path / "log" / "_staging" / "orphan.parquet").write_bytes(b"not visible")
    assert stream.poll() == 6
    assert sorted(stream.pending) == sorted(e.event_id for e in fresh)
    event = stream.events["u1-t5"]
    assert [e.event_id for e in stream.before(event)] == [f"u1-t{t}" for t in range(5)]
    assert stream.release() and stream.pending == [] and len(stream.released) == 6


def test_a_restored_stream_has_the_same_queues_ledger_and_histories(tmp_path):
    log = LogWriter(tmp_path / "log")
    log.publish([e for u in range(3) for e in user_events(u, 3)])
    stream = Stream(tmp_path / "log")
    stream.poll()
    stream.release()
    taken = [stream.take_fresh() for _ in range(4)]
    for event_id in taken:
        stream.ledger.take(event_id, "trained")
    log.publish([e for u in range(3) for e in user_events(u, 1, start_step=3)])
    stream.poll()
    restored = Stream.restore(tmp_path / "log", stream.state())
    assert restored.pending == stream.pending and list(restored.released) == list(stream.released)
    assert restored.ledger == stream.ledger and restored.ledger.digest == event_digest(taken)
    assert sorted(restored.pool) == sorted(stream.pool) and restored.files == stream.files
    assert restored.poll() == 0


def test_event_digest_is_order_free_and_tells_sets_apart():
    assert event_digest(["a", "b", "c"]) == event_digest(["c", "a", "b"])
    assert event_digest(["a", "b"]) != event_digest(["a", "b", "b"])  # a repeat changes it
    assert event_digest(["a", "b"]) != event_digest(["a"])


def test_the_export_gate_names_the_failing_condition():
    assert export_gate(FIGURES, None, None, 50, 0.01) == (True, "no served version yet")
    ok, reason = export_gate({**FIGURES, "examples": 10}, None, None, 50, 0.01)
    assert not ok and "only 10 held-out events" in reason
    ok, reason = export_gate({**FIGURES, "invalid_sid_rate": 0.02}, None, None, 50, 0.01)
    assert not ok and "invalid-SID rate" in reason
    served = {**FIGURES, "recall@10": 0.40}
    ok, reason = export_gate(FIGURES, served, 7, 50, 0.01)
    assert not ok and "recall@10 0.3000 trails served version 7's 0.4000" in reason
    assert export_gate(FIGURES, {**FIGURES, "recall@10": 0.305}, 7, 50, 0.01)[0]  # inside the margin
    ok, reason = export_gate(FIGURES, {**FIGURES, "ndcg@10": 0.2}, 7, 50, 0.01)
    assert not ok and reason.startswith("ndcg@10")


def test_metrics_follow_the_status():
    metrics = TrainerMetrics()
    status = {"step": 12, "loss": float("nan"), "tokens_per_s": 100.0, "fresh": {"taken": 5}, "waiting": 3,
              "held_out": 2, "events_read": 40, "catalogue_items": 64, "last_checkpoint": {"step": 8},
              "watermark": {"event_time": "2026-01-01T00:00:00+00:00"},
              "last_eval": {"model": {"recall@10": 0.25, "ndcg@10": 0.1, "invalid_sid_rate": 0.0}},
              "exports": [{"version": 3}], "seconds": {"training": 50.5, "evaluating": 7.25, "boundaries": 9.0}}
    metrics.update(status)
    text = generate_latest(metrics.registry).decode()
    assert "plum_trainer_step 12.0" in text and "plum_trainer_exported_version 3.0" in text
    assert "plum_trainer_eval_recall_at_10 0.25" in text
    assert "plum_trainer_loss 0.0" in text  # NaN (no step yet) leaves the gauge unset
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert np.isclose(float(samples["plum_trainer_watermark_timestamp_seconds"]), 1767225600.0)
    assert float(samples["plum_trainer_evaluating_seconds"]) == 7.25
    assert float(samples["plum_trainer_training_seconds"]) == 50.5
