"""Promotion gates, rollback and the audit log on versions the continuous trainer really exported, with a real
training log: a worse version is refused by the quality gate (both versions evaluated on events neither
trained on), a better one accepted, --force needs a reason and is recorded, rollbacks walk the label's history,
and the CLI refuses without a stack trace."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ops.config import PromoteSettings, load_config
from ops.errors import PlumError
from ops.promote import AUDIT, PromotionRefused, audit_log, label_history, promote, rollback
from tests.support.serving_state import USERS, train_and_export
from tests.support.stream_world import user_events
from trainer.checkpoint import load_model
from trainer.servable import export_version, labels, load_version, version_numbers

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
    # Events neither version has trained on: the quality gate evaluates both on them.
    log.publish([e for u in range(USERS) for e in user_events(u, 1, start_step=10)])
    return cfg, trained, worse, log


def _promote(cfg, version, label="stable", reason="test", force=False):
    return promote(cfg.paths.model_dir, cfg.paths.training_log_dir, version, label, reason, SETTINGS, force,
                   who="tester", say=lambda m: None)


def test_gates_refuse_worse_accept_better_force_and_rollbacks_are_audited(world):
    cfg, trained, worse, _ = world
    model_dir = cfg.paths.model_dir

    first = _promote(cfg, trained, reason="first version")
    assert labels(model_dir) == {"stable": trained}
    assert [g["name"] for g in first["gates"]] == ["complete", "invalid_sid", "staleness"]  # nothing to compare

    with pytest.raises(PromotionRefused, match=r"gate quality: recall@10 .* trails version") as refused:
        _promote(cfg, worse, reason="try the untrained one")
    assert "--force" in str(refused.value)
    assert labels(model_dir) == {"stable": trained} and len(audit_log(model_dir)) == 1  # nothing changed

    with pytest.raises(PlumError, match="needs --reason"):
        _promote(cfg, worse, reason="  ", force=True)
    forced = _promote(cfg, worse, reason="incident 42: test the fallback", force=True)
    assert forced["forced"] and labels(model_dir) == {"stable": worse}
    assert [g["name"] for g in forced["gates"] if not g["passed"]] == ["quality"]

    better = _promote(cfg, trained, reason="back to the trained model")
    quality = next(g for g in better["gates"] if g["name"] == "quality")
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
    assert all(e["who"] == "tester" and e["reason"] and datetime.fromisoformat(e["at"]) for e in entries)
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
