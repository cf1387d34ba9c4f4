"""Wiring of the trainer for the CLI: the training log, the newest SID table, titles from Feast,
the SmolLM2 asset, checkpoints under <state>/checkpoints/<stage>/<n>."""

from __future__ import annotations

from pathlib import Path

import click

from features import FeatureStoreClient
from ingest.training_log import read_training_log
from ops.assets import smollm2_gguf
from ops.config import PlumConfig
from ops.errors import PlumError
from ops.runtime import announce

def _checkpoint_numbers(root: Path) -> list[int]:
    """Numbers of the complete checkpoints under root, oldest first (a checkpoint is written under a
    temporary name and renamed, so every numbered directory is complete)."""
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def next_checkpoint(root: Path) -> Path:
    """<root>/<n+1>, where n is the newest complete numbered checkpoint."""
    return root / str(max(_checkpoint_numbers(root), default=0) + 1)


def _titles(cfg: PlumConfig) -> dict[str, str]:
    metadata = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).latest_offline("item_metadata")
    return dict(zip(metadata["item_id"].astype(str), metadata["title"].fillna(""))) if not metadata.empty else {}


def newest_checkpoint(root: Path) -> Path:
    """The newest complete numbered checkpoint under root."""
    done = _checkpoint_numbers(root)
    if not done:
        raise PlumError(f"No checkpoint in {root}; run `plum train cpt` first.")
    return root / str(done[-1])


def train_sft(cfg: PlumConfig, cpt_dir: Path | None = None) -> Path:
    """`plum train sft`: generative-retrieval SFT from a CPT checkpoint (default: the newest)."""
    from tokenizer.sid_table import SIDTableError, load_table
    from trainer.checkpoint import CheckpointError, read_manifest
    from trainer.jobs import TrainingDataError, build_corpus, run_sft
    from trainer.vocab import VocabLayout
    from trainer.warm_start import TextTokenizer

    cpt_dir = Path(cpt_dir) if cpt_dir else newest_checkpoint(cfg.paths.checkpoint_dir / "cpt")
    try:
        manifest = read_manifest(cpt_dir)
        table = load_table(cfg.paths.sid_dir, manifest["sid_version"])
    except (CheckpointError, SIDTableError) as exc:
        raise PlumError(str(exc)) from None
    tokenizer = TextTokenizer.from_gguf(smollm2_gguf(cfg.paths.cache_dir))
    try:
        corpus = build_corpus(read_training_log(cfg.paths.training_log_dir), table, _titles(cfg), tokenizer.encode,
                              VocabLayout.from_json(manifest["vocabulary"]))
    except TrainingDataError as exc:
        raise PlumError(str(exc)) from None
    path = run_sft(next_checkpoint(cfg.paths.checkpoint_dir / "sft"), cpt_dir, corpus, cfg.trainer, say=click.echo)
    click.echo(f"train sft: wrote {path}")
    return path


def train_cpt(cfg: PlumConfig) -> Path:
    """`plum train cpt`: continued pre-training on the logged events and the newest SID version."""
    from tokenizer.sid_table import SIDTableError, load_table
    from trainer.jobs import TrainingDataError, build_corpus, run_cpt
    from trainer.warm_start import TextTokenizer

    try:
        table = load_table(cfg.paths.sid_dir)
    except SIDTableError as exc:
        raise PlumError(str(exc)) from None
    gguf = smollm2_gguf(cfg.paths.cache_dir)
    tokenizer = TextTokenizer.from_gguf(gguf)
    try:
        corpus = build_corpus(read_training_log(cfg.paths.training_log_dir), table, _titles(cfg), tokenizer.encode)
    except TrainingDataError as exc:
        raise PlumError(str(exc)) from None
    target = next_checkpoint(cfg.paths.checkpoint_dir / "cpt")
    path = run_cpt(target, corpus, cfg.trainer, gguf, (tokenizer.bos_id, tokenizer.eos_id), say=click.echo)
    click.echo(f"train cpt: wrote {path}")
    return path


def registered_features(cfg: PlumConfig):
    """The context-feature registry's specs as vocabulary features, in registration order (none, with
    a warning, while the registry file is unreadable)."""
    from features.registry import ContextFeatureRegistry
    from trainer.vocab import FeatureSpec

    from features.errors import FeatureStoreError

    try:
        specs = ContextFeatureRegistry(cfg.feast_repo_dir).specs()
    except FeatureStoreError as exc:  # keep training with the features adopted so far
        click.echo(f"train continuous: warning: {exc}", err=True)
        return []
    return [FeatureSpec(s.name, s.type, s.values, s.buckets) for s in specs]


def continuous_paths(cfg: PlumConfig):
    from trainer.continuous import ContinuousPaths

    return ContinuousPaths(cfg.paths.training_log_dir, cfg.paths.sid_dir, cfg.paths.trainer_dir, cfg.paths.model_dir)


def train_continuous(cfg: PlumConfig, stop=None, max_steps: int | None = None, until_drained: bool = False,
                     cpt_dir: Path | None = None) -> None:
    """`plum train --continuous`: resume the loop from its newest checkpoint, or start it from a CPT
    checkpoint (default: the newest); runs until SIGINT/SIGTERM (or max_steps / until_drained)."""
    import signal
    import threading

    from prometheus_client import start_http_server

    from features.errors import FeatureStoreError
    from tokenizer.sid_table import SIDTableError
    from trainer.checkpoint import CheckpointError
    from trainer.continuous import ContinuousError, ContinuousTrainer
    from trainer.metrics import TrainerMetrics

    paths = continuous_paths(cfg)
    if cpt_dir is None and not (paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir())):
        cpt_dir = newest_checkpoint(cfg.paths.checkpoint_dir / "cpt")
    metrics = TrainerMetrics()
    try:
        trainer = ContinuousTrainer(cfg.trainer, paths, Path(cpt_dir) if cpt_dir else None, say=click.echo,
                                    metrics=metrics, feature_source=lambda: registered_features(cfg))
    except (ContinuousError, CheckpointError, SIDTableError, FeatureStoreError) as exc:
        raise PlumError(str(exc)) from None
    port = cfg.trainer.continuous.metrics_port
    endpoints = {}
    if port:
        start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
        endpoints["metrics"] = f"http://127.0.0.1:{port}/metrics"
        click.echo(f"train continuous: Prometheus metrics on {endpoints['metrics']}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    click.echo(f"train continuous: status in {paths.status}; servable versions in {paths.model_dir}; "
               "Ctrl-C checkpoints and stops")
    try:
        with announce(cfg, "trainer", **endpoints):
            trainer.run(stop, max_steps=max_steps, until_drained=until_drained)
    finally:
        trainer.close()
    click.echo(f"train continuous: stopped at step {trainer.loop.step_count}")
