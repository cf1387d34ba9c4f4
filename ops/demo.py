"""The main job (`plum demo`): the whole loop on the embedded default, in its own state directory
(<state>/demo, wiped at the start), with progress output all the way.

 1 stack     the embedded broker (kafka.broker; this process owns it), the topics, the Feast repo
 2 replay    MovieLens-100K through Kafka: the catalogue, then the history (every event but the last
             `live_events`, in event-time order; times shifted so that the history ends now, order and
             gaps kept), then three malformed records that must end in the dead-letter topic
 3 pipeline  the Beam pipeline until it has caught up: Feast (online + offline) and the training log
 4 SIDs      `plum tokenize fit`: SID-v2 over the catalogue and the co-occurrences
 5 start     the streaming pipeline and `plum serve` as processes of their own; the server's version
             policy is `specific` with no version listed: it serves only what the `stable` label names
 6 CPT       `plum train cpt` on the history
 7 trainer   `plum train --continuous` from the CPT checkpoint: `sft_steps` SFT steps on the history
 8 live      the last `live_events` events (each user's spread over the batch) sent live, stamped when
             sent: the trainer holds them out, evaluates its checkpoint on each live user's newest event
             and exports a servable version when its gates pass
 9 promote   the first exported version that passes promotion's gates gets the `stable` label (audit
             log); the trainer stops (it checkpoints) and the server loads the version
10 query     Predict over gRPC (label stable): the top-10 of a few users next to what they watched;
             the latency of every query made
Then a summary; everything this run started is stopped, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from collections import Counter
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.events import EngagementEvent
from ingest.pipeline import counters, pid_lock
from ingest.producer import EventProducer
from ingest.replay import replay
from ops.broker import ApacheKafkaBroker, BrokerInfo, EmbeddedBroker, pid_alive
from ops.config import PlumConfig
from ops.datasets import load_dataset
from ops.demo_report import Progress, figure, print_recommendations, summary
from ops.errors import PlumError
from ops.ingest_jobs import run_pipeline
from ops.live import LiveReplay, interleave_users
from ops.processes import PlumProcess, ServerProcess, StreamingPipeline, TrainerProcess, wait_for, write_config
from ops.stack import BROKER_NAMES, down, embedded_broker, up

DATASET = "movielens-100k"
LIVE_RATE = 5000.0  # events/s of the live replay: the whole live batch reaches the trainer at once
LATENCY_QUERIES = 200  # Predict calls timed for the summary (the shown users first)
PROGRESS_EVERY_S = 20.0
MIN_EVENTS = 1000

# A few malformed records, so the run shows the dead-letter path working next to the good data.
BAD_RECORDS = [
    b'{"not json',
    b'{"schema_version":1,"event_id":"bad-1","user_id":"u","item_id":"i","event_type":"click",'
    b'"event_time":"2020-01-01T00:00:00"}',
    b'{"schema_version":1,"event_id":"bad-2","user_id":"u","item_id":"i","event_type":"teleport",'
    b'"event_time":"2020-01-01T00:00:00Z"}',
]


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """What one `plum demo` runs (the command's options hold the defaults: the README's run)."""

    limit: int | None  # events replayed, history and live together (None: all 100,000)
    live_events: int | None  # the last of them, sent live (None: a tenth)
    model_size: str
    sid_steps: int
    cpt_steps: int
    sft_steps: int  # the continuous trainer's steps on the history before the live events
    show_users: int
    keep_up: bool
    popularity_floor: bool = True  # False: --no-popularity-floor (the gates report it as not applied)


@dataclasses.dataclass
class Parts:
    """What this run started, stopped in reverse order of need (trainer first, broker last)."""

    broker: EmbeddedBroker | ApacheKafkaBroker | None = None
    stack_file: Path | None = None
    pipeline: StreamingPipeline | None = None
    server: ServerProcess | None = None
    trainer: TrainerProcess | None = None
    live: LiveReplay | None = None
    pids: dict[str, int] = dataclasses.field(default_factory=dict)

    def processes(self) -> list[PlumProcess]:
        return [p for p in (self.trainer, self.server, self.pipeline) if p is not None]

    def check(self) -> None:
        """Raise if a process of the loop has exited or the live replay failed."""
        for process in self.processes():
            process.check()
        if self.live is not None:
            self.live.check()


# Configuration --------------------------------------------------------------------------------------
def demo_config(cfg: PlumConfig, run: DemoRun, state: Path) -> PlumConfig:
    """The run's configuration: its own state directory and model base, the run's sizes, and a server
    that follows the stable label."""
    trainer = cfg.trainer.model_copy(update={
        "model_size": run.model_size, "cpt_steps": run.cpt_steps,
        "continuous": cfg.trainer.continuous.model_copy(update={"idle_after_steps": run.sft_steps,
                                                                "popularity_floor": run.popularity_floor})})
    return cfg.model_copy(update={
        "promote": cfg.promote.model_copy(update={"popularity_floor": run.popularity_floor}),
        "paths": cfg.paths.model_copy(update={"state_dir": str(state), "model_base": ""}),
        "tokenizer": cfg.tokenizer.model_copy(update={"steps": run.sid_steps}),
        "trainer": trainer,
        "serving": cfg.serving.model_copy(update={"policy": "specific", "versions": ()})})


def _with_eval_sizes(cfg: PlumConfig, live_users: int) -> PlumConfig:
    """Every live user's newest event is evaluated; an export needs at most that many."""
    continuous = cfg.trainer.continuous
    continuous = continuous.model_copy(update={"eval_examples": max(continuous.eval_examples, live_users),
                                               "min_eval_examples": min(continuous.min_eval_examples, live_users)})
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"continuous": continuous})})


# The run ---------------------------------------------------------------------------------------------
def run(cfg: PlumConfig, demo: DemoRun) -> None:
    """Run the main job; everything it started is stopped when it returns or raises."""
    with _only_run(cfg.paths.state("demo.lock")):
        _run_alone(cfg, demo)


def _only_run(lock: Path) -> AbstractContextManager[None]:
    """One main job per state directory at a time: a second would wipe the first's state."""
    return pid_lock(lock, lambda owner: PlumError(
        f"another `plum demo` (pid {owner}) is running with this state directory ({lock.parent}); "
        "wait for it, or pass another --state-dir"))


def _run_alone(cfg: PlumConfig, demo: DemoRun) -> None:
    state = cfg.paths.state("demo")
    left = BrokerInfo.load(state / "stack.json")
    if left is not None and left.is_running():  # left up by an earlier run with --keep-up
        down(cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": str(state)})}),
             say=click.echo)
    shutil.rmtree(state, ignore_errors=True)
    cfg = demo_config(cfg, demo, state)
    progress = Progress()
    parts = Parts()
    click.echo(f"== PLUM-stream main job: MovieLens-100K through Kafka -> Beam -> Feast -> SIDs -> CPT -> "
               f"continuous trainer -> promotion -> gRPC serving (state in {state})")
    if not demo.popularity_floor:
        click.echo("== --no-popularity-floor: versions are exported and promoted even if they do not beat recent "
                   "popularity (the manifest and the audit log record the floor as not applied)")
    handlers = _interruptible()
    ending = "the run failed"
    try:
        _run(cfg, demo, parts, progress)
        ending = ""
    except KeyboardInterrupt:
        ending = "interrupted"
        raise SystemExit(130) from None
    finally:
        if ending:
            _say(f"\n== {ending}: stopping everything this run started", err=True)
        _shutdown(parts, demo.keep_up)
        _restore(handlers)
    if demo.keep_up:
        click.echo(f"== the stack is still up: `plum --state-dir {state} serve` serves the promoted version, "
                   f"`plum --state-dir {state} stack down` stops the broker")
    click.echo(f"== done in {progress.elapsed()}")


def _run(cfg: PlumConfig, demo: DemoRun, parts: Parts, progress: Progress) -> None:
    with progress.stage("stack", f"the embedded {BROKER_NAMES[cfg.kafka.broker]} broker, topics, the Feast repo"):
        parts.broker = embedded_broker(cfg, say=click.echo)
        info = parts.broker.start(detach=demo.keep_up)
        info.save(cfg.paths.stack_file)
        parts.stack_file = cfg.paths.stack_file
        parts.pids["broker"] = info.pid
        click.echo(f"broker: started {BROKER_NAMES[info.kind]} at {info.bootstrap_servers} (pid {info.pid}, "
                   f"log {info.log_file})")
        cfg = up(cfg, say=lambda line: None if line.startswith("broker: reusing") else click.echo(line)).config

    with progress.stage("replay", f"{DATASET} through Kafka"):
        history, live = _replay(cfg, demo)
    live_users = sorted({e.user_id for e in live})
    cfg = _with_eval_sizes(cfg, len(live_users))
    config_file = write_config(cfg, cfg.paths.state("demo.yaml"))

    with progress.stage("pipeline", "the Beam pipeline (DirectRunner) until it has caught up"):
        result = run_pipeline(cfg, until_caught_up=True)
        if result.events_applied < len(history):
            raise PlumError(f"the pipeline applied {result.events_applied:,} of {len(history):,} history events")

    with progress.stage("SIDs", f"SID-v2 RQ-VAE over the catalogue ({cfg.tokenizer.steps} steps)"):
        from ops.tokenize_jobs import fit

        fit(cfg)

    with progress.stage("start", "the streaming pipeline and the server, as processes of their own"):
        parts.pipeline = StreamingPipeline(cfg, config_file)
        parts.pids["pipeline"] = parts.pipeline.pid
        parts.server = ServerProcess(cfg, config_file=config_file)
        parts.pids["server"] = parts.server.pid
        click.echo(f"pipeline: `plum pipeline` started (pid {parts.pipeline.pid}, log {parts.pipeline.log_file})")
        click.echo(f"server: `plum serve` started (pid {parts.server.pid}, log {parts.server.log_file}); version "
                   "policy 'specific' with no version listed: it serves only what the 'stable' label names")

    with progress.stage("CPT", f"continued pre-training of a {demo.model_size} decoder on the history "
                        f"({demo.cpt_steps} steps of {cfg.trainer.batch_size})"):
        from ops.train_jobs import train_cpt

        train_cpt(cfg)
        parts.check()

    with progress.stage("trainer", f"`plum train --continuous` from the CPT checkpoint: {demo.sft_steps} SFT "
                        f"steps of {cfg.trainer.batch_size} on the history"):
        parts.trainer = TrainerProcess(cfg, config_file)
        parts.pids["trainer"] = parts.trainer.pid
        click.echo(f"trainer: started (pid {parts.trainer.pid}, log {parts.trainer.log_file})")
        trainer = parts.trainer
        wait_for(lambda: trainer.status().get("state") == "idle", 600 + 10 * demo.sft_steps,
                 "the trainer's steps on the history", parts.processes(),
                 progress=lambda: _trainer_progress(trainer.status(), demo.sft_steps), say=click.echo,
                 every=PROGRESS_EVERY_S)
        status = trainer.status()
        click.echo(f"trainer: {status.get('step')} steps on the history, loss {figure(status.get('loss'))}; "
                   "idle until new events arrive")
        wait_for(parts.server.listening, 300, "the server to listen", parts.processes())

    with progress.stage("live", f"the last {len(live):,} events arrive live from {len(live_users):,} users"):
        _live(cfg, parts, live, len(history))

    with progress.stage("promote", "the first version that passes the gates -> label 'stable'"):
        version, entry = _promote_first(cfg, parts)
        parts.trainer.stop()
        parts.trainer = None
        click.echo("trainer: stopped (SIGTERM: it checkpointed); the queries below have the CPUs to themselves")

    with progress.stage("query", f"Predict over gRPC (label 'stable'): top-10 for {demo.show_users} users, "
                        "then the latency of every query"):
        latencies, answered = _query(cfg, parts, version, live, demo.show_users)

    summary(cfg, progress, len(history), len(live), version, _manifest(cfg, version), entry, latencies, answered)


def _replay(cfg: PlumConfig, demo: DemoRun) -> tuple[list[EngagementEvent], list[EngagementEvent]]:
    """Items, the history (shifted to end now) and the malformed records into Kafka; returns the
    history and the live events (users interleaved) still to send."""
    started = time.monotonic()
    ds = load_dataset(DATASET, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    events = list(to_events(ds))
    total = len(events) if demo.limit is None else min(demo.limit, len(events))
    if total < MIN_EVENTS:
        raise PlumError(f"--limit {demo.limit}: the loop needs at least {MIN_EVENTS:,} events (a history to "
                        "train on and live users to evaluate on)")
    live_n = demo.live_events if demo.live_events is not None else total // 10
    if not 1 <= live_n <= total // 2:
        raise PlumError(f"--live-events {live_n:,}: choose between 1 and half of the {total:,} events replayed")
    history, live = events[:total - live_n], interleave_users(events[total - live_n:total])
    shift = datetime.now(timezone.utc) - history[-1].event_time
    history = [e.model_copy(update={"event_time": e.event_time + shift}) for e in history]
    click.echo(f"replay: {DATASET}: {len(ds.items):,} items; {len(history):,} history events, times shifted by "
               f"{shift.days:,} days so that the history ends now (order and gaps kept); the last {live_n:,} "
               "events are kept back to arrive live later (loaded in "
               f"{time.monotonic() - started:.1f} s)")
    with EventProducer(cfg.kafka) as producer:
        sent = replay(producer, to_item_upserts(ds), history)
        for value in BAD_RECORDS:
            producer.send_raw(cfg.kafka.events_topic, b"demo", value)
    click.echo(f"replay: sent {sent.items:,} items and {sent.events:,} events in {sent.seconds:.1f} s, then "
               f"{len(BAD_RECORDS)} malformed records (they must end in the dead-letter topic)")
    return history, live


def _trainer_progress(status: dict[str, Any], steps: int) -> str:
    if not status:
        return "starting: JAX, the CPT checkpoint, the training log"
    return (f"{status.get('state')}, step {status.get('step')} of {steps}, loss {figure(status.get('loss'))}, "
            f"{status.get('tokens_per_s')} tokens/s")


def _live(cfg: PlumConfig, parts: Parts, live: list[EngagementEvent], history: int) -> None:
    """Send the live events; wait until the pipeline has applied them and the trainer has exported a version."""
    parts.live = LiveReplay(cfg, live, LIVE_RATE)
    parts.live.start()
    parts.live.join()
    parts.check()
    click.echo(f"live: sent {parts.live.sent:,} events, each stamped with its send time")
    expected = history + len(live)
    applied = lambda: counters(cfg.paths.pipeline_state_db).get("events_applied", 0)  # noqa: E731
    wait_for(lambda: applied() >= expected, 300, "the streaming pipeline to apply them", parts.processes(),
             progress=lambda: f"{applied():,} of {expected:,} events applied", say=click.echo, every=PROGRESS_EVERY_S)
    click.echo(f"pipeline: {applied():,} events applied; the trainer holds the new ones out for evaluation")
    trainer = parts.trainer
    from trainer.servable import version_numbers

    def exported() -> bool:
        if version_numbers(cfg.paths.model_dir):
            return True
        refused = refused_for_good(trainer.status(), expected)
        if refused:
            raise PlumError(f"the trainer evaluated every live user and exported nothing: {refused}. A run this "
                            f"small may not beat recent popularity; `plum demo --no-popularity-floor` goes on "
                            f"anyway (the gates then record the floor as not applied)")
        return False

    wait_for(exported, 900, "the trainer to evaluate and export a version",
             parts.processes(), progress=lambda: _held_out_progress(trainer.status()), say=click.echo,
             every=PROGRESS_EVERY_S)


def refused_for_good(status: dict[str, Any], events: int) -> str | None:
    """The trainer's last export refusal, when no further export can come without new events: it
    has read all `events`, is idle, holds nothing out, and its newest evaluation was refused."""
    last = status.get("last_eval") or {}
    if (status.get("events_read", 0) >= events and status.get("state") == "idle" and not status.get("held_out")
            and last.get("export_refused")):
        return str(last["export_refused"])
    return None


def _held_out_progress(status: dict[str, Any]) -> str:
    last = status.get("last_eval") or {}
    text = f"{status.get('held_out', 0):,} events held out, step {status.get('step')}"
    if last.get("export_refused"):
        text += f"; last checkpoint not exported: {last['export_refused']}"
    return text


def _promote_first(cfg: PlumConfig, parts: Parts) -> tuple[int, dict[str, Any]]:
    """Try each exported version in turn until one passes the gates; returns it and its audit entry."""
    from ops.promote import PromotionRefused, promote
    from trainer.servable import version_numbers

    tried: set[int] = set()
    deadline = time.monotonic() + 300  # a refused version: the rest of the live batch may yield another
    while True:
        untried = [v for v in version_numbers(cfg.paths.model_dir) if v not in tried]
        if not untried:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PlumError(f"no version passed the gates (tried {sorted(tried)}); see {parts.trainer.log_file}")
            wait_for(lambda: any(v not in tried for v in version_numbers(cfg.paths.model_dir)), remaining,
                     "another version from the trainer", parts.processes(),
                     progress=lambda: _held_out_progress(parts.trainer.status()), say=click.echo,
                     every=PROGRESS_EVERY_S)
            continue
        version = untried[0]
        tried.add(version)
        _describe_version(cfg, version)
        try:
            entry = promote(cfg.paths.model_dir, cfg.paths.training_log_dir, version, "stable",
                            "plum demo: the first version that passes the gates", cfg.promote, say=click.echo)
        except PromotionRefused as exc:
            click.echo(f"promote: version {version} refused: {exc}")
            continue
        for gate in entry["gates"]:
            click.echo(f"  gate {gate['name']}: {'passed' if gate['passed'] else 'FAILED'}: {gate['detail']}")
        click.echo(f"promote: label 'stable' now points at version {version}; recorded in "
                   f"{cfg.paths.model_dir / 'audit.jsonl'}")
        return version, entry


def _manifest(cfg: PlumConfig, version: int) -> dict[str, Any]:
    from trainer.checkpoint import read_manifest

    return read_manifest(cfg.paths.model_dir / str(version))


def _describe_version(cfg: PlumConfig, version: int) -> None:
    manifest = _manifest(cfg, version)
    evaluation = manifest.get("eval") or {}
    click.echo(f"trainer: exported version {version} at step {manifest.get('step')}: Recall@10 "
               f"{figure(evaluation.get('recall@10'))}, NDCG@10 {figure(evaluation.get('ndcg@10'))} on "
               f"{evaluation.get('examples')} held-out events; export gate: {manifest.get('gate')}")


def _query(cfg: PlumConfig, parts: Parts, version: int, live: list[EngagementEvent],
           show: int) -> tuple[list[float], set[int]]:
    """Wait for the server to serve the version, print the shown users' top-10, time every query."""
    ServingClient = _serving_client()
    server = parts.server
    with ServingClient(server.grpc_target, cfg.paths.model_name) as client:
        client.wait_connected()
        waited = wait_for(lambda: _state(client, version) == "AVAILABLE", 300,
                          f"the server to load version {version}", parts.processes(),
                          progress=lambda: f"version {version}: {_state(client, version) or 'not seen yet'}",
                          say=click.echo, every=PROGRESS_EVERY_S)
        click.echo(f"server: version {version} AVAILABLE after {waited:.0f} s (loaded, warmed up)")
        by_activity = [u for u, _ in Counter(e.user_id for e in live).most_common()]
        shown = by_activity[:show]
        users = (shown + sorted(set(by_activity) - set(shown)))[:LATENCY_QUERIES]
        store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
        histories = store.read_online("user_history", shown)
        latencies, answered, results = [], set(), {}
        for user in users:
            started = time.perf_counter()
            answered_by, items = client.recommend(user, label="stable")
            latencies.append(time.perf_counter() - started)
            answered.add(answered_by)
            results[user] = items
    print_recommendations(store, version, histories, {user: results[user] for user in shown})
    if answered != {version}:
        raise PlumError(f"the server answered with versions {sorted(answered)}, not only the promoted {version}")
    return latencies, answered


def _serving_client() -> Any:
    """ops.serving_client.ServingClient. Importing it imports TensorFlow, whose C++ start-up lines (written
    before its logging is set up, so no setting silences them) are kept out of the output."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            from ops.serving_client import ServingClient
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return ServingClient


def _state(client: Any, version: int) -> str | None:
    import grpc

    try:
        return client.states().get(version)
    except grpc.RpcError:
        return None


# Shutdown ------------------------------------------------------------------------------------------------
def _shutdown(parts: Parts, keep_up: bool) -> None:
    """Stop what the run started: live replay, trainer, server, pipeline, then (unless keep_up) the broker;
    check that no process is left. A second Ctrl-C does not cut this short."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if parts.live is not None:
        parts.live.stop_event.set()
        parts.live.join(timeout=30)
    for name, process in (("trainer", parts.trainer), ("server", parts.server), ("pipeline", parts.pipeline)):
        if process is not None:
            _quietly(process.stop, name)
    if parts.broker is not None and not keep_up:
        _quietly(parts.broker.stop, "broker")
        if parts.stack_file is not None:
            parts.stack_file.unlink(missing_ok=True)
    left = [f"{name} (pid {pid})" for name, pid in parts.pids.items()
            if pid_alive(pid) and not (keep_up and name == "broker")]
    if left:
        _say(f"warning: still running: {', '.join(left)}", err=True)
    else:
        _say(f"shutdown: none of the {len(parts.pids)} processes this run started is left"
             + (" (the broker stays up: --keep-up)" if keep_up and "broker" in parts.pids else ""))


def _quietly(stop: Any, name: str) -> None:
    try:
        stop()
    except Exception as exc:  # shutting down: report and go on stopping the rest
        _say(f"warning: stopping the {name} failed: {exc}", err=True)
    else:
        _say(f"{name}: stopped")


def _say(message: str, err: bool = False) -> None:
    """click.echo that never raises: a closed output (`plum demo | head`) must not cut the shutdown short."""
    try:
        click.echo(message, err=err)
    except OSError:
        pass


def _interruptible() -> dict[int, Any] | None:
    """SIGINT raises KeyboardInterrupt even when started in the background (which ignores it), and
    SIGTERM does the same, so that the run always stops what it started. Returns the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    return old


def _restore(handlers: dict[int, Any] | None) -> None:
    for sig, handler in (handlers or {}).items():
        signal.signal(sig, handler)
