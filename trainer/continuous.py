"""`plum train --continuous`: the trainer that never stops (DESIGN.md, trainer/).

Warm-started from a CPT checkpoint (or resumed from its own newest checkpoint), it follows the
training log (trainer/stream.py) and trains reward-sampled SFT batches that mix fresh and
historical examples:

- A row is a window of a user's history ending at one event, with loss on the SIDs of the items
  kept by reward sampling (keep-probability reward / the largest reward read), as in one-shot
  SFT. `fresh_share` of the rows end at a fresh event (taken from the released queue exactly
  once, oldest first); the others end at an event drawn uniformly from the history pool.
- Prequential evaluation: events read since the last checkpoint are held out. At each checkpoint
  boundary the model is evaluated on the newest of them (one per user: history before it ->
  constrained beam search of `beam_width` -> Recall/NDCG@10, invalid-SID rate), and so are the
  served version (with the beam width its manifest records) and recent popularity on the same
  slice; only then are they released for training. The eval slice is therefore always events
  after the training watermark.
- Checkpoints: orbax CheckpointManager (asynchronous, keep N, atomic), holding the model and
  optimizer state together with the stream's data state (files read, queues, ledger, RNG).
- Export: when the gates pass (enough held-out events, invalid-SID rate 0, Recall@10 above recent
  popularity's on the same slice, Recall@10 and NDCG@10 not worse than the served version's on the
  same slice by more than `export_margin`), the model becomes the next servable version with a
  snapshot of the catalogue (trainer/servable.py); its manifest records the beam width it was
  judged with, which serving then runs.
  The catalogue is re-read from the SID table at every boundary, so items the tokenizer assigns
  SIDs to become retrievable in the next export. A refused export logs its reason.
- With no fresh example waiting, the loop trains history-only batches for `idle_after_steps`
  steps and then waits for the log.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tokenizer.sid_table import load_table, versions
from trainer.checkpoint import CheckpointError, decoder_config_from_json, decoder_config_json, load_model
from trainer.config import TrainerSettings
from trainer.data import history_tokens, pack_batch, target_weights
from trainer.evaluate import (
    POPULARITY_WINDOW, EvalSet, popularity_baseline, popularity_floor, quality_gate, target_ranks,
)
from trainer.metrics import TrainerMetrics
from trainer.model import Decoder
from trainer.retrieval import Recommender, RetrievalSettings, evaluate
from trainer.servable import ItemCatalogue, export_version, load_version, recorded_beam_width, served_version
from trainer.stream import LoggedEvent, Stream
from trainer.train import OptimConfig, TrainLoop
from trainer.resize import resize_state, token_sources
from trainer.vocab import FeatureSpec, VocabLayout, suffix_capacity

Say = Callable[[str], None]
STATUS = "status.json"


class ContinuousError(Exception):
    """The continuous trainer cannot start (no CPT checkpoint, no SID table, an unreadable checkpoint)."""


@dataclass(frozen=True)
class ContinuousPaths:
    """Where the loop reads (training log, SID tables, CPT checkpoints) and writes (its own
    checkpoints and status under work_dir, servable versions under model_dir)."""

    log_dir: Path
    sid_dir: Path
    work_dir: Path
    model_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def status(self) -> Path:
        return self.work_dir / STATUS


@dataclass(frozen=True)
class HeldOut:
    """Held-out events in item ids: per event its event id, the history before it (capped), its
    rewards, every earlier item (excluded from the ranking) and the target."""

    event_ids: tuple[str, ...]
    histories: tuple[tuple[str, ...], ...]
    rewards: tuple[tuple[float, ...], ...]
    seen: tuple[tuple[str, ...], ...]
    targets: tuple[str, ...]
    contexts: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.targets)


def held_out_of(targets: Sequence[tuple[LoggedEvent, Sequence[LoggedEvent]]], max_history: int) -> HeldOut:
    """Held-out events from (target event, the user's events before it) pairs, in the given order."""
    rows = [(event.event_id, tuple(e.item_id for e in before[-max_history:]),
             tuple(e.reward for e in before[-max_history:]), tuple(e.item_id for e in before), event.item_id,
             event.context) for event, before in targets]
    return HeldOut(*(tuple(col) for col in zip(*rows))) if rows else HeldOut((), (), (), (), (), ())


def popularity_on(held: HeldOut, events: Iterable[LoggedEvent], window: int = POPULARITY_WINDOW) -> dict[str, Any]:
    """Recent popularity (trainer.evaluate.popularity_baseline) on the held-out events: it counts the
    items of the `window` newest events that are not themselves held-out targets."""
    targets = set(held.event_ids)
    recent = heapq.nlargest(window, (e for e in events if e.event_id not in targets), key=lambda e: e.order)
    return popularity_baseline([e.item_id for e in reversed(recent)], held.seen, held.targets)


def evaluate_held_out(model: Decoder, layout: VocabLayout, items: ItemCatalogue, held: HeldOut, max_history: int,
                      beam_width: int, batch: int = 64) -> dict[str, float]:
    """Recall/NDCG@5/10, effective vocabulary and invalid-SID rate of constrained beam search of
    `beam_width` (recorded with them) on held-out events, in the model's own catalogue (a target it
    cannot name counts as a miss)."""
    histories, rewards, seen = [], [], []
    for hist, rew, before in zip(held.histories, held.rewards, held.seen):
        pairs = [(items.index[i], r) for i, r in zip(hist, rew) if i in items.index]
        histories.append(np.array([p[0] for p in pairs], np.int32))
        rewards.append([p[1] for p in pairs])
        seen.append(np.array([items.index[i] for i in before if i in items.index], np.int32))
    unknown = len(items.item_ids)  # an index no ranking contains: a target the catalogue cannot name
    targets = np.array([items.index.get(t, unknown) for t in held.targets], np.int32)
    eval_set = EvalSet(np.arange(len(held)), tuple(histories), targets, tuple(seen))
    recommender = Recommender(model, layout, items.catalogue, max_history)
    metrics, ranked = evaluate(recommender, eval_set, rewards, beam_width, min(batch, max(len(held), 1)),
                               contexts=held.contexts)
    metrics["examples"] = len(held)
    metrics["beam_width"] = beam_width
    # Per-user target ranks (held-out order, -1: not in the top 10): gates compare two models user by user.
    metrics["target_ranks"] = target_ranks(ranked, targets).tolist()
    return metrics


# The gates that can refuse an export: export_gate's, then the trainer's own (a vocabulary change at the
# boundary, nothing trained since the last export). `export_refusals` counts refusals under these names.
EXPORT_GATES = ("min_eval_examples", "invalid_sid", "popularity_floor", "served_version", "vocabulary_change",
                "unchanged")


class Verdict(NamedTuple):
    """An export decision: whether it passed, why, and the refusing gate (one of EXPORT_GATES; "" if passed)."""
    passed: bool
    reason: str
    gate: str = ""


def export_gate(candidate: dict[str, Any], served: dict[str, Any] | None, served_number: int | None,
                min_examples: int, margin: float, confidence: float = 0.95, *,
                popularity: dict[str, Any], popularity_floor_on: bool = True) -> Verdict:
    """Whether a checkpoint may become a servable version, why, and which gate refused it (a pure
    function of the figures).
    The popularity floor (trainer.evaluate.popularity_floor: `popularity` holds recent popularity's
    figures on the same held-out users) applies also with no served version; with
    `popularity_floor_on` false it is only reported, as not applied.
    Against the served version it is refused only when it trails on Recall@10 or NDCG@10 by more than
    `margin` at `confidence` over the same held-out users (trainer.evaluate.quality_gate)."""
    if candidate.get("examples", 0) < min_examples:
        return Verdict(False, f"only {candidate.get('examples', 0)} held-out events (< min_eval_examples {min_examples})",
                       "min_eval_examples")
    if candidate["invalid_sid_rate"] > 0:
        return Verdict(False, f"invalid-SID rate {candidate['invalid_sid_rate']:.4f} (must be 0)", "invalid_sid")
    beats, detail = popularity_floor(candidate, popularity)
    if not popularity_floor_on:
        floor = f"; popularity floor not applied (trainer.continuous.popularity_floor false): {detail}"
    elif not beats:
        return Verdict(False, f"popularity_floor: {detail}", "popularity_floor")
    else:
        floor = f"; {detail}"
    if served is None:
        return Verdict(True, "no served version yet" + floor)
    failing, compared = quality_gate(candidate, served, margin, confidence)
    if failing is not None:
        metric = failing.metric
        return Verdict(False, f"{metric} {candidate[metric]:.4f} trails served version {served_number}'s "
                              f"{served[metric]:.4f} by more than the margin {margin:g} ({failing.describe()})",
                       "served_version")
    recall = compared[0]
    return Verdict(True, f"recall@10 {candidate['recall@10']:.4f} vs served version {served_number}'s "
                         f"{served['recall@10']:.4f}: not worse by more than the margin {margin:g} "
                         f"({recall.describe()})" + floor)


class ContinuousTrainer:
    """The loop's state and its steps; `run` drives it until stopped."""

    def __init__(self, settings: TrainerSettings, paths: ContinuousPaths, cpt_dir: Path | None,
                 say: Say = print, metrics: TrainerMetrics | None = None,
                 feature_source: Callable[[], Sequence[FeatureSpec]] | None = None) -> None:
        self.settings, self.paths, self.say, self.metrics = settings, paths, say, metrics
        self.feature_source = feature_source
        self.cfg = settings.continuous
        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints, create=True,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(paths.checkpoints.resolve(), options=options)
        self.rng = np.random.default_rng(settings.seed)
        self.steps_since_fresh = 0
        self._held_since: float | None = None  # when the oldest held-out event was read
        self.exports: list[dict[str, Any]] = []
        self.export_refusals: dict[str, int] = {}  # gate (EXPORT_GATES) -> checkpoints it refused
        self.last_eval: dict[str, Any] = {}
        # Wall-clock seconds by activity since this process started (status + metrics): what the
        # evaluations at checkpoint boundaries cost against training.
        self.seconds = {"training": 0.0, "evaluating": 0.0, "boundaries": 0.0}
        self.last_checkpoint: dict[str, Any] = {}
        self.loss = float("nan")
        self.tokens_per_s = 0.0
        self.state = "starting"
        self._served_cache: tuple[int, Decoder, dict[str, Any], ItemCatalogue] | None = None
        latest = self.manager.latest_step()
        if latest is not None:
            self._resume(latest)
        else:
            self._bootstrap(cpt_dir)
        self.items = self._load_items()

    # Start ----------------------------------------------------------------------------------------
    def _optim(self) -> OptimConfig:
        return OptimConfig(self.cfg.learning_rate, self.settings.warmup_steps, total_steps=1, decay=False)

    def _bootstrap(self, cpt_dir: Path | None) -> None:
        if cpt_dir is None:
            raise ContinuousError("No CPT checkpoint to start from; run `plum train cpt` first.")
        try:
            model, manifest = load_model(cpt_dir)
        except CheckpointError as exc:
            raise ContinuousError(str(exc)) from None
        self.origin = {"model_config": decoder_config_json(model.cfg), "vocabulary": manifest["vocabulary"],
                       "sid_version": manifest["sid_version"], "prompt_schema": manifest["prompt_schema"],
                       "cpt_checkpoint": str(cpt_dir)}
        self.layout = VocabLayout.from_json(manifest["vocabulary"])
        self.loop = TrainLoop(model, self._optim(), sid_levels=self.layout.sid_levels)
        self.stream = Stream(self.paths.log_dir, manifest.get("data_watermark"))
        self.say(f"train continuous: starting from CPT checkpoint {cpt_dir} (SID version {self.origin['sid_version']}); "
                 f"events it covers are history, later ones fresh")

    def _resume(self, step: int) -> None:
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        self.origin = data["origin"]
        self.layout = VocabLayout.from_json(self.origin["vocabulary"])
        cfg = decoder_config_from_json(self.origin["model_config"])
        self.loop = TrainLoop(Decoder(cfg, nnx.Rngs(0)), self._optim(), sid_levels=self.layout.sid_levels)
        abstract = self.loop.state_dict()
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        self.loop.load_state_dict(restored["state"])
        self.loop.step_count = int(data["step"])
        self.stream = Stream.restore(self.paths.log_dir, data["stream"])
        self.rng.bit_generator.state = data["rng"]
        self.steps_since_fresh = int(data.get("steps_since_fresh", 0))
        self.exports, self.last_eval = data.get("exports", []), data.get("last_eval", {})
        self.export_refusals = dict(data.get("export_refusals", {}))
        self.last_checkpoint = {"step": step, "path": str(self.paths.checkpoints / str(step))}
        ledger = self.stream.ledger
        self.say(f"train continuous: resumed from checkpoint step {step}: {len(self.stream.files):,} log files read, "
                 f"{ledger.taken:,} fresh examples taken, {len(self.stream.pending):,} held out, "
                 f"{len(self.stream.released):,} waiting")

    def _load_items(self) -> ItemCatalogue:
        table = load_table(self.paths.sid_dir, int(self.origin["sid_version"]))
        if tuple(table.codebook_sizes) != self.layout.codebook_sizes:
            raise ContinuousError(f"SID version {table.version}'s codebooks {table.codebook_sizes} do not match the "
                                  f"model's vocabulary {self.layout.codebook_sizes}.")
        items = ItemCatalogue.from_table(self.layout, table)
        if items.unfit:
            self.say(f"train continuous: {items.unfit} items of SID version {table.version} have a collision suffix "
                     f"beyond the vocabulary's {self.layout.suffix_size}; they cannot be recommended")
        return items

    # Batches --------------------------------------------------------------------------------------
    @property
    def max_history(self) -> int:
        return int(self.origin["prompt_schema"].get("max_history", self.settings.max_history))

    def _window(self, event: LoggedEvent, top: float, keep_last: bool | None = None
                ) -> tuple[list[int], list[float]] | None:
        """The window ending at `event`: its tokens and target weights, or None when nothing is kept."""
        earlier = [e for e in self.stream.before(event) if e.item_id in self.items.index]
        window = [*earlier[-self.max_history:], event]
        keep = self.rng.random(len(window)) < np.array([e.reward for e in window]) / top
        if len(earlier) > self.max_history:
            keep[0] = False  # its real history lies before the window
        if keep_last is not None:
            keep[-1] = keep_last
        if not keep.any():
            return None
        items = [self.items.index[e.item_id] for e in window]
        tokens = history_tokens(self.layout, self.items.catalogue, items, [e.reward for e in window], event.context)
        return tokens, target_weights(self.layout, len(items), keep.tolist())

    def next_batch(self) -> tuple[dict[str, np.ndarray] | None, int]:
        """A batch of fresh and historical rows (None when there is nothing to train), and its fresh rows."""
        size, top = self.settings.batch_size, max(self.stream.reward_max, 1e-6)
        rows: list[tuple[list[int], list[float]]] = []
        # Catch-up: with more than a batch of fresh examples waiting, batches are all fresh, so a
        # stream faster than the configured mix can train does not build an ever-growing backlog.
        want = size if len(self.stream.released) > size else round(size * self.cfg.fresh_share)
        while len(rows) < want and self.stream.released:
            event = self.stream.events[self.stream.take_fresh()]
            if event.item_id not in self.items.index:
                self.stream.ledger.take(event.event_id, "without_sid")
                continue
            kept = bool(self.rng.random() < event.reward / top)
            row = self._window(event, top, keep_last=kept) if kept else None
            self.stream.ledger.take(event.event_id, "trained" if row is not None else "dropped_by_reward")
            if row is not None:
                rows.append(row)
        fresh = len(rows)
        if fresh == 0 and self.steps_since_fresh >= self.cfg.idle_after_steps:
            return None, 0
        attempts = 0
        while len(rows) < size and attempts < 4 * size:
            drawn = self.stream.sample_pool(self.rng, 1)
            attempts += 1
            if drawn and drawn[0].item_id in self.items.index:
                row = self._window(drawn[0], top)
                if row is not None:
                    rows.append(row)
        if not rows:
            return None, 0
        buckets = RetrievalSettings(max_history=self.max_history).buckets(self.layout)
        return pack_batch(rows, buckets, size), fresh

    # Evaluation, checkpoints, export --------------------------------------------------------------
    def held_users(self) -> int:
        """Distinct users among the held-out events (an evaluation takes one event per user)."""
        return len({self.stream.events[e].user_id for e in self.stream.pending})

    def held_out(self) -> HeldOut:
        """The newest pending event of each user, newest first, at most eval_examples of them."""
        newest: dict[str, LoggedEvent] = {}
        for event_id in self.stream.pending:
            event = self.stream.events[event_id]
            if event.user_id not in newest or newest[event.user_id].order < event.order:
                newest[event.user_id] = event
        chosen = sorted(newest.values(), key=lambda e: e.order, reverse=True)[:self.cfg.eval_examples]
        return held_out_of([(event, self.stream.before(event)) for event in chosen], self.max_history)

    def _served(self) -> tuple[int, Decoder, dict[str, Any], ItemCatalogue] | None:
        number = served_version(self.paths.model_dir)
        if number is None:
            return None
        if self._served_cache is None or self._served_cache[0] != number:
            model, manifest, item_ids, sids = load_version(self.paths.model_dir, number)
            layout = VocabLayout.from_json(manifest["vocabulary"])
            self._served_cache = (number, model, manifest, ItemCatalogue.build(layout, item_ids, sids))
        return self._served_cache

    def _evaluate(self, held: HeldOut) -> dict[str, Any]:
        report: dict[str, Any] = {"examples": len(held)}
        if len(held) == 0:
            return report
        report["model"] = evaluate_held_out(self.loop.model(), self.layout, self.items, held, self.max_history,
                                            self.cfg.beam_width)
        report["popularity"] = popularity_on(held, self.stream.events.values())
        served = self._served()
        if served is not None:
            number, model, manifest, items = served
            layout = VocabLayout.from_json(manifest["vocabulary"])
            history = int(manifest["prompt_schema"].get("max_history", self.max_history))
            # The served version is judged with the search it serves with (its manifest's beam width).
            width = recorded_beam_width(manifest) or self.cfg.beam_width
            report["served"] = evaluate_held_out(model, layout, items, held, history, width)
            report["served_version"] = number
        return report

    def boundary(self, force_eval: bool = False) -> None:
        """Checkpoint; when the held-out slice is big enough (or has waited `checkpoint_every_s`),
        evaluate on it first, release it for training, and export if the gates pass."""
        started = time.monotonic()
        self.items = self._load_items()  # re-tokenized items join the catalogue here
        held = self.held_out()
        waited = time.monotonic() - self._held_since if self._held_since is not None else 0.0
        if not (force_eval or len(held) >= self.cfg.min_eval_examples or waited >= self.cfg.checkpoint_every_s):
            # Too few held-out users to judge a model: keep holding them out, checkpoint only.
            self._save(self.loop.step_count)
            self.seconds["boundaries"] += time.monotonic() - started
            self.write_status()
            return
        evaluating = time.monotonic()
        report = self._evaluate(held)
        report["evaluation_s"] = round(time.monotonic() - evaluating, 3)
        self.seconds["evaluating"] += report["evaluation_s"]
        self.stream.release()
        self._held_since = None
        step = self.loop.step_count
        report.update(step=step, at=_now(), loss=self.loss)
        if "model" in report:
            self.last_eval = report  # the status keeps the newest evaluated checkpoint's figures
        changed = self._adopt_vocabulary_changes()
        self._save(step)
        if "model" in report:
            verdict = export_gate(report["model"], report.get("served"), report.get("served_version"),
                                  self.cfg.min_eval_examples, self.cfg.export_margin, self.cfg.export_confidence,
                                  popularity=report["popularity"], popularity_floor_on=self.cfg.popularity_floor)
            figures = report["model"]
            self.say(f"train continuous: checkpoint {step}: held-out {len(held)} events recall@10 "
                     f"{figures['recall@10']:.4f} ndcg@10 {figures['ndcg@10']:.4f} invalid-SID rate "
                     f"{figures['invalid_sid_rate']:.4f} (recent popularity recall@10 "
                     f"{report['popularity']['recall@10']:.4f})")
            last = self.exports[-1]["step"] if self.exports else None
            if verdict.passed and changed:
                verdict = Verdict(False, f"{changed}; the next checkpoint is evaluated in the new vocabulary",
                                  "vocabulary_change")
            if verdict.passed and (step == 0 or step == last):
                verdict = Verdict(False, "nothing trained since the CPT checkpoint" if step == 0
                                  else f"unchanged since version {self.exports[-1]['version']}", "unchanged")
            if verdict.passed:
                self._export(step, report, verdict.reason)
            else:
                self.say(f"train continuous: not exported: {verdict.reason}")
                report["export_refused"] = verdict.reason
                self.export_refusals[verdict.gate] = self.export_refusals.get(verdict.gate, 0) + 1
        else:
            self.say(f"train continuous: checkpoint {step} (no held-out events to evaluate; nothing exported)")
        report["boundary_s"] = round(time.monotonic() - started, 3)
        self.seconds["boundaries"] += report["boundary_s"]
        self.write_status()

    def _adopt_vocabulary_changes(self) -> str:
        """At a boundary: migrate to a newer SID version, append newly registered context features.
        Returns what changed ("" when nothing did)."""
        changes = []
        newest = versions(self.paths.sid_dir)
        if self.cfg.migrate_sid_versions and newest and newest[-1] > int(self.origin["sid_version"]):
            old = load_table(self.paths.sid_dir, int(self.origin["sid_version"]))
            new = load_table(self.paths.sid_dir, newest[-1])
            layout = VocabLayout(tuple(new.codebook_sizes), suffix_capacity(new.suffix_size),
                                 self.layout.reward_buckets, self.layout.features, self.layout.text_ids)
            sources = token_sources(self.layout, layout, {i: old.sid(i) for i in old.codes},
                                    {i: new.sid(i) for i in new.codes})
            self._resize(layout, sources, sid_version=new.version)
            changes.append(f"migrated from SID version {old.version} to {new.version}: new SID rows start from the "
                           f"mean of the old rows of the items that share each new code; optimizer moments of "
                           f"changed rows reset")
        known = {spec.name for spec in self.layout.features}
        added = [spec for spec in (self.feature_source() if self.feature_source else []) if spec.name not in known]
        if added:
            layout = self.layout.with_features(added)
            self._resize(layout, token_sources(self.layout, layout))
            changes.append(f"context features {', '.join(s.name for s in added)} joined the prompt "
                           f"({layout.size - sum(s.size for s in added):,} rows kept, "
                           f"{sum(s.size for s in added)} added)")
        for change in changes:
            self.say(f"train continuous: step {self.loop.step_count}: {change}")
        return "; ".join(changes)

    def _resize(self, layout: VocabLayout, sources: list[list[int]], sid_version: int | None = None) -> None:
        """Rebuild model and optimizer state for a new vocabulary layout (trainer/resize.py)."""
        state = resize_state(self.loop.state_dict(), self.layout.size, sources, seed=self.loop.step_count)
        cfg = decoder_config_from_json(self.origin["model_config"]).replace(vocab_size=layout.size)
        step = self.loop.step_count
        self.loop = TrainLoop(Decoder(cfg, nnx.Rngs(0)), self._optim(), sid_levels=layout.sid_levels)
        self.loop.load_state_dict(state)
        self.loop.step_count = step
        self.layout = layout
        schema = {**self.origin["prompt_schema"], "features": layout.to_json()["features"]}
        self.origin = {**self.origin, "model_config": decoder_config_json(cfg), "vocabulary": layout.to_json(),
                       "prompt_schema": schema,
                       "sid_version": sid_version if sid_version is not None else self.origin["sid_version"]}
        self.items = self._load_items()
        self._served_cache = None if sid_version is not None else self._served_cache

    def _data_state(self, step: int) -> dict[str, Any]:
        return {"origin": self.origin, "step": step, "stream": self.stream.state(),
                "rng": self.rng.bit_generator.state, "steps_since_fresh": self.steps_since_fresh,
                "exports": self.exports[-20:], "last_eval": self.last_eval,
                "export_refusals": self.export_refusals}

    def _save(self, step: int) -> None:
        if self.manager.latest_step() == step:
            return  # nothing trained since the last checkpoint
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.loop.state_dict()),
                                                         data=ocp.args.JsonSave(_jsonable(self._data_state(step)))))
        self.last_checkpoint = {"step": step, "path": str(self.paths.checkpoints / str(step)), "at": _now()}

    def _export(self, step: int, report: dict[str, Any], reason: str) -> None:
        manifest = {key: self.origin[key] for key in ("vocabulary", "sid_version", "prompt_schema")}
        watermark = self.stream.watermark()
        manifest.update(stage="continuous", data_watermark=watermark, train_loss=self.loss,
                        eval={"protocol": "newest held-out events after the training watermark, one per user",
                              **report["model"], "popularity": report["popularity"],
                              "served_version": report.get("served_version"), "served": report.get("served")},
                        search={"beam_width": self.cfg.beam_width},
                        parent_checkpoint=str(self.paths.checkpoints / str(step)),
                        cpt_checkpoint=self.origin["cpt_checkpoint"], gate=reason, step=step)
        ledger = self.stream.ledger
        manifest["fresh_examples"] = {"since_version": self.exports[-1]["version"] if self.exports else None,
                                      "ledger": ledger.counts(), "event_ids": ledger.since_export}
        self.manager.wait_until_finished()  # a version is committed only after its checkpoint is final
        manifest["export_started_ns"] = time.time_ns()  # after the parent checkpoint's commit time
        path = export_version(self.paths.model_dir, self.loop.model(), manifest, self.items.item_ids, self.items.sids)
        ledger.since_export = {}
        self.exports.append({"version": int(path.name), "step": step, "at": _now(), "watermark": watermark,
                             "recall@10": report["model"]["recall@10"], "gate": reason})
        self.say(f"train continuous: exported version {path.name} ({reason})")

    # Status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ledger = self.stream.ledger
        return {"state": self.state, "step": self.loop.step_count, "loss": self.loss,
                "tokens_per_s": round(self.tokens_per_s, 1), "sid_version": self.origin["sid_version"],
                "catalogue_items": len(self.items.item_ids), "log_files_read": len(self.stream.files),
                "events_read": len(self.stream.events), "held_out": len(self.stream.pending),
                "waiting": len(self.stream.released),
                "fresh": ledger.counts(),
                "watermark": self.stream.watermark(), "last_checkpoint": self.last_checkpoint,
                "last_eval": self.last_eval, "exports": self.exports[-5:], "export_refusals": self.export_refusals,
                "seconds": {key: round(value, 3) for key, value in self.seconds.items()}, "updated_at": _now()}

    def write_status(self) -> None:
        """The status file (written whole, then renamed) and the Prometheus gauges."""
        status = _jsonable(self.status())
        path = self.paths.status
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=2))
        os.replace(tmp, path)
        if self.metrics is not None:
            self.metrics.update(status)

    def poll(self) -> int:
        """Read new log files; start the held-out clock when the first held-out event arrives."""
        read = self.stream.poll()
        if self.stream.pending and self._held_since is None:
            self._held_since = time.monotonic()
        return read

    # The loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, max_steps: int | None = None,
            until_drained: bool = False) -> None:
        """Train until `stop` is set, `max_steps` steps have run, or (until_drained) the log has
        nothing new, every fresh example is taken and the loop has gone idle."""
        stop = stop or threading.Event()
        cfg = self.cfg
        last_poll = last_report = last_boundary = time.monotonic()
        steps_at_boundary, tokens = self.loop.step_count, 0
        self.poll()
        self.state = "training"
        while not stop.is_set() and (max_steps is None or self.loop.step_count < max_steps):
            now = time.monotonic()
            if now - last_poll >= cfg.poll_interval_s:
                self.poll()
                last_poll = now
            trained = self.loop.step_count - steps_at_boundary
            due = (trained >= cfg.checkpoint_every_steps
                   or (now - last_boundary >= cfg.checkpoint_every_s and (trained or self.stream.pending))
                   or (not self.stream.released and len(self.stream.pending) >= cfg.min_eval_examples
                       and self.held_users() >= cfg.min_eval_examples))
            if due:
                self.boundary()
                last_boundary, steps_at_boundary = time.monotonic(), self.loop.step_count
            batch, fresh = self.next_batch()
            if batch is None:
                if until_drained and not self.stream.pending and not self.stream.released \
                        and self.poll() == 0:
                    break
                if self.state != "idle":
                    self.state = "idle"
                    self.write_status()  # idle is visible at once, not only at the next boundary
                stop.wait(min(cfg.poll_interval_s, max(0.05, cfg.checkpoint_every_s - (now - last_boundary))))
                continue
            self.state = "training"
            self.steps_since_fresh = 0 if fresh else self.steps_since_fresh + 1
            tokens += int(batch["mask"].sum())
            stepping = time.monotonic()
            self.loss = self.loop.step(batch)["loss"]
            self.seconds["training"] += time.monotonic() - stepping
            if time.monotonic() - last_report >= cfg.report_every_s:
                elapsed = time.monotonic() - last_report
                self.tokens_per_s = tokens / elapsed
                self.say(f"train continuous: step {self.loop.step_count} loss {self.loss:.4f} "
                         f"{self.tokens_per_s:,.0f} tokens/s, fresh taken {self.stream.ledger.taken:,}, "
                         f"waiting {len(self.stream.released):,}, held out {len(self.stream.pending):,}")
                last_report, tokens = time.monotonic(), 0
                self.write_status()
        self.state = "stopping"
        if self.loop.step_count != self.manager.latest_step() or self.stream.pending:
            self.boundary(force_eval=True)
        self.manager.wait_until_finished()
        self.state = "stopped"
        self.write_status()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN (no loss yet) becomes None, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
