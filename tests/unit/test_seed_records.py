"""bench quality keeps each finished PLUM seed until its row is written, and a rerun of the same
command at the same clean commit takes it instead of training it again."""

from __future__ import annotations

import dataclasses

import pytest

from ops.bench import QualityRun
from ops.bench.quality import SeedRecords

pytestmark = pytest.mark.unit

RESULT = {"seed": 1, "metrics": {"recall@10": 0.25}, "settings": {"steps": [1, 2]}, "train_seconds": 3.0}


def test_a_finished_seed_is_taken_only_by_the_same_command_at_the_same_clean_commit(tmp_path):
    run = QualityRun(datasets=("movielens-100k",), variants=("r1",), seeds=(1, 2))
    SeedRecords(tmp_path, run, "abc1234").save("movielens-100k", "r1", 1, RESULT)
    again = dataclasses.replace(run, seeds=(1, 2, 3), variants=("r1", "cr1"))  # seeds and rows may differ
    assert SeedRecords(tmp_path, again, "abc1234").load("movielens-100k", "r1", 1) == RESULT
    assert SeedRecords(tmp_path, again, "abc1234").load("movielens-100k", "r1", 2) is None  # not finished
    assert SeedRecords(tmp_path, again, "abc1234").load("amazon-beauty", "r1", 1) is None
    assert SeedRecords(tmp_path, again, "abc1234").load("movielens-100k", "cr1", 1) is None
    assert SeedRecords(tmp_path, again, "def5678").load("movielens-100k", "r1", 1) is None  # other code
    other = dataclasses.replace(run, dropout=run.dropout + 0.1)
    assert SeedRecords(tmp_path, other, "abc1234").load("movielens-100k", "r1", 1) is None  # other recipe


def test_nothing_is_kept_or_taken_from_uncommitted_code(tmp_path):
    run = QualityRun(seeds=(1,))
    dirty = SeedRecords(tmp_path, run, "abc1234+uncommitted")
    dirty.save("movielens-100k", "r1", 1, RESULT)
    assert not list(tmp_path.iterdir())
    SeedRecords(tmp_path, run, "abc1234").save("movielens-100k", "r1", 1, RESULT)
    assert dirty.load("movielens-100k", "r1", 1) is None
    SeedRecords(tmp_path, run, "abc1234").clear("movielens-100k", "r1", (1,))
    assert not list(tmp_path.iterdir())


def test_a_finished_sasrec_trial_is_taken_for_the_same_point_and_cleared_with_its_row(tmp_path):
    run = QualityRun(datasets=("amazon-beauty",), variants=("sasrec",), seeds=(0, 1))
    records = SeedRecords(tmp_path, run, "abc1234")
    point = {"max_len": 20, "dim": 64, "n_blocks": 2, "dropout": 0.3, "learning_rate": 0.003}
    records.save_trial("amazon-beauty", "sasrec", point, {"score": 0.1021, "train_seconds": 689.0, "epochs": 18})
    again = SeedRecords(tmp_path, dataclasses.replace(run, seeds=(0, 1, 2)), "abc1234")
    assert again.load_trial("amazon-beauty", "sasrec", dict(reversed(point.items())))["score"] == 0.1021
    assert again.load_trial("amazon-beauty", "sasrec", {**point, "dim": 128}) is None
    assert again.load_trial("amazon-beauty", "sasrec-bce", point) is None
    assert SeedRecords(tmp_path, run, "def5678").load_trial("amazon-beauty", "sasrec", point) is None
    records.save("amazon-beauty", "sasrec", 0, RESULT)
    records.save_trial("amazon-beauty", "sasrec-bce", point, {"score": 0.05, "train_seconds": 1.0, "epochs": 2})
    again.clear("amazon-beauty", "sasrec", (0, 1, 2))
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]  # only the BCE trial is left
    assert again.load_trial("amazon-beauty", "sasrec-bce", point)["score"] == 0.05
