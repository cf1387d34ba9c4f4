"""Wiring of the ingestion stage for the CLI: replay a data set, run the pipeline."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterator

import click
from tqdm import tqdm

from ingest.config import PipelineConfig
from ingest.pipeline import PipelineResult
from ingest.producer import EventProducer
from ingest.replay import ReplayResult, replay
from ingest.sinks import SinkSettings
from ops.config import PlumConfig
from ops.runtime import announce
from ops.stack import resolve


def sink_settings(cfg: PlumConfig, pipeline: PipelineConfig | None = None, quiet: bool = False) -> SinkSettings:
    """The pipeline's settings from the project config (the 'embedded' address resolved)."""
    cfg = resolve(cfg)
    return SinkSettings(
        kafka=cfg.kafka,
        pipeline=pipeline or cfg.pipeline,
        feast=cfg.feast,
        feast_repo_dir=str(cfg.feast_repo_dir),
        state_db=str(cfg.paths.pipeline_state_db),
        training_log_dir=str(cfg.paths.training_log_dir),
        progress_interval_s=None if quiet else 5.0,
    )


def replay_dataset(cfg: PlumConfig, dataset: str, speed: float | None = None, limit: int | None = None,
                   data_dir: str | None = None, quiet: bool = False) -> ReplayResult:
    """Load a data set and replay it into the configured Kafka with a progress bar."""
    from ingest.datasets import to_events, to_item_upserts
    from ops.datasets import load_dataset

    cfg = resolve(cfg)
    started = time.monotonic()
    ds = load_dataset(dataset, Path(data_dir or cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    total = len(ds.interactions) if limit is None else min(limit, len(ds.interactions))
    if not quiet:
        click.echo(f"replay: {dataset}: {len(ds.items)} items, {total} events "
                   f"(loaded in {time.monotonic() - started:.1f} s), speed "
                   f"{'as fast as possible' if speed is None else f'{speed:g}x real time'}")
    with EventProducer(cfg.kafka) as producer, tqdm(total=total, unit="ev", disable=quiet,
                                                     desc="replay", mininterval=1.0) as bar:
        result = replay(producer, to_item_upserts(ds), islice(to_events(ds), total), speed=speed,
                        on_progress=bar.update)
    if not quiet:
        click.echo(f"replay: sent {result.items} items and {result.events} events in {result.seconds:.1f} s "
                   f"({result.events_per_second:,.0f} events/s)")
    return result


def run_pipeline(cfg: PlumConfig, until_caught_up: bool, runner: str | None = None,
                 beam_args: list[str] | None = None, quiet: bool = False) -> PipelineResult:
    """Run the Beam pipeline against the configured Kafka, Feast repo and state directory."""
    from ingest.pipeline import run

    pipeline_cfg = cfg.pipeline.model_copy(update={"runner": runner}) if runner else cfg.pipeline
    settings = sink_settings(cfg, pipeline_cfg, quiet)
    if not quiet:
        mode = "until caught up" if until_caught_up else "streaming until interrupted (Ctrl-C)"
        click.echo(f"pipeline: {pipeline_cfg.runner}, {mode}; reading {cfg.kafka.events_topic} and "
                   f"{cfg.kafka.items_topic} from {settings.kafka.bootstrap_servers}")
    if not until_caught_up and threading.current_thread() is threading.main_thread():
        # Explicit handlers: a process started in the background inherits SIGINT ignored, and SIGTERM
        # (what service managers send) should stop the pipeline like Ctrl-C, metrics server included.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run(settings, until_caught_up=until_caught_up, extra_args=beam_args,
                     while_running=_while_running(cfg, settings, streaming=not until_caught_up, quiet=quiet))
    except KeyboardInterrupt:
        click.echo("pipeline: interrupted; committed batches are safe, the rest is re-read on restart")
        raise SystemExit(130) from None
    if not quiet:
        click.echo(f"pipeline: applied {result.events_applied} events ({result.events_duplicate} duplicates "
                   f"ignored), {result.items_upserted} item upserts, {result.records_rejected + result.events_expired} "
                   f"records to the DLQ ({result.events_expired} older than the de-duplication retention) in {result.seconds:.1f} s ({result.events_per_second:,.0f} events/s)")
    return result


@contextmanager
def _while_running(cfg: PlumConfig, settings: SinkSettings, streaming: bool, quiet: bool) -> Iterator[None]:
    """The pipeline's record for `plum status` and, while it streams, its Prometheus metrics."""
    from ingest.metrics import PipelineMetrics

    port = settings.pipeline.metrics_port
    metrics, endpoints = None, {}
    if streaming and port:
        metrics = PipelineMetrics(settings.kafka, Path(settings.state_db), settings.pipeline.metrics_interval_s)
        try:
            endpoints["metrics"] = metrics.serve(port)
        except OSError as exc:
            metrics.close()
            metrics = None
            # Ingestion matters more than its metrics: say so and go on without them.
            click.echo(f"pipeline: no Prometheus metrics: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
                       "set pipeline.metrics_port to a free port (0 turns them off)", err=True)
        else:
            if not quiet:
                click.echo(f"pipeline: Prometheus metrics on {endpoints['metrics']}")
    try:
        with announce(cfg, "pipeline", **endpoints):
            yield
    finally:
        if metrics is not None:
            metrics.close()
