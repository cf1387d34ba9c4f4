"""The JAX MiniLM against an independent numpy forward pass over the same safetensors weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tokenizer.text_encoder import TextEncoder, TextEncoderError

pytestmark = pytest.mark.equivalence

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "The stock market fell sharply today.",
    "Star Wars (1977): Action|Adventure|Romance|Sci-Fi|War",
    "",
]


@pytest.fixture(scope="module")
def model_dir(asset_cache_dir) -> Path:
    from ops.assets import fetch_asset

    return fetch_asset("minilm", asset_cache_dir)


@pytest.fixture(scope="module")
def encoder(model_dir) -> TextEncoder:
    return TextEncoder(model_dir, batch_size=8)


def numpy_minilm(weights: dict, ids: np.ndarray) -> np.ndarray:
    """Textbook BERT + mean pooling + L2 norm for one unpadded sequence, in float64."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def lin(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = norm(x, "embeddings.LayerNorm")
    for i in range(6):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{m}").reshape(n, 12, 32).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(32)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(n, 384)
        x = norm(x + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        x = norm(x + lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_jax_forward_matches_numpy_reference(encoder, model_dir):
    from safetensors.numpy import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    got = encoder.encode(SENTENCES)
    for sentence, vector in zip(SENTENCES, got):
        ids = np.array(encoder.tokenizer.encode(sentence).ids)
        want = numpy_minilm(weights, ids)
        assert np.abs(vector - want).max() < 2e-5, sentence


def test_padding_and_batching_do_not_change_embeddings(encoder):
    alone = np.stack([encoder.encode([s])[0] for s in SENTENCES])
    together = encoder.encode(SENTENCES * 3)[: len(SENTENCES)]
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_paraphrases_are_near_and_unrelated_sentences_near_zero(encoder):
    e = encoder.encode(SENTENCES[:3])
    assert float(e[0] @ e[1]) > 0.7
    assert abs(float(e[0] @ e[2])) < 0.15
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_cache_returns_the_same_vectors_without_recomputing(model_dir, tmp_path):
    first = TextEncoder(model_dir, cache_path=tmp_path / "cache.db", batch_size=8)
    vectors = first.encode(SENTENCES)
    second = TextEncoder(model_dir, cache_path=tmp_path / "cache.db", batch_size=8)
    second.params = None  # any computation would fail now: everything must come from the cache
    np.testing.assert_array_equal(second.encode(SENTENCES), vectors)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="plum assets fetch minilm"):
        TextEncoder(tmp_path)
