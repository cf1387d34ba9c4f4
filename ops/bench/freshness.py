"""`plum bench freshness`: how soon a live event shows in the online features and in a servable version.

One fresh embedded stack runs the whole loop, each part as it runs in production:
1. history: the first `history_events` MovieLens-100K events (event-time order) are replayed as fast
   as possible and ingested by a bounded pipeline run; SIDs are fitted on that catalogue; the
   streaming pipeline (`plum pipeline`) starts; a short CPT checkpoint is trained, whose data
   watermark covers everything logged so far;
2. trainer alone: the continuous trainer (`plum train --continuous`) starts from that checkpoint and
   trains its `idle_after_steps` history-only steps with no load offered; its own status file gives
   the baseline tokens/s;
3. live: the next MovieLens events, in their event-time order, are sent at a fixed rate, each re-timed
   to its send time (so they are the newest events the loop has seen). `order` "time" keeps
   MovieLens' order and with it its bursts: a user rates many films in one sitting (20 consecutive
   events come from 2-3 users on average), which decides how many distinct users a checkpoint's
   held-out slice holds; "interleaved" spreads each user's events evenly over the window (each
   user's own order kept), as on a service with many users active at once. Every event sent during
   the first `live_seconds` is a probe. Sending goes on at the same rate afterwards (traffic that is not
   measured) while the bench waits, at most `wait_seconds`, for versions that cover the probes: the
   trainer evaluates each checkpoint on events read after its watermark, so without newer events
   behind them the last probes could never reach a version;
4. stop: trainer (SIGTERM: it checkpoints and exits), pipeline, broker; the state is removed.

What is measured, for each probe (send time taken right after the producer accepted the event):
(a) send -> online feature: the probe users are real MovieLens users, most with a history already,
    so the bench reads each one's user_history event_count just before the live phase and polls it
    during it (every 0.25 s); a user's k-th probe is visible once the count reaches the baseline + k
    (a user's events share a partition and are applied in order, and nothing else sends events);
(b) send -> servable version: the training log maps each probe's event id to its Kafka partition and
    offset; the bench polls the model directory every 0.5 s and notes when each new version appears
    and its manifest's data watermark; the delay is the first version seen whose watermark offset for
    the probe's partition reaches the probe's offset, minus the send time. Probes that no version
    covered within the wait are counted, not given a delay;
(b') send -> taken for training: the same with the watermark in the trainer's status file (written
    every 5 s and at each checkpoint): the part of (b) before the trainer took the probe; the rest is
    waiting for a checkpoint that passes the export gates;
(b'') send -> first servable version that trained on it: a watermark covers every event the trainer
    took, including those reward sampling dropped (about 30% of MovieLens events: a rating r is kept
    with probability r / 5) and, because it is a per-partition offset, events of a later file not yet
    read. Each version's manifest lists the fresh examples the trainer took since the version before
    it, by outcome (`fresh_examples`: trained, dropped_by_reward, without_sid, with the ledger's
    counts); the delay is to the first version seen that lists the probe as trained. Probes listed as
    dropped were never trained as fresh examples (they may still be a target of a later window the
    trainer draws from its history pool), and are counted;
throughput: the trainer's own tokens/s per report window (5 s of wall clock, so a window with a
    checkpoint boundary includes its save and evaluation: while load is offered, the evaluations the
    stream causes count against training, as they do in production): medians alone and while load
    is offered (the pipeline ingesting beside it), their ratio, and how many windows held a boundary;
    the trainer's cumulative seconds by activity (its status file) give the shares of the wall clock
    spent in optimizer steps, in evaluations, and in whole checkpoint boundaries while load is offered.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.events import EngagementEvent, ItemUpsert
from ingest.producer import EventProducer
from ingest.replay import replay
from ingest.training_log import read_training_log
from ops.bench.ingest import OnlineObserver, _delays, warm_up
from ops.bench.report import command_line, machine, update_benchmarks_table, write_result
from ops.config import PlumConfig
from ops.datasets import load_dataset
from ops.errors import PlumError
from ops.ingest_jobs import run_pipeline
from ops.live import LiveReplay, interleave_users
from ops.processes import PlumProcess, StreamingPipeline, TrainerProcess, read_status, wait_for, write_config
from ops.stack import embedded_broker, up
from ops.tokenize_jobs import fit
from ops.train_jobs import train_cpt
from trainer.checkpoint import CheckpointError, read_manifest
from trainer.config import TrainerSettings
from trainer.servable import version_numbers

TARGET_VERSION_DELAY_S = 300.0
FRESH_OUTCOMES = ("trained", "dropped_by_reward", "without_sid")  # trainer/stream.py Ledger
ONLINE_POLL_S = 0.25
TRAINER_POLL_S = 0.5
REPORT_EVERY_S = 5.0  # the trainer's status cadence: the throughput windows
LOG_READ_EVERY_S = 15.0


@dataclasses.dataclass(frozen=True)
class FreshnessRun:
    """What one `plum bench freshness` invocation runs (sizes of the data, the models and the phases)."""

    history_events: int
    order: str  # "time": MovieLens' own order; "interleaved": users spread over the stream
    rate: float
    live_seconds: int
    wait_seconds: int
    model_size: str
    batch_size: int
    sid_steps: int
    cpt_steps: int
    checkpoint_every_s: float
    min_eval_examples: int
    eval_examples: int
    idle_after_steps: int

    def command(self) -> str:
        """The command line that repeats this run."""
        return command_line("plum bench freshness", self)

    def trainer(self, base: TrainerSettings) -> TrainerSettings:
        """The trainer settings of this run (CPT in process, the continuous trainer from the run's config file)."""
        continuous = base.continuous.model_copy(update={
            "checkpoint_every_s": self.checkpoint_every_s, "min_eval_examples": self.min_eval_examples,
            "eval_examples": self.eval_examples, "idle_after_steps": self.idle_after_steps,
            "report_every_s": REPORT_EVERY_S})
        return base.model_copy(update={"model_size": self.model_size, "batch_size": self.batch_size,
                                       "cpt_steps": self.cpt_steps, "continuous": continuous})


def percentiles(delays: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max in seconds (None each when nothing was measured)."""
    if not delays:
        return {"p50_s": None, "p99_s": None, "max_s": None}
    arr = np.array(delays)
    return {"p50_s": round(float(np.percentile(arr, 50)), 3), "p99_s": round(float(np.percentile(arr, 99)), 3),
            "max_s": round(float(arr.max()), 3)}


def coverage_delays(probes: dict[str, tuple[int, int]], sent_at: dict[str, float],
                    watermarks: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds from each probe's send to the first watermark seen that includes its (partition,
    offset); probes none covers are left out. `watermarks` in the order seen, each with "seen_at"
    (the clock of `sent_at`) and "offsets" ({partition: last offset}): servable versions' manifests,
    or the trainer's status."""
    return {e: watermarks[index]["seen_at"] - sent_at[e] for e, index in first_covering(probes, watermarks).items()}


def first_covering(probes: dict[str, tuple[int, int]], watermarks: list[dict[str, Any]]) -> dict[str, int]:
    """The index of the first watermark that includes each probe's (partition, offset); probes none covers
    are left out."""
    first = {}
    for event_id, (partition, offset) in probes.items():
        for index, watermark in enumerate(watermarks):
            if watermark["offsets"].get(str(partition), -1) >= offset:
                first[event_id] = index
                break
    return first


def fresh_outcomes(versions: list[dict[str, Any]]) -> dict[str, tuple[str, int]] | None:
    """Each fresh example's outcome and the index (in `versions`, the order seen) of the first version
    whose manifest lists it among the examples the trainer took since the version before; None when a
    version's manifest does not record them (a trainer without `fresh_examples`)."""
    if not versions or any(version["fresh"] is None for version in versions):
        return None
    outcomes: dict[str, tuple[str, int]] = {}
    for index, version in enumerate(versions):
        for outcome in FRESH_OUTCOMES:
            for event_id in version["fresh"]["event_ids"].get(outcome, []):
                outcomes.setdefault(event_id, (outcome, index))
    return outcomes


def fresh_record(versions: list[dict[str, Any]], outcomes: dict[str, tuple[str, int]] | None) -> dict[str, Any]:
    """What the manifests' lists add up to, against the newest version's ledger (the trainer's own
    counts of every fresh example taken in its lineage); `chain_complete`: every version's list starts
    at the version seen before it, so nothing was taken between two lists."""
    if outcomes is None:
        return {"recorded": False, "reason": "the servable versions' manifests have no fresh_examples "
                                             "(trainer/continuous.py does not record them)"}
    chain = [version["fresh"].get("since_version") for version in versions]
    return {"recorded": True, "ledger": versions[-1]["fresh"]["ledger"],
            "listed": {o: sum(1 for outcome, _ in outcomes.values() if outcome == o) for o in FRESH_OUTCOMES},
            "chain_complete": chain == [None] + [version["version"] for version in versions[:-1]]}


class TrainerObserver(threading.Thread):
    """Polls the trainer's status file and the model directory: status samples (with the watermark
    of what the trainer has taken), and each servable version with the time this process first saw it."""

    def __init__(self, status_file: Path, model_dir: Path) -> None:
        super().__init__(daemon=True)
        self.status_file, self.model_dir = status_file, model_dir
        self.phase = "alone"
        self.samples: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def status(self) -> dict[str, Any]:
        return read_status(self.status_file)

    def run(self) -> None:
        last = None
        while not self.stop_event.is_set():
            now = time.monotonic()
            status = self.status()
            if status and status.get("updated_at") != last:
                last = status.get("updated_at")
                self.samples.append({"seen_at": now, "phase": self.phase, "state": status.get("state"),
                                     "step": status.get("step"), "tokens_per_s": status.get("tokens_per_s"),
                                     "checkpoint": (status.get("last_checkpoint") or {}).get("step"),
                                     "offsets": (status.get("watermark") or {}).get("offsets", {}),
                                     "seconds": status.get("seconds") or {},
                                     "export_refusals": status.get("export_refusals")})
            known = {v["version"] for v in self.versions}
            for number in version_numbers(self.model_dir):
                if number not in known:
                    self._add_version(number, now)
            self.stop_event.wait(TRAINER_POLL_S)

    def _add_version(self, number: int, seen_at: float) -> None:
        try:
            manifest = read_manifest(self.model_dir / str(number))
        except CheckpointError:
            return  # listed a moment before its manifest could be read: next poll
        watermark, evaluation = manifest.get("data_watermark") or {}, manifest.get("eval") or {}
        created, newest = manifest.get("created_at"), watermark.get("event_time")
        lag = (datetime.fromisoformat(created) - datetime.fromisoformat(newest)).total_seconds() \
            if created and newest else None
        self.versions.append({"version": number, "seen_at": seen_at, "created_at": created,
                              "step": manifest.get("step"), "offsets": watermark.get("offsets", {}),
                              "watermark_events": watermark.get("events"), "watermark_event_time": newest,
                              "watermark_lag_s": lag,
                              "recall@10": evaluation.get("recall@10"), "eval_examples": evaluation.get("examples"),
                              "gate": manifest.get("gate"), "fresh": manifest.get("fresh_examples")})


def throughput(samples: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    """Median tokens/s of the trainer's report windows in a phase. A report is a status write with a
    new tokens/s; the process's first report (it includes compiling the step) is left out. Windows
    in which a checkpoint boundary happened are counted: their figure includes its save and evaluation."""
    reports = []
    previous = None
    for sample in samples:
        if sample["state"] == "training" and sample["tokens_per_s"] and (
                previous is None or sample["tokens_per_s"] != previous["tokens_per_s"]):
            if previous is not None:
                reports.append((sample, sample["checkpoint"] != previous["checkpoint"]))
            previous = sample
    in_phase = [(s["tokens_per_s"], boundary) for s, boundary in reports if s["phase"] == phase]
    return {"tokens_per_s": round(statistics.median(v for v, _ in in_phase), 1) if in_phase else None,
            "windows": len(in_phase), "windows_with_a_boundary": sum(boundary for _, boundary in in_phase)}


def time_shares(samples: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    """How the trainer spent the phase's wall clock (from its own cumulative seconds by activity):
    optimizer steps, evaluations at checkpoint boundaries, and whole boundaries (evaluation, save, export)."""
    in_phase = [s for s in samples if s["phase"] == phase and s["seconds"]]
    if len(in_phase) < 2 or in_phase[-1]["seen_at"] <= in_phase[0]["seen_at"]:
        return {"wall_s": None}
    first, last = in_phase[0], in_phase[-1]
    wall = last["seen_at"] - first["seen_at"]
    spent = {key: last["seconds"].get(key, 0.0) - first["seconds"].get(key, 0.0)
             for key in ("training", "evaluating", "boundaries")}
    return {"wall_s": round(wall, 1), **{f"{key}_s": round(value, 1) for key, value in spent.items()},
            **{f"{key}_share": round(value / wall, 3) for key, value in spent.items()}}


def _events(cfg: PlumConfig, fresh: FreshnessRun) -> tuple[list[ItemUpsert], list[EngagementEvent],
                                                            list[EngagementEvent]]:
    """Items, history events, and the live events in the order they will be sent (probes first)."""
    ds = load_dataset("movielens-100k", Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir))
    events = list(to_events(ds))
    probes = round(fresh.rate * fresh.live_seconds)
    if fresh.history_events + probes > len(events):
        raise PlumError(f"MovieLens-100K has {len(events):,} events: --history-events {fresh.history_events:,} plus "
                        f"{probes:,} live probes (rate x live seconds) do not fit; lower one of them.")
    live, tail = events[fresh.history_events:][:probes], events[fresh.history_events + probes:]
    if fresh.order == "interleaved":
        live, tail = interleave_users(live), interleave_users(tail)
    return list(to_item_upserts(ds)), events[:fresh.history_events], live + tail


def _probe_positions(cfg: PlumConfig, event_ids: set[str]) -> dict[str, tuple[int, int]]:
    log = read_training_log(cfg.paths.training_log_dir)
    log = log[log["event_id"].isin(event_ids)]
    return {e: (int(p), int(o)) for e, p, o in zip(log["event_id"], log["kafka_partition"], log["kafka_offset"])}


def _covered(positions: dict[str, tuple[int, int]], versions: list[dict[str, Any]]) -> int:
    """Probes the newest version seen covers (watermarks only grow)."""
    if not versions:
        return 0
    offsets = versions[-1]["offsets"]
    return sum(offsets.get(str(p), -1) >= o for p, o in positions.values())


def _visible(online: OnlineObserver, baseline: dict[str, int], sends: dict[str, list[float]]) -> bool:
    return all(online.seen[u] and online.seen[u][-1][0] >= baseline[u] + len(s) for u, s in sends.items())


def _stop(threads: list[LiveReplay | TrainerObserver | OnlineObserver]) -> None:
    for thread in threads:
        thread.stop_event.set()
    for thread in threads:
        if thread.is_alive():
            thread.join(timeout=30)


def _check(live: LiveReplay, processes: list[PlumProcess]) -> None:
    live.check()
    for process in processes:
        process.check()


def _send_probes(live: LiveReplay, probes: int, observer: TrainerObserver, processes: list[PlumProcess]) -> None:
    """Until every probe is sent: watch the processes, say how the trainer keeps up every 30 s."""
    next_say = time.monotonic() + 30
    while live.sent < probes:
        _check(live, processes)
        if time.monotonic() >= next_say:
            status = observer.status()
            click.echo(f"bench freshness: {live.sent:,} sent; trainer step {status.get('step')}, "
                       f"{status.get('held_out')} held out, {status.get('waiting')} waiting; "
                       f"{len(observer.versions)} versions")
            next_say += 30
        time.sleep(0.5)


def _wait_for_versions(cfg: PlumConfig, seconds: float, live: LiveReplay, online: OnlineObserver,
                       baseline: dict[str, int], observer: TrainerObserver, processes: list[PlumProcess]) -> None:
    """Until a version covers every probe (or `seconds` pass); stops the online observer once every
    probe is visible there."""
    positions: dict[str, tuple[int, int]] = {}
    deadline = time.monotonic() + seconds
    next_read, next_say = time.monotonic() + 5, time.monotonic() + 30
    while time.monotonic() < deadline:
        _check(live, processes)
        if online.is_alive() and _visible(online, baseline, live.user_sends):
            online.stop_event.set()
        if len(positions) < len(live.sent_at) and time.monotonic() >= next_read:
            positions = _probe_positions(cfg, set(live.sent_at))
            next_read = time.monotonic() + LOG_READ_EVERY_S
        covered = _covered(positions, observer.versions)
        if len(positions) == len(live.sent_at) and covered == len(positions):
            return
        if time.monotonic() >= next_say:
            click.echo(f"bench freshness: {covered:,} of {len(live.sent_at):,} probes in a version "
                       f"({len(observer.versions)} versions so far)")
            next_say += 30
        time.sleep(0.5)


def _bootstrap(cfg: PlumConfig, items: list[ItemUpsert], history: list[EngagementEvent]) -> None:
    with EventProducer(cfg.kafka) as producer:
        sent = replay(producer, items, history)
    click.echo(f"bench freshness: replayed {sent.items:,} items and {sent.events:,} history events "
               f"in {sent.seconds:.1f} s")
    result = run_pipeline(cfg, until_caught_up=True, quiet=True)
    click.echo(f"bench freshness: pipeline caught up ({result.events_applied:,} events in {result.seconds:.1f} s)")
    fit(cfg)


def run(cfg: PlumConfig, fresh: FreshnessRun, output: str | None = None) -> dict[str, Any]:
    """Run the loop on a fresh embedded stack; write the JSON (and the docs/benchmarks.md table for the default file)."""
    state = Path(tempfile.mkdtemp(prefix="plum-bench-"))
    cfg = cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": str(state / "stack"), "model_base": ""}),
        "tokenizer": cfg.tokenizer.model_copy(update={"steps": fresh.sid_steps}),
        "trainer": fresh.trainer(cfg.trainer)})
    broker = embedded_broker(cfg, say=click.echo)
    processes: list[PlumProcess] = []  # stopped in this order: the trainer first
    threads: list[LiveReplay | TrainerObserver | OnlineObserver] = []
    started = time.monotonic()
    try:
        broker.start().save(cfg.paths.stack_file)
        cfg = up(cfg, say=click.echo).config
        items, history, later = _events(cfg, fresh)
        _bootstrap(cfg, items, history)
        store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
        pipeline = StreamingPipeline(cfg)
        processes.append(pipeline)
        startup = warm_up(cfg, pipeline, store, items[0].item_id)
        click.echo(f"bench freshness: streaming pipeline up ({startup:.1f} s to its first online feature)")
        train_cpt(cfg)  # after the warm-up event, so its watermark covers every event logged so far

        trainer = TrainerProcess(cfg, write_config(cfg, cfg.paths.state("bench-freshness.yaml")))
        processes.insert(0, trainer)
        observer = TrainerObserver(trainer.status_file, cfg.paths.model_dir)
        threads.append(observer)
        observer.start()
        wait_for(lambda: observer.status().get("state") == "idle", 900 + 5 * fresh.idle_after_steps,
                 "the trainer's history-only steps", processes)
        alone = throughput(observer.samples, "alone")
        click.echo(f"bench freshness: trainer alone: {alone['tokens_per_s']} tokens/s "
                   f"(median of {alone['windows']} report windows)")

        probes = round(fresh.rate * fresh.live_seconds)
        users = sorted({e.user_id for e in later[:probes]})
        counts = store.read_online("user_history", users)
        baseline = {u: int(c) if c == c and c is not None else 0
                    for u, c in zip(counts["user_id"], counts["event_count"])}
        online = OnlineObserver(store, users, interval=ONLINE_POLL_S)
        live = LiveReplay(cfg, later, fresh.rate, probes)
        threads += [online, live]
        observer.phase = "load"
        online.start()
        live.start()
        click.echo(f"bench freshness: live replay at {fresh.rate:g} events/s: {probes:,} probe events from "
                   f"{len(users)} users over {fresh.live_seconds} s, then unmeasured traffic while waiting")
        _send_probes(live, probes, observer, processes)
        probe_seconds = live.last_probe_at - live.started_at
        click.echo(f"bench freshness: probes sent; waiting up to {fresh.wait_seconds} s for versions that cover them")
        _wait_for_versions(cfg, fresh.wait_seconds, live, online, baseline, observer, processes)
        waited = time.monotonic() - live.last_probe_at
        _stop(threads)
        positions = _probe_positions(cfg, set(live.sent_at))
    finally:
        _stop(threads)
        for process in processes:
            process.stop()
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)

    feature_delays = _delays(live.user_sends, online.seen, baseline)
    reached = coverage_delays(positions, live.sent_at, observer.versions)
    trained = coverage_delays(positions, live.sent_at, observer.samples)
    checkpoints = {s["checkpoint"] for s in observer.samples if s["phase"] == "load"} - {
        s["checkpoint"] for s in observer.samples if s["phase"] == "alone"}
    beside = throughput(observer.samples, "load")
    ratio = (round(beside["tokens_per_s"] / alone["tokens_per_s"], 3)
             if beside["tokens_per_s"] and alone["tokens_per_s"] else None)
    version_figures = percentiles(list(reached.values()))
    outcomes = fresh_outcomes(observer.versions)
    probe_outcomes = {e: outcomes[e] for e in live.sent_at if e in outcomes} if outcomes is not None else {}
    trained_version = {e: observer.versions[index]["seen_at"] - live.sent_at[e]
                       for e, (outcome, index) in probe_outcomes.items() if outcome == "trained"}
    by_outcome = {o: sum(1 for outcome, _ in probe_outcomes.values() if outcome == o) if outcomes is not None else None
                  for o in FRESH_OUTCOMES}
    reached_in = first_covering(positions, observer.versions)
    live_start = live.started_at
    report: dict[str, Any] = {
        "benchmark": "freshness",
        "command": fresh.command(),
        "broker": cfg.kafka.broker,
        "machine": machine(),
        "settings": {**dataclasses.asdict(fresh), "trainer": cfg.trainer.model_dump(),
                     "online_poll_s": ONLINE_POLL_S, "model_dir_poll_s": TRAINER_POLL_S},
        "seconds_total": round(time.monotonic() - started, 1),
        "live": {"probes": len(live.sent_at), "probe_users": len(users),
                 "achieved_rate": round(len(live.sent_at) / probe_seconds, 2) if probe_seconds > 0 else None,
                 "events_sent": live.sent, "waited_after_last_probe_s": round(waited, 1)},
        "to_online_feature": {**percentiles(feature_delays), "probes_seen": len(feature_delays),
                              "probes_not_seen": len(live.sent_at) - len(feature_delays)},
        "to_servable_version": {**version_figures, "probes_reached": len(reached),
                                "probes_not_reached": len(live.sent_at) - len(reached),
                                "probes_not_in_training_log": len(live.sent_at) - len(positions),
                                **{f"delay_to_trained_version_{k}": v
                                   for k, v in percentiles(list(trained_version.values())).items()},
                                **{f"probes_{o}": n for o, n in by_outcome.items()},
                                "probes_not_taken": len(live.sent_at) - len(probe_outcomes)
                                if outcomes is not None else None},
        "fresh_examples_record": fresh_record(observer.versions, outcomes),
        "to_taken_for_training": {**percentiles(list(trained.values())), "probes_taken": len(trained),
                                  "resolution_s": REPORT_EVERY_S},
        "checkpoints_while_load_offered": len(checkpoints),
        # Checkpoints the export refused over the whole run, by the gate that refused them (the
        # trainer's last status seen).
        "export_refusals": observer.samples[-1].get("export_refusals") if observer.samples else None,
        "versions": [{k: v for k, v in version.items() if k not in ("offsets", "seen_at", "fresh")}
                     | {"seen_after_live_start_s": round(version["seen_at"] - live_start, 1),
                        "probes_reached_first": sum(index == seen for index in reached_in.values()),
                        "probes_trained_first": sum(index == seen for outcome, index in probe_outcomes.values()
                                                    if outcome == "trained"),
                        "fresh_examples": None if version["fresh"] is None else {
                            "since_version": version["fresh"].get("since_version"),
                            "ledger": version["fresh"]["ledger"],
                            **{o: len(version["fresh"]["event_ids"].get(o, [])) for o in FRESH_OUTCOMES}}}
                     for seen, version in enumerate(observer.versions)],
        "trainer_throughput": {"alone": alone, "beside_live_pipeline": beside, "ratio": ratio},
        "trainer_time_while_load_offered": time_shares(observer.samples, "load"),
        "target": {"to_servable_version_s": f"<= {TARGET_VERSION_DELAY_S:.0f}",
                   "met": len(reached) == len(live.sent_at) > 0
                   and max(reached.values()) <= TARGET_VERSION_DELAY_S,
                   # the same bound on (b''): every probe the trainer kept is in a version that trained on it
                   "met_by_trained_version": None if outcomes is None else
                   len(probe_outcomes) == len(live.sent_at) and len(trained_version) > 0
                   and max(trained_version.values()) <= TARGET_VERSION_DELAY_S},
    }
    path = write_result("freshness", report, output)
    if output is None:  # docs/benchmarks.md shows the default result file, not ad-hoc runs
        update_benchmarks_table("freshness", readme_table(report))
    click.echo(f"bench freshness: to online feature p50 {report['to_online_feature']['p50_s']} s, "
               f"p99 {report['to_online_feature']['p99_s']} s; to servable version p50 {version_figures['p50_s']} s, "
               f"p99 {version_figures['p99_s']} s, max {version_figures['max_s']} s "
               f"({report['to_servable_version']['probes_not_reached']} probes not reached); to the first version "
               f"that trained on it p50 {report['to_servable_version']['delay_to_trained_version_p50_s']} s, "
               f"p99 {report['to_servable_version']['delay_to_trained_version_p99_s']} s "
               f"({report['to_servable_version']['probes_dropped_by_reward']} probes dropped by reward sampling); "
               f"trainer tokens/s ratio beside/alone {ratio}")
    click.echo(f"bench freshness: wrote {path}")
    return report


def _figures(delays: dict[str, Any], prefix: str = "") -> str:
    if delays[f"{prefix}p50_s"] is None:
        return "none reached"
    return f"{delays[prefix + 'p50_s']} / {delays[prefix + 'p99_s']} / {delays[prefix + 'max_s']}"


def _untrained(b: dict[str, Any]) -> str:
    if b["probes_trained"] is None:
        return "not recorded by this trainer"
    return f"{b['probes_dropped_by_reward']:,} / {b['probes_without_sid']:,} / {b['probes_not_taken']:,}"


def _shares(time: dict[str, Any]) -> str:
    if time.get("wall_s") is None:
        return "not observed"
    return " / ".join(f"{time[key + '_share']:.0%}" for key in ("training", "evaluating", "boundaries")) + \
        f" of {time['wall_s']:.0f} s"


def _refusals(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "not recorded"
    return ", ".join(f"{gate} {n}" for gate, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def readme_table(report: dict[str, Any]) -> str:
    a, b, tt = report["to_online_feature"], report["to_servable_version"], report["to_taken_for_training"]
    t, live = report["trainer_throughput"], report["live"]
    s = report["settings"]
    return (
        "| figure | value |\n|---|---|\n"
        f"| probes: live MovieLens-100K events ({s['order']} order) at {s['rate']:g} events/s for "
        f"{s['live_seconds']} s | "
        f"{live['probes']:,} from {live['probe_users']} users |\n"
        f"| (a) send to online feature p50 / p99 / max (s) | {_figures(a)} |\n"
        f"| (b) send to first servable version whose watermark includes it, p50 / p99 / max (s) | "
        f"{_figures(b)} |\n"
        f"| of which send to taken for training (b'), p50 / p99 / max (s) | {_figures(tt)} |\n"
        f"| (b'') send to first servable version that trained on it (kept by reward sampling), p50 / p99 / max (s) | "
        f"{_figures(b, 'delay_to_trained_version_') if b['probes_trained'] is not None else 'not recorded'} |\n"
        f"| probes never trained as fresh examples: dropped by reward sampling / no SID / not taken | "
        f"{_untrained(b)} |\n"
        f"| probes in no version after waiting {live['waited_after_last_probe_s']:.0f} s past the last | "
        f"{b['probes_not_reached']:,} |\n"
        f"| servable versions exported / checkpoints while load was offered | {len(report['versions'])} / "
        f"{report['checkpoints_while_load_offered']} |\n"
        f"| checkpoints not exported, by gate (whole run) | {_refusals(report.get('export_refusals'))} |\n"
        f"| trainer tokens/s alone / beside the live pipeline (ratio) | {t['alone']['tokens_per_s']} / "
        f"{t['beside_live_pipeline']['tokens_per_s']} ({t['ratio']}) |\n"
        f"| trainer's wall clock while load was offered: optimizer steps / evaluations / whole boundaries | "
        f"{_shares(report['trainer_time_while_load_offered'])} |\n"
        f"| target: (b) at most {TARGET_VERSION_DELAY_S:.0f} s for every probe | "
        f"{'met' if report['target']['met'] else 'NOT met'} |\n"
        f"\nMeasured {report['machine']['measured_at']} on {report['machine']['cpus']} CPUs, embedded broker "
        f"{report.get('broker', 'tansu')} (commit "
        f"{report['machine']['commit']}) with `{report['command']}`; every version and setting in "
        "ops/bench/results/freshness.json.\n"
    )
