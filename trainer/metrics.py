"""Prometheus metrics of the continuous trainer, set from its status (one source for both)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

PREFIX = "plum_trainer_"
GAUGES = {
    "step": "Optimizer steps taken by the continuous trainer.",
    "loss": "Training loss of the latest step.",
    "tokens_per_second": "Training throughput over the latest report interval.",
    "fresh_taken": "Fresh examples taken from the training log (trained or dropped by reward sampling).",
    "fresh_waiting": "Evaluated fresh examples waiting to be trained.",
    "held_out": "Events read since the last checkpoint, held out for its evaluation.",
    "events_read": "Events read from the training log.",
    "catalogue_items": "Items the model can recommend (SIDs that fit its vocabulary).",
    "last_checkpoint_step": "Step of the newest checkpoint.",
    "watermark_timestamp_seconds": "Event time of the newest event in the trained history.",
    "eval_recall_at_10": "Recall@10 on the newest held-out slice.",
    "eval_ndcg_at_10": "NDCG@10 on the newest held-out slice.",
    "eval_invalid_sid_rate": "Invalid-SID rate of constrained decoding on the newest held-out slice.",
    "exported_version": "The newest servable version exported.",
    "training_seconds": "Wall-clock seconds spent in optimizer steps since the process started.",
    "evaluating_seconds": "Wall-clock seconds spent evaluating checkpoints on held-out slices since the process started.",
    "boundary_seconds": "Wall-clock seconds spent at checkpoint boundaries (evaluation, save, export) since the process started.",
}


class TrainerMetrics:
    """Gauges in their own registry (serve them with prometheus_client.start_http_server)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.gauges = {name: Gauge(PREFIX + name, text, registry=self.registry) for name, text in GAUGES.items()}

    def update(self, status: dict[str, Any]) -> None:
        from datetime import datetime

        values: dict[str, Any] = {
            "step": status["step"], "loss": status["loss"], "tokens_per_second": status["tokens_per_s"],
            "fresh_taken": status["fresh"]["taken"], "fresh_waiting": status["waiting"],
            "held_out": status["held_out"], "events_read": status["events_read"],
            "catalogue_items": status["catalogue_items"],
            "last_checkpoint_step": status["last_checkpoint"].get("step"),
        }
        when = status["watermark"].get("event_time")
        values["watermark_timestamp_seconds"] = datetime.fromisoformat(when).timestamp() if when else None
        model = status["last_eval"].get("model") or {}
        values["eval_recall_at_10"] = model.get("recall@10")
        values["eval_ndcg_at_10"] = model.get("ndcg@10")
        values["eval_invalid_sid_rate"] = model.get("invalid_sid_rate")
        values["exported_version"] = status["exports"][-1]["version"] if status["exports"] else None
        seconds = status.get("seconds") or {}
        values["training_seconds"] = seconds.get("training")
        values["evaluating_seconds"] = seconds.get("evaluating")
        values["boundary_seconds"] = seconds.get("boundaries")
        for name, value in values.items():
            if value is not None and value == value:  # skip unknown figures and NaN
                self.gauges[name].set(float(value))
