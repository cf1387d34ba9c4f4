"""The continuous trainer against real parts: a training log written by the pipeline's writer, a
SID table, an orbax CPT checkpoint, orbax CheckpointManager checkpoints and real `plum train
--continuous` processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.stream_world import (
    CLUSTERS, LogWriter, catalogue_items, user_events, write_cpt_checkpoint, write_sid_table,
)
from tokenizer.sid_table import load_table, new_table, save_table, update_items
from trainer.checkpoint import MANIFEST
from trainer.config import ContinuousSettings, TrainerSettings
from trainer.continuous import ContinuousPaths, ContinuousTrainer
from trainer.retrieval import Recommender
from trainer.servable import ITEMS, LABELS, ItemCatalogue, load_version, version_numbers
from trainer.stream import event_digest
from trainer.vocab import FeatureSpec, VocabLayout

pytestmark = pytest.mark.integration

USERS = 40
SETTINGS = {"model_size": "tiny", "batch_size": 8, "warmup_steps": 2, "max_history": 5}
LOOP = {"checkpoint_every_steps": 4, "checkpoint_every_s": 1000.0, "eval_examples": 20, "min_eval_examples": 5,
        "idle_after_steps": 3, "poll_interval_s": 0.1, "report_every_s": 0.2, "learning_rate": 3e-3}


def _paths(state: Path) -> ContinuousPaths:
    return ContinuousPaths(state / "training_log", state / "sid", state / "trainer", state / "models" / "plum")


def _world(state: Path, history_steps: int = 4) -> tuple[ContinuousPaths, LogWriter, Path]:
    """A log whose first batch the CPT checkpoint covers, a SID table, the checkpoint."""
    paths = _paths(state)
    write_sid_table(paths.sid_dir)
    log = LogWriter(paths.log_dir)
    offsets = log.publish([e for u in range(USERS) for e in user_events(u, history_steps)])
    return paths, log, write_cpt_checkpoint(state / "checkpoints" / "cpt" / "1", offsets[-1])


def _settings(**loop) -> TrainerSettings:
    return TrainerSettings(**SETTINGS, continuous=ContinuousSettings(**{**LOOP, **loop}))


def _env(state: Path) -> dict[str, str]:
    env = {**os.environ, "PLUM_PATHS__STATE_DIR": str(state)}
    env.update({f"PLUM_TRAINER__{k.upper()}": str(v) for k, v in SETTINGS.items()})
    env.update({f"PLUM_TRAINER__CONTINUOUS__{k.upper()}": str(v) for k, v in LOOP.items()})
    return env


class TrainerProcess:
    """`plum train --continuous` in a subprocess, its output collected by a thread."""

    def __init__(self, state: Path, *args: str, env: dict[str, str] | None = None) -> None:
        env = {**_env(state), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "ops.cli", "train", "--continuous", *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, timeout: float = 240.0, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"trainer exited early ({self.process.returncode}):\n{self.finish()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"timed out:\n{self.finish()}")
            time.sleep(poll)

    def kill_9(self) -> str:
        self.process.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float = 300.0) -> str:
        self.process.wait(timeout)
        self.reader.join(10)
        return self.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(paths: ContinuousPaths) -> dict:
    try:
        return json.loads(paths.status.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_kill_9_in_training_and_in_a_save_loses_and_repeats_no_example(tmp_path):
    state = tmp_path / "state"
    paths, log, _ = _world(state)
    fresh = [e for u in range(USERS) for e in user_events(u, 5, start_step=4)]
    log.publish(fresh[:120])
    log.publish(fresh[120:])

    port = _free_port()
    first = TrainerProcess(state, env={"PLUM_TRAINER__CONTINUOUS__METRICS_PORT": str(port)})
    first.wait_for(lambda: _status(paths).get("step", 0) >= 12)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    step = [line for line in metrics.splitlines() if line.startswith("plum_trainer_step ")]
    assert step and float(step[0].split()[1]) >= 1, metrics  # the gauges follow the running trainer
    first.kill_9()  # mid-training: the steps after the last checkpoint are lost, their examples not

    later = [e for u in range(USERS) for e in user_events(u, 3, start_step=9)]
    log.publish(later)  # the log grows while nothing runs
    second = TrainerProcess(state)
    second.wait_for(lambda: "resumed from checkpoint step" in second.output)
    second.wait_for(lambda: any("tmp" in p.name for p in paths.checkpoints.iterdir()), poll=0.001)
    second.kill_9()  # while orbax writes a checkpoint

    third = TrainerProcess(state, "--until-drained")
    output = third.finish()
    assert third.process.returncode == 0, output
    assert "resumed from checkpoint step" in output
    assert not [p for p in paths.checkpoints.iterdir() if "tmp" in p.name]  # the partial save was cleaned up

    trainer = ContinuousTrainer(_settings(), paths, None, say=lambda m: None)
    ledger = trainer.stream.ledger
    trainer.close()
    every = fresh + later
    assert ledger.taken == len(every) == ledger.trained + ledger.dropped_by_reward + ledger.without_sid
    assert ledger.digest == event_digest(e.event_id for e in every)  # each fresh event exactly once
    assert ledger.trained > 0 and ledger.without_sid == 0
    versions = version_numbers(paths.model_dir)
    assert versions, output
    for number in versions:  # every visible version is complete
        assert (paths.model_dir / str(number) / MANIFEST).is_file() and (paths.model_dir / str(number) / ITEMS).is_file()
    status = _status(paths)
    assert status["state"] == "stopped" and status["fresh"]["taken"] == len(every)
    assert status["last_checkpoint"]["step"] == status["step"]


def test_a_version_is_exported_only_after_its_checkpoint_is_final(tmp_path):
    """kill -9 the moment the first servable version appears: its parent checkpoint is already a
    complete checkpoint that a restarted trainer restores (orbax saves asynchronously; a version
    committed before the save is final would point at a checkpoint the restart throws away)."""
    state = tmp_path / "state"
    paths, log, _ = _world(state)
    log.publish([e for u in range(USERS) for e in user_events(u, 5, start_step=4)])
    trainer = TrainerProcess(state)
    trainer.wait_for(lambda: _status(paths).get("step", 0) >= 20)
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=9)])  # a slice to evaluate on
    trainer.wait_for(lambda: bool(version_numbers(paths.model_dir)), poll=0.001)
    output = trainer.kill_9()
    number = version_numbers(paths.model_dir)[0]
    manifest = load_version(paths.model_dir, number)[1]
    parent = Path(manifest["parent_checkpoint"])
    assert parent.is_dir() and parent.name == str(manifest["step"]), output
    committed = json.loads((parent / "_CHECKPOINT_METADATA").read_text())["commit_timestamp_nsecs"]
    assert committed <= manifest["export_started_ns"]  # orbax's own commit time, before the export began
    restarted = ContinuousTrainer(_settings(), paths, None, say=lambda m: None)
    try:
        assert manifest["step"] in restarted.manager.all_steps()
        assert restarted.loop.step_count >= manifest["step"]  # resumed from it or from a later one
    finally:
        restarted.close()


def test_an_item_that_becomes_popular_enters_the_top_k_after_the_next_export(tmp_path):
    paths, log, cpt = _world(tmp_path, history_steps=6)
    trainer = ContinuousTrainer(_settings(checkpoint_every_steps=60, eval_examples=40, idle_after_steps=150),
                                paths, cpt, say=lambda m: None)
    log.publish([e for u in range(USERS) for e in user_events(u, 3, start_step=6)])
    trainer.run(until_drained=True)
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=9)])  # held out, then trained
    trainer.run(until_drained=True)
    before = version_numbers(paths.model_dir)
    assert before, "the trained model was never exported"

    # A new item in cluster 0: the tokenizer assigns it a SID (a collision with item-0-5, suffix 1) ...
    table = load_table(paths.sid_dir)
    table.add(["item-0-hit"], np.array([[0, 5]]))
    update_items(paths.sid_dir, table)
    # ... and most cluster-0 users watch it next; the rest have not seen it yet.
    cluster0 = [u for u in range(USERS) if u % CLUSTERS == 0]
    watchers, others = cluster0[:-3], cluster0[-3:]
    hits = []
    for round_ in range(3):
        for u in watchers:
            event = user_events(u, 1, start_step=10 + round_)[0]
            hits.append(event.model_copy(update={"event_id": f"hit-{u}-{round_}", "item_id": "item-0-hit"}))
    log.publish(hits)
    log.publish([e for u in range(USERS) if u % CLUSTERS != 0 for e in user_events(u, 3, start_step=10)])
    trainer.run(until_drained=True)
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=13)])  # a slice to evaluate on
    trainer.run(until_drained=True)
    trainer.close()
    after = version_numbers(paths.model_dir)
    assert after[-1] > before[-1]

    old_model, _, old_ids, _ = load_version(paths.model_dir, before[-1])
    assert "item-0-hit" not in old_ids
    new_model, new_manifest, new_ids, new_sids = load_version(paths.model_dir, after[-1])
    assert "item-0-hit" in new_ids  # re-tokenized without a refit
    layout = VocabLayout.from_json(new_manifest["vocabulary"])
    items = ItemCatalogue.build(layout, new_ids, new_sids)
    histories = [np.array([items.index[e.item_id] for e in user_events(u, 10)][-5:], np.int32) for u in others]

    def top_10(model) -> list[list[str]]:
        beams, _ = Recommender(model, layout, items.catalogue, 5).search(histories, [[0.9] * 5] * len(others), 10,
                                                                        len(others))
        return [[items.item_ids[i] for i in row if i >= 0] for row in beams]

    assert all("item-0-hit" in row for row in top_10(new_model)), top_10(new_model)
    # Control: the model from before the hits, decoding over the same catalogue, does not rank it.
    assert not any("item-0-hit" in row for row in top_10(old_model)), top_10(old_model)

    # Each version's manifest lists the fresh examples taken since the version before it, by outcome:
    # in a run without restarts every event appears once, the lists add up to the ledger's counts,
    # and a version lists as trained only events its watermark covers.
    manifests = [load_version(paths.model_dir, n)[1] for n in after]
    assert [m["fresh_examples"]["since_version"] for m in manifests] == [None] + after[:-1]
    listed: dict[str, str] = {}
    for number, manifest in zip(after, manifests):
        for outcome, ids in manifest["fresh_examples"]["event_ids"].items():
            assert not set(ids) & set(listed), (number, outcome)
            listed.update(dict.fromkeys(ids, outcome))
        counts = manifest["fresh_examples"]["ledger"]
        assert counts["taken"] == len(listed) == sum(counts[o] for o in ("trained", "dropped_by_reward", "without_sid"))
        assert counts["trained"] == sum(o == "trained" for o in listed.values())
        offsets = manifest["data_watermark"]["offsets"]
        covered = {e.event_id for e in trainer.stream.events.values() if offsets.get(str(e.order[1]), -1) >= e.order[2]}
        assert {e for e, o in listed.items() if o == "trained"} <= covered, number
    assert "dropped_by_reward" in set(listed.values()) and "trained" in set(listed.values())


def test_a_version_that_fails_its_gate_is_not_exported_and_the_reason_is_logged(tmp_path):
    paths, log, cpt = _world(tmp_path, history_steps=6)
    good = ContinuousTrainer(_settings(checkpoint_every_steps=60, idle_after_steps=200), paths, cpt,
                             say=lambda m: None)
    log.publish([e for u in range(USERS) for e in user_events(u, 3, start_step=6)])
    good.run(until_drained=True)
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=9)])
    good.run(until_drained=True)
    good.close()
    served = version_numbers(paths.model_dir)[-1]
    (paths.model_dir / LABELS).write_text(json.dumps({"stable": served}))

    # A second trainer (its own work directory) from an untrained CPT checkpoint: worse by far.
    said: list[str] = []
    bad_paths = ContinuousPaths(paths.log_dir, paths.sid_dir, tmp_path / "other-trainer", paths.model_dir)
    bad = ContinuousTrainer(_settings(idle_after_steps=2), bad_paths,
                            write_cpt_checkpoint(tmp_path / "cpt-untrained", None, seed=7), say=said.append)
    bad.stream.base_watermark = {"offsets": {"0": log.offset - 1}}  # everything logged so far is history
    bad.run(until_drained=True)  # a couple of history-only steps, then idle
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=10)])
    bad.run(until_drained=True)
    bad.close()
    assert version_numbers(paths.model_dir)[-1] == served  # nothing new was exported
    refusals = [m for m in said if "not exported" in m and "trails served version" in m]
    assert refusals, said
    status = json.loads(bad_paths.status.read_text())
    assert "trails served version" in status["last_eval"]["export_refused"]
    assert status["last_eval"]["served_version"] == served


def test_a_refitted_sid_version_is_adopted_at_a_checkpoint_boundary(tmp_path):
    paths, log, cpt = _world(tmp_path, history_steps=6)
    said: list[str] = []
    trainer = ContinuousTrainer(_settings(checkpoint_every_steps=60, eval_examples=40, idle_after_steps=150),
                                paths, cpt, say=said.append)
    log.publish([e for u in range(USERS) for e in user_events(u, 3, start_step=6)])
    trainer.run(until_drained=True)
    # A refit: other codes for every item, and a wider first level.
    items = catalogue_items()
    codes = np.array([[(int(i.split("-")[1]) * 2 + 1) % 8, (int(i.split("-")[2]) + 5) % 16] for i in items])
    save_table(paths.sid_dir, new_table(2, items, codes, (8, 16), parent_version=1))
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=9)])
    trainer.run(until_drained=True)
    assert any("migrated from SID version 1 to 2" in m for m in said), said
    assert trainer.layout.codebook_sizes == (8, 16) and trainer.loop.model().cfg.vocab_size == trainer.layout.size
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=10)])
    trainer.run(until_drained=True)
    trainer.close()
    _, manifest, item_ids, sids = load_version(paths.model_dir, version_numbers(paths.model_dir)[-1])
    assert manifest["sid_version"] == 2
    table = load_table(paths.sid_dir, 2)
    assert [tuple(row) for row in sids.tolist()] == [table.sid(i) for i in item_ids]
    assert manifest["eval"]["recall@10"] > 0.2, manifest["eval"]  # it retrieves in the new SIDs

    resumed = ContinuousTrainer(_settings(), paths, None, say=lambda m: None)  # a restart speaks version 2
    assert resumed.layout.codebook_sizes == (8, 16) and resumed.origin["sid_version"] == 2
    resumed.close()


def test_a_registered_context_feature_joins_the_prompt_without_a_restart(tmp_path):
    paths, log, cpt = _world(tmp_path, history_steps=6)
    registry: list[FeatureSpec] = []
    said: list[str] = []
    trainer = ContinuousTrainer(_settings(checkpoint_every_steps=30, idle_after_steps=40), paths, cpt,
                                say=said.append, feature_source=lambda: list(registry))
    log.publish([e for u in range(USERS) for e in user_events(u, 3, start_step=6)])
    trainer.run(until_drained=True)
    old_size = trainer.layout.size

    registry.append(FeatureSpec("device", "categorical", ("tv", "phone")))
    with_context = [e.model_copy(update={"context": {"device": "tv" if u % 2 else "phone"}})
                    for u in range(USERS) for e in user_events(u, 1, start_step=9)]
    log.publish(with_context)
    trainer.run(max_steps=trainer.loop.step_count + 1)  # one boundary adopts the feature, one step trains
    assert any("context features device joined the prompt" in m for m in said), said
    assert trainer.layout.size == old_size + 3 and [f.name for f in trainer.layout.features] == ["device"]
    rows = np.asarray(trainer.loop.model().embed.embedding[...])
    assert rows.shape[0] == old_size + 3
    log.publish([e.model_copy(update={"context": {"device": "tv"}})
                 for u in range(USERS) for e in user_events(u, 1, start_step=10)])
    trainer.run(until_drained=True)
    trainer.close()
    _, manifest, _, _ = load_version(paths.model_dir, version_numbers(paths.model_dir)[-1])
    assert [f["name"] for f in manifest["prompt_schema"]["features"]] == ["device"]
    assert manifest["vocabulary"]["size"] == old_size + 3
    assert np.isfinite(rows).all()


def test_vocabulary_growth_keeps_every_old_row(tmp_path):
    paths, log, cpt = _world(tmp_path)
    trainer = ContinuousTrainer(_settings(), paths, cpt, say=lambda m: None,
                                feature_source=lambda: [FeatureSpec("hour", "numeric", edges=(6.0, 12.0, 18.0))])
    before = np.asarray(trainer.loop.model().embed.embedding[...]).copy()
    assert trainer._adopt_vocabulary_changes().startswith("context features hour")
    after = np.asarray(trainer.loop.model().embed.embedding[...])
    trainer.close()
    np.testing.assert_array_equal(after[:len(before)], before)
    assert after.shape[0] == len(before) + 4


def test_a_small_held_out_slice_is_held_until_it_is_big_enough_or_old_enough(tmp_path):
    paths, log, cpt = _world(tmp_path)
    trainer = ContinuousTrainer(_settings(min_eval_examples=30, eval_examples=40, checkpoint_every_s=0.5), paths, cpt,
                                say=lambda m: None)
    log.publish([e for u in range(10) for e in user_events(u, 1, start_step=4)])  # 10 users < 30
    trainer.poll()
    trainer.boundary()
    assert len(trainer.stream.pending) == 10 and not trainer.stream.released  # still held out
    log.publish([e for u in range(10, USERS) for e in user_events(u, 1, start_step=4)])  # now 40 users
    trainer.poll()
    trainer.boundary()
    assert not trainer.stream.pending and len(trainer.stream.released) == USERS
    assert trainer.last_eval["examples"] == USERS
    log.publish([e for u in range(5) for e in user_events(u, 1, start_step=5)])
    trainer.poll()
    time.sleep(0.6)  # older than checkpoint_every_s: evaluated and released although small
    trainer.boundary()
    trainer.close()
    assert not trainer.stream.pending and trainer.last_eval["examples"] == 5
