"""A state directory the server can serve: a trained servable version from the continuous trainer
on the synthetic stream world, and a real Feast repo whose online store holds the users' histories."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from features import FeatureStoreClient
from ops.config import PlumConfig, load_config
from tests.support.stream_world import LogWriter, user_events, write_cpt_checkpoint, write_sid_table
from trainer.config import ContinuousSettings, TrainerSettings
from trainer.continuous import ContinuousPaths, ContinuousTrainer

USERS = 40


def history_frame(users: range, steps: int) -> pd.DataFrame:
    rows = {u: user_events(u, steps) for u in users}
    return pd.DataFrame({
        "user_id": [f"user-{u}" for u in users],
        "history_item_ids": [[e.item_id for e in rows[u]] for u in users],
        "history_rewards": [[e.rating / e.rating_scale for e in rows[u]] for u in users],
        "history_times": [[int(e.event_time.timestamp()) for e in rows[u]] for u in users],
        "event_count": [steps for _ in users],
        "event_timestamp": pd.to_datetime([rows[u][-1].event_time for u in users], utc=True),
    })


def train_and_export(cfg: PlumConfig) -> tuple[LogWriter, Path]:
    """The continuous trainer on USERS users' first 10 events: exports version 1; returns the training
    log's writer (to publish more) and the CPT checkpoint (the untrained start)."""
    paths = ContinuousPaths(cfg.paths.training_log_dir, cfg.paths.sid_dir, cfg.paths.trainer_dir, cfg.paths.model_dir)
    write_sid_table(paths.sid_dir)
    log = LogWriter(paths.log_dir)
    offsets = log.publish([e for u in range(USERS) for e in user_events(u, 6)])
    cpt = write_cpt_checkpoint(cfg.paths.checkpoint_dir / "cpt" / "1", offsets[-1])
    settings = TrainerSettings(model_size="tiny", batch_size=8, warmup_steps=2, max_history=5,
                               continuous=ContinuousSettings(checkpoint_every_steps=60, checkpoint_every_s=1000,
                                                             eval_examples=40, min_eval_examples=5,
                                                             idle_after_steps=60, learning_rate=3e-3,
                                                             poll_interval_s=0.1))
    trainer = ContinuousTrainer(settings, paths, cpt, say=lambda m: None)
    log.publish([e for u in range(USERS) for e in user_events(u, 3, start_step=6)])
    trainer.run(until_drained=True)
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=9)])
    trainer.run(until_drained=True)
    trainer.close()
    return log, cpt


def build_serving_state(state: Path) -> PlumConfig:
    """Train and export version 1, apply the Feast repo and push every user's history online."""
    cfg = load_config(env={}, overrides={"paths": {"state_dir": str(state)}})
    train_and_export(cfg)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    store.apply()
    store.push_online("user_history", history_frame(range(USERS), 10))
    return cfg
