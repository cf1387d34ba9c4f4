"""Promotion gates, rollback and the audit log on versions the continuous trainer really exported, with a real
training log: an untrained version is refused by the popularity floor even on a first promotion, a worse
version by the quality gate (both versions evaluated on events neither trained on), a better one accepted,
--force needs a reason and is recorded, rollbacks walk the label's history, every version is judged and
served with the beam width its manifest records, and the CLI refuses without a stack trace."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ops.config import PromoteSettings, load_config
from ops.errors import PlumError
from ops.promote import (
    AUDIT, PromotionRefused, audit_log, evaluate_fresh, gate_popularity_floor, held_out_after, label_history, promote,
    read_log, rollback,
)
from serving.engine import Request, ServableVersion
from serving.versions import ServingConfig, VersionManager, VersionPolicy
from tests.support.serving_state import USERS, train_and_export
from tests.support.stream_world import user_events
from trainer.checkpoint import load_model
from trainer.config import ContinuousSettings
from trainer.continuous import evaluate_held_out
from trainer.servable import ItemCatalogue, export_version, labels, load_version, version_numbers
from trainer.vocab import VocabLayout

pytestmark = pytest.mark.integration

SETTINGS = PromoteSettings(margin=0.0, min_eval_examples=10, eval_examples=40, beam_width=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained version (the trainer's own export) and an untrained one with the same manifest."""
    state = tmp_path_factory.mktemp("promote") / "state"
    cfg = load_config(env={}, overrides={"paths": {"state_dir": str(state)}})
    log, cpt = train_and_export(cfg)
    model_dir = cfg.paths.model_dir
    trained = version_numbers(model_dir)[-1]
    _, manifest, item_ids, sids = load_version(model_dir, trained)
    untrained, _ = load_model(cpt)
    worse = int(export_version(model_dir, untrained, manifest, item_ids, sids).name)
    # A trend: newcomers (one event each, so never evaluated) watch the items the users watch next, which
    # makes recent popularity a baseline worth beating (alone, these walks give it recall 0).
    log.publish([e.model_copy(update={"event_id": f"newcomer-{u}", "user_id": f"newcomer-{u}"})
                 for u in range(USERS) for e in user_events(u, 1, start_step=10, offset_minutes=-5)])
    # Events neither version has trained on: the floor and the quality gate evaluate both on them.
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=10)])
    return cfg, trained, worse, log


def _promote(cfg, version, label="stable", reason="test", force=False):
    return promote(cfg.paths.model_dir, cfg.paths.training_log_dir, version, label, reason, SETTINGS, force,
                   who="tester", say=lambda m: None)


def _gate(entry, name):
    return next(g for g in entry["gates"] if g["name"] == name)


def test_gates_refuse_worse_accept_better_force_and_rollbacks_are_audited(world):
    cfg, trained, worse, _ = world
    model_dir = cfg.paths.model_dir
    started = datetime.now(timezone.utc).replace(microsecond=0)

    # Nothing is served yet, so there is no version to compare with: the popularity floor still applies.
    with pytest.raises(PromotionRefused, match="refused by gate popularity_floor: ") as refused:
        _promote(cfg, worse, reason="the untrained one first")
    figures = re.search(r"recall@10 (\d\.\d{4}) does not beat recent popularity's (\d\.\d{4}) on the same "
                        rf"{USERS} held-out users", str(refused.value))
    untrained_recall, popularity_recall = map(float, figures.groups())
    assert untrained_recall < popularity_recall and "--force" in str(refused.value)
    assert labels(model_dir) == {} and audit_log(model_dir) == []  # nothing changed

    first = _promote(cfg, trained, reason="first version")
    assert labels(model_dir) == {"stable": trained}
    assert [g["name"] for g in first["gates"]] == ["complete", "invalid_sid", "staleness", "popularity_floor"]
    floor = _gate(first, "popularity_floor")
    assert floor["passed"] and floor["figures"]["examples"] == USERS and "evaluated now" in floor["figures"]["how"]
    # Both figures in the audit entry, on the same users: the popularity figure is the one the untrained
    # version was refused against, and the trained version beats it.
    assert floor["figures"]["popularity"]["recall@10"] == pytest.approx(popularity_recall, abs=5e-5)
    assert floor["figures"]["candidate"]["recall@10"] > floor["figures"]["popularity"]["recall@10"]

    with pytest.raises(PromotionRefused, match=r"gates popularity_floor: recall@10 .* does not beat .*; quality: "
                                               r"recall@10 .* trails version") as refused:
        _promote(cfg, worse, reason="try the untrained one")
    assert "--force" in str(refused.value)
    assert labels(model_dir) == {"stable": trained} and len(audit_log(model_dir)) == 1  # nothing changed

    with pytest.raises(PlumError, match="needs --reason"):
        _promote(cfg, worse, reason="  ", force=True)
    forced = _promote(cfg, worse, reason="incident 42: test the fallback", force=True)
    assert forced["forced"] and labels(model_dir) == {"stable": worse}
    assert [g["name"] for g in forced["gates"] if not g["passed"]] == ["popularity_floor", "quality"]

    better = _promote(cfg, trained, reason="back to the trained model")
    quality = _gate(better, "quality")
    assert quality["passed"] and "evaluated now" in quality["figures"]["how"]
    assert quality["figures"]["candidate"]["recall@10"] > quality["figures"]["current"]["recall@10"]

    back = rollback(model_dir, "stable", "the fix was wrong", who="tester")
    assert (back["from"], back["to"], labels(model_dir)) == (trained, worse, {"stable": worse})
    rollback(model_dir, "stable", "and again", who="tester")
    assert labels(model_dir) == {"stable": trained}
    with pytest.raises(PlumError, match="no earlier version to roll back to"):
        rollback(model_dir, "stable", "once more", who="tester")

    entries = audit_log(model_dir)
    assert [(e["action"], e["from"], e["to"]) for e in entries] == [
        ("promote", None, trained), ("promote", trained, worse), ("promote", worse, trained),
        ("rollback", trained, worse), ("rollback", worse, trained)]
    assert [e["reason"] for e in entries] == ["first version", "incident 42: test the fallback",
                                              "back to the trained model", "the fix was wrong", "and again"]
    assert [e["forced"] for e in entries] == [False, True, False, False, False]
    assert {e["who"] for e in entries} == {"tester"}
    assert all(started <= datetime.fromisoformat(e["at"]) <= datetime.now(timezone.utc) for e in entries)
    assert label_history(entries, "stable") == [trained]
    # append-only: every line is one complete JSON object
    assert len((model_dir / AUDIT).read_text().splitlines()) == len(entries)


def test_invalid_sid_and_stale_versions_are_refused_by_name(world):
    cfg, trained, _, _ = world
    model_dir = cfg.paths.model_dir
    model, manifest, item_ids, sids = load_version(model_dir, trained)
    invalid = int(export_version(model_dir, model, {**manifest, "eval": {**manifest["eval"], "invalid_sid_rate": 0.1}},
                                 item_ids, sids).name)
    with pytest.raises(PromotionRefused, match=r"gate invalid_sid: invalid-SID rate 0.1000 \(must be 0\)"):
        _promote(cfg, invalid, label="canary")
    watermark = manifest["data_watermark"]
    old = (datetime.fromisoformat(watermark["event_time"]) - timedelta(hours=48)).isoformat()
    stale = int(export_version(model_dir, model, {**manifest, "data_watermark": {**watermark, "event_time": old}},
                               item_ids, sids).name)
    with pytest.raises(PromotionRefused, match=r"gate staleness: data watermark 4\d\.\d\d h behind"):
        _promote(cfg, stale, label="canary")
    assert "canary" not in labels(model_dir)


def test_the_beam_width_a_manifest_records_is_what_promotion_judges_and_serving_runs(world):
    cfg, trained, _, _ = world
    model_dir = cfg.paths.model_dir
    model, manifest, item_ids, sids = load_version(model_dir, trained)
    # The trainer records the width it evaluated the export with, and popularity's figures beside its own.
    width = ContinuousSettings().beam_width
    assert manifest["search"] == {"beam_width": width} and manifest["eval"]["beam_width"] == width
    assert manifest["eval"]["popularity"]["examples"] == manifest["eval"]["examples"] == USERS
    narrow = int(export_version(model_dir, model, {**manifest, "search": {"beam_width": 3}}, item_ids, sids).name)

    # Promotion judges the version with its manifest's 3, not promote.beam_width (10 here).
    events = read_log(cfg.paths.training_log_dir)
    fresh = evaluate_fresh(model_dir, events, {narrow: load_version(model_dir, narrow)[1]}, SETTINGS, lambda m: None)
    held = held_out_after(events, [manifest["data_watermark"]], 5, SETTINGS.eval_examples)
    layout = VocabLayout.from_json(manifest["vocabulary"])
    items = ItemCatalogue.build(layout, item_ids, sids)
    recall = {w: evaluate_held_out(model, layout, items, held, 5, w)["recall@10"] for w in (3, SETTINGS.beam_width)}
    assert recall[3] < recall[SETTINGS.beam_width]  # the width shows in the figures
    assert fresh.figures[narrow]["recall@10"] == recall[3]
    assert gate_popularity_floor(narrow, manifest, fresh, SETTINGS).figures["candidate"]["beam_width"] == 3

    # Serving runs 3 too (a beam of 3 names at most 3 items, whatever k); serving.beam_width only caps it,
    # and is the width of a version whose manifest records none.
    request, history = Request("user-0", k=10), ([e.item_id for e in user_events(0, 10)], [0.9] * 10)

    def served(version: int, cap: int) -> int:
        return len(ServableVersion(model_dir, version, cap).recommend([request], [history])[0].item_ids)

    old = int(export_version(model_dir, model, {k: v for k, v in manifest.items() if k != "search"}, item_ids,
                             sids).name)
    assert (served(narrow, 10), served(narrow, 2), served(old, 10)) == (3, 2, 10)
    said: list[str] = []
    VersionManager(ServingConfig("plum", model_dir, VersionPolicy("specific", versions=(narrow, old)), labels={}),
                   beam_width=2, max_batch=1, say=said.append).poll_once()
    assert any(f"version {narrow} searches with beam width 2, not the 3 its manifest records" in m for m in said), said
    assert any(f"version {old}'s manifest records no beam width" in m for m in said), said


def test_cli_refusal_is_one_clear_line_and_exit_code_2(world):
    cfg, _, _, _ = world

    def plum(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", "--state-dir", cfg.paths.state_dir, *args],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)

    result = plum("promote", "999", "--reason", "typo")
    assert result.returncode == 2 and "version 999 does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = plum("promote", "1")
    assert result.returncode == 2 and "--reason" in result.stderr
