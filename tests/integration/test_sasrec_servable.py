"""The SASRec baseline as a servable version: exported with orbax, loaded by the serving engine, and
answering exactly as the in-process model ranks (dot-product top-K, seen items excluded)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from serving.engine import DotProductVersion, Request, load_servable
from trainer.evaluate import top_k_excluding
from trainer.sasrec import SASRec, SASRecConfig, score_users
from trainer.servable import export_sasrec_version

pytestmark = pytest.mark.integration


def test_a_sasrec_version_serves_the_models_own_ranking(tmp_path):
    cfg = SASRecConfig(n_items=30, max_len=8, dim=16, ffn_dim=32)
    model = SASRec(cfg, nnx.Rngs(3))
    item_ids = [f"item-{i}" for i in range(30)]
    path = export_sasrec_version(tmp_path / "sasrec", model, item_ids, {"stage": "baseline"})
    served = load_servable(tmp_path / "sasrec", int(path.name), beam_width=10)
    assert isinstance(served, DotProductVersion)
    served.warm_up(4)
    histories = [["item-3", "item-7", "item-1"], [], ["item-29"]]
    results = served.recommend([Request(f"u{i}", 5) for i in range(3)], [(h, [1.0] * len(h)) for h in histories])
    indices = [np.array([int(i.split("-")[1]) for i in h], np.int32) for h in histories]
    expected = top_k_excluding(score_users(model, indices, batch_size=4), 5, indices)
    for result, row in zip(results, expected):
        assert result.item_ids == tuple(f"item-{i}" for i in row) and result.version == 1
    assert not {"item-3", "item-7", "item-1"} & set(results[0].item_ids)
