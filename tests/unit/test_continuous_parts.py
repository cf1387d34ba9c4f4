"""The continuous trainer's pure parts: the stream's read position and queues, the export gate,
the Prometheus gauges."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest

from tests.support.stream_world import LogWriter, user_events
from trainer.continuous import export_gate
from trainer.metrics import TrainerMetrics
from trainer.stream import Stream, event_digest, position_covered, watermark_positions

pytestmark = pytest.mark.unit

FIGURES = {"examples": 100, "invalid_sid_rate": 0.0, "recall@10": 0.30, "ndcg@10": 0.15}


def _popularity(examples: int, recall: float = 0.05) -> dict:
    return {"examples": examples, "recall@10": recall, "ndcg@10": recall / 2}


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
    low = _popularity(100)
    ok, reason, gate = export_gate(FIGURES, None, None, 50, 0.01, popularity=low)
    assert ok and reason.startswith("no served version yet; recall@10 0.3000 beats recent popularity's 0.0500")
    ok, reason, gate = export_gate(FIGURES, None, None, 50, 0.01, popularity=_popularity(100, 0.30))  # a tie
    assert not ok and reason.startswith("popularity_floor: recall@10 0.3000 does not beat")
    ok, reason, gate = export_gate({**FIGURES, "examples": 10}, None, None, 50, 0.01, popularity=_popularity(10))
    assert not ok and "only 10 held-out events" in reason
    ok, reason, gate = export_gate({**FIGURES, "invalid_sid_rate": 0.02}, None, None, 50, 0.01, popularity=low)
    assert not ok and "invalid-SID rate" in reason
    served = {**FIGURES, "recall@10": 0.40}
    ok, reason, gate = export_gate(FIGURES, served, 7, 50, 0.01, popularity=low)
    assert not ok and "recall@10 0.3000 trails served version 7's 0.4000" in reason
    assert export_gate(FIGURES, {**FIGURES, "recall@10": 0.305}, 7, 50, 0.01, popularity=low)[0]  # inside the margin
    ok, reason, gate = export_gate(FIGURES, {**FIGURES, "ndcg@10": 0.2}, 7, 50, 0.01, popularity=low)
    assert not ok and reason.startswith("ndcg@10")


def test_with_the_popularity_floor_off_the_export_gate_reports_it_as_not_applied():
    tie = _popularity(100, 0.30)
    ok, reason, gate = export_gate(FIGURES, None, None, 50, 0.01, popularity=tie, popularity_floor_on=False)
    assert ok and reason == ("no served version yet; popularity floor not applied (trainer.continuous."
                             "popularity_floor false): recall@10 0.3000 does not beat recent popularity's 0.3000 "
                             "on the same 100 held-out users")
    # The other gates still apply.
    ok, reason, gate = export_gate({**FIGURES, "invalid_sid_rate": 0.02}, None, None, 50, 0.01, popularity=tie,
                             popularity_floor_on=False)
    assert not ok and "invalid-SID rate" in reason


def _evaluation(ranks: list[int]) -> dict:
    ranks_array = np.array(ranks)
    hit = (ranks_array >= 0) & (ranks_array < 10)
    return {"examples": len(ranks), "invalid_sid_rate": 0.0, "recall@10": float(hit.mean()),
            "ndcg@10": float(np.where(hit, 1 / np.log2(np.maximum(ranks_array, 0) + 2), 0).mean()),
            "target_ranks": ranks}


def test_the_gate_refuses_only_what_the_same_users_show_to_be_worse_beyond_the_margin():
    # 20 users: the served version ranks 4 targets, the candidate 2 of them: recall 0.10 vs 0.20.
    served = _evaluation([0, 3, 5, 7] + [-1] * 16)
    candidate = _evaluation([0, 3] + [-1] * 18)
    ok, reason, gate = export_gate(candidate, served, 8, 20, 0.01, popularity=_popularity(20, 0.0))  # 2 users apart: not established at 95%
    assert ok and "not worse by more than the margin 0.01" in reason and "same 20 users" in reason
    ok, reason, gate = export_gate(candidate, served, 8, 20, 0.01, confidence=0.5, popularity=_popularity(20, 0.0))  # the point estimates
    assert not ok and reason.startswith("recall@10 0.1000 trails served version 8's 0.2000")
    # The same shortfall on 200 users (20 targets lost of 40) is established.
    served = _evaluation([1] * 40 + [-1] * 160)
    candidate = _evaluation([1] * 20 + [-1] * 180)
    ok, reason, gate = export_gate(candidate, served, 8, 20, 0.01, popularity=_popularity(200, 0.0))
    assert not ok and "trails served version 8's 0.2000" in reason and "at 95% confidence at most -0.06" in reason


def test_paired_differences_by_hand():
    from trainer.evaluate import paired_difference, target_ranks, user_values

    ranked = np.array([[4, 7, 1], [2, 3, 9], [5, 6, 8]])
    assert target_ranks(ranked, np.array([7, 9, 0])).tolist() == [1, 2, -1]
    assert np.allclose(user_values([0, 1, -1, 10], "ndcg@10"), [1.0, 1 / np.log2(3), 0.0, 0.0])
    assert user_values([0, 9, 10, -1], "recall@10").tolist() == [1.0, 1.0, 0.0, 0.0]
    d = paired_difference({"target_ranks": [0, -1, 2, -1]}, {"target_ranks": [-1, -1, 2, 0]}, "recall@10", 0.95)
    # per-user differences +1, 0, 0, -1: mean 0, sample sd sqrt(2/3), upper 1.645 * sqrt(2/3) / 2
    assert d.paired and d.difference == 0.0 and np.isclose(d.upper, 1.6448536 * np.sqrt(2 / 3) / 2)
    unpaired = paired_difference({"recall@10": 0.2}, {"recall@10": 0.3}, "recall@10", 0.95)
    assert not unpaired.paired and np.isclose(unpaired.upper, -0.1)


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


def test_a_watermark_orders_log_positions_by_epoch_then_offset():
    # Partition 0 was read to offset 9 of epoch 0, then the log restarted: offset 2 of epoch 1 is newer.
    marks = watermark_positions([(0, 0, 9), (0, 1, 2), (1, 0, 4), (0, 0, 3)])
    assert marks == {"offsets": {"0": 2, "1": 4}, "epochs": {"0": 1, "1": 0}}
    assert position_covered(marks, 0, 0, 50)  # any offset of an earlier epoch is before it
    assert position_covered(marks, 0, 1, 2) and not position_covered(marks, 0, 1, 3)
    assert not position_covered(marks, 1, 1, 0)  # a later epoch than the watermark's
    assert not position_covered(marks, 2, 0, 0)  # a partition it has not read
    old = {"offsets": {"0": 5}}  # written before log epochs: epoch 0
    assert position_covered(old, 0, 0, 5) and not position_covered(old, 0, 1, 0)
    assert not position_covered(None, 0, 0, 0)


def test_each_export_refusal_names_the_gate_that_made_it():
    from trainer.continuous import EXPORT_GATES

    low, tie = _popularity(100), _popularity(100, 0.30)
    verdicts = {
        "min_eval_examples": export_gate({**FIGURES, "examples": 10}, None, None, 50, 0.01, popularity=_popularity(10)),
        "invalid_sid": export_gate({**FIGURES, "invalid_sid_rate": 0.02}, None, None, 50, 0.01, popularity=low),
        "popularity_floor": export_gate(FIGURES, None, None, 50, 0.01, popularity=tie),
        "served_version": export_gate(FIGURES, {**FIGURES, "recall@10": 0.40}, 7, 50, 0.01, popularity=low),
    }
    for gate, verdict in verdicts.items():
        assert not verdict.passed and verdict.gate == gate and gate in EXPORT_GATES, verdict
    # Passing names no gate, also with the floor only reported.
    assert export_gate(FIGURES, None, None, 50, 0.01, popularity=low).gate == ""
    assert export_gate(FIGURES, None, None, 50, 0.01, popularity=tie, popularity_floor_on=False).gate == ""
