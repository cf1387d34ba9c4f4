"""`plum train cpt` and `plum train sft` against real parts: a real pipeline's training log, a fitted SID
table, titles from the Feast offline store, and real orbax checkpoints with their manifests. SFT's held-out
figures count only events the CPT checkpoint's corpus did not contain."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from features import FeatureStoreClient
from ingest.datasets import to_events, to_item_upserts
from ingest.kafka_clients import ensure_topics
from ingest.producer import EventProducer
from ingest.replay import replay
from ingest.training_log import read_training_log
from ops.datasets import load_dataset
from ops.errors import PlumError
from ops.ingest_jobs import run_pipeline
from ops.tokenize_jobs import fit
from ops.train_jobs import train_cpt, train_sft
from tokenizer.sid_table import load_table
from trainer.checkpoint import load_model
from trainer.retrieval import Recommender, RetrievalSettings, top_k_unseen
from trainer.servable import ItemCatalogue
from trainer.vocab import VocabLayout

pytestmark = pytest.mark.integration


def test_cpt_on_the_pipelines_log_writes_a_complete_checkpoint_and_sft_evaluates_only_newer_events(plum_config,
                                                                                                    capsys):
    cfg = plum_config.model_copy(update={
        "tokenizer": plum_config.tokenizer.model_copy(update={"steps": 40, "batch_size": 128}),
        "trainer": plum_config.trainer.model_copy(update={"model_size": "tiny", "cpt_steps": 6, "sft_steps": 6,
                                                          "batch_size": 8, "warmup_steps": 2, "max_history": 5,
                                                          "eval_users": 50}),
    })
    ensure_topics(cfg.kafka)
    FeatureStoreClient(cfg.feast_repo_dir, cfg.feast).apply()
    with pytest.raises(PlumError, match="tokenize fit"):
        train_cpt(cfg)  # no SID table yet: a clear error, no checkpoint
    with pytest.raises(PlumError, match="train cpt"):
        train_sft(cfg)  # no CPT checkpoint yet
    ds = load_dataset("movielens-100k", cfg.paths.data_dir, cfg.paths.cache_dir)
    with EventProducer(cfg.kafka) as producer:
        replay(producer, list(to_item_upserts(ds)), list(to_events(ds))[:3000])
    run_pipeline(cfg, until_caught_up=True, quiet=True)
    fit(cfg)

    path = train_cpt(cfg)
    assert path == cfg.paths.checkpoint_dir / "cpt" / "1"
    model, manifest = load_model(path)
    table = load_table(cfg.paths.sid_dir)
    log = read_training_log(cfg.paths.training_log_dir)
    layout = VocabLayout.from_json(manifest["vocabulary"])
    assert manifest["stage"] == "cpt" and manifest["sid_version"] == table.version
    assert manifest["data_watermark"]["events"] == len(log) == 3000
    assert manifest["prompt_schema"]["max_history"] == 5
    assert model.cfg.vocab_size == layout.size and layout.codebook_sizes == table.codebook_sizes
    assert len(layout.text_ids) > 100  # the titles' BPE tokens
    tokens = jnp.asarray([[1, 4, *layout.sid_tokens(table.sid(manifest["item_ids"][0]))]])
    logits, _ = model(tokens, jnp.ones_like(tokens, bool))
    assert np.isfinite(np.asarray(logits)).all()
    assert train_cpt(cfg).name == "2"  # a second run never overwrites the first

    capsys.readouterr()
    sft_path = train_sft(cfg, path)
    sft, sft_manifest = load_model(sft_path)
    assert sft_manifest["stage"] == "sft" and sft_manifest["parent_checkpoint"] == str(path)
    assert sft_manifest["vocabulary"] == manifest["vocabulary"] and sft.cfg == model.cfg
    # CPT trained on every logged event, so no user's last event can judge SFT: one line, no figure.
    said = capsys.readouterr().out
    assert "train sft: no held-out figure: every user's last event is in the CPT checkpoint's corpus" in said
    assert sft_manifest["eval"]["users"] == 0 and "recall@10" not in sft_manifest["eval"]

    with EventProducer(cfg.kafka) as producer:
        replay(producer, [], list(to_events(ds))[3000:4000])
    run_pipeline(cfg, until_caught_up=True, quiet=True)
    sft, sft_manifest = load_model(train_sft(cfg, path))
    held_out = sft_manifest["eval"]
    # By hand: users with at least 3 events whose last event lies beyond the CPT watermark, in user order.
    log = read_training_log(cfg.paths.training_log_dir)
    log = log[log["item_id"].isin(table.codes)].sort_values(
        ["user_id", "event_time", "kafka_partition", "kafka_offset"], kind="stable")
    covered = manifest["data_watermark"]["offsets"]
    newer = [(user, events) for user, events in log.groupby("user_id", sort=True) if len(events) >= 3
             and events["kafka_offset"].iloc[-1] > covered.get(str(events["kafka_partition"].iloc[-1]), -1)]
    evaluable = int((log.groupby("user_id").size() >= 3).sum())  # users with a held-out event and history
    assert 0 < len(newer) < evaluable and held_out["users"] == min(50, len(newer))
    # Their hits, counted here: the SFT model's constrained search from each history, seen items excluded.
    items = ItemCatalogue.from_table(layout, table)
    sequences = [([items.index[i] for i in e["item_id"]], e["reward"].to_numpy(np.float32)) for _, e in newer[:50]]
    retrieval = RetrievalSettings()
    beams, _ = Recommender(sft, layout, items.catalogue, 5).search(
        [s[:-1] for s, _ in sequences], [r[:-1] for _, r in sequences], retrieval.beam_width, retrieval.eval_batch,
        exclude=[s[:-1] for s, _ in sequences])
    top_10 = top_k_unseen(beams, [np.array(s[:-1]) for s, _ in sequences], 10)
    hits = sum(s[-1] in row.tolist() for (s, _), row in zip(sequences, top_10))
    assert held_out["recall@10"] == pytest.approx(hits / held_out["users"])
    assert held_out["invalid_sid_rate"] == 0.0  # the constrained search only names catalogue items
