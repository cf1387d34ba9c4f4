"""Warm start from a pre-trained Llama GGUF (SmolLM2-135M-Instruct, Q4_1): weights and tokenizer.

The GGUF is dequantised with the gguf package. llama.cpp's converter permutes the rows of the
Q and K projections so that its interleaved RoPE (pairs 2i, 2i+1) reproduces HF's rotate-half
RoPE (pairs i, i + Dh/2); we undo that permutation, so the weights fit trainer.model unchanged.
Hyperparameters (widths, heads, rope theta, norm eps, context length) come from the metadata.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from trainer.model import Decoder, DecoderConfig


def _fetch_hint(path: str | os.PathLike[str]) -> str:
    # The asset cache trusts a folder it once completed, so `plum assets fetch` alone keeps a damaged copy.
    folder = os.path.dirname(os.path.abspath(path))
    return f"delete {folder} if it is the asset cache's copy, then run `plum assets fetch smollm2`"


# GGUF tensor name within block i -> its parameter path in trainer.model.DecoderBlock.
_BLOCK_TENSORS = {
    "attn_norm": ("attn_norm", "weight"),
    "attn_q": ("attn", "q_proj", "kernel"),
    "attn_k": ("attn", "k_proj", "kernel"),
    "attn_v": ("attn", "v_proj", "kernel"),
    "attn_output": ("attn", "o_proj", "kernel"),
    "ffn_norm": ("ffn_norm", "weight"),
    "ffn_gate": ("ffn", "gate_proj", "kernel"),
    "ffn_up": ("ffn", "up_proj", "kernel"),
    "ffn_down": ("ffn", "down_proj", "kernel"),
}


class WarmStartError(ValueError):
    """The GGUF file cannot serve as a warm start; the message says why and what to do."""


def _open(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise WarmStartError(f"GGUF file {path} does not exist; {_fetch_hint(path)}.")
    stat = os.stat(path)
    return _parse(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


# GGUFReader parses all ~100k tokenizer strings on open (seconds); a warm start opens the same file
# for its weights and its tokenizer, so the parse is kept, keyed so that a replaced file is re-read.
@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except ValueError as error:
        raise WarmStartError(f"{path} is not a readable GGUF file ({error}); {_fetch_hint(path)}.") from error


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is None:
        raise WarmStartError(f"The GGUF metadata lacks {key!r}; the warm start needs a Llama GGUF such as SmolLM2.")
    return default


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: weight [heads * Dh, D] from interleaved to rotate-half rows.

    The converter maps HF row (head, half c, index j) to GGUF row (head, j, c); this reads the GGUF
    rows as (head, j, c) and swaps back.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf(
    gguf_path: str | os.PathLike[str], keep_layers: int | None = None
) -> tuple[DecoderConfig, dict[str, np.ndarray], dict[str, Any]]:
    """(config, float32 weights by GGUF tensor name, scalar metadata) of a Llama GGUF.

    Weights are [out, in] as in PyTorch, Q/K already un-permuted for rotate-half RoPE; only the
    first keep_layers blocks are dequantised (all when None). The metadata holds every scalar and
    string key (arrays such as the vocabulary are left out).
    """
    reader = _open(gguf_path)
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise WarmStartError(f"{gguf_path} holds a {architecture!r} model; the warm start needs a Llama GGUF "
                             "such as SmolLM2-135M.")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    n_layers = int(_field(reader, "llama.block_count"))
    keep = n_layers if keep_layers is None else keep_layers
    if not 1 <= keep <= n_layers:
        raise WarmStartError(f"keep_layers must lie between 1 and {n_layers} (the model's layers), got {keep_layers}.")
    if "token_embd.weight" not in tensors:
        raise WarmStartError(f"{gguf_path} has no token_embd.weight tensor; is it a complete Llama GGUF?")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv_heads = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    cfg = DecoderConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes list the fastest axis first
        dim=int(_field(reader, "llama.embedding_length")),
        n_layers=keep,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),  # llama.cpp's default
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        max_len=int(_field(reader, "llama.context_length")),
    )
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{name}.weight" for i in range(keep) for name in _BLOCK_TENSORS
    ] + ([] if cfg.tie_embeddings else ["output.weight"])
    weights = {}
    for name in names:
        if name not in tensors:
            raise WarmStartError(f"{gguf_path} lacks the tensor {name}; is it a complete Llama GGUF?")
        tensor = tensors[name]
        weights[name] = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    for i in range(keep):
        weights[f"blk.{i}.attn_q.weight"] = unpermute_rope_rows(weights[f"blk.{i}.attn_q.weight"], n_heads)
        weights[f"blk.{i}.attn_k.weight"] = unpermute_rope_rows(weights[f"blk.{i}.attn_k.weight"], n_kv_heads)
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if field.types and field.types[0] != gguf.GGUFValueType.ARRAY}
    return cfg, weights, metadata


def new_rows(pretrained: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n fresh rows [n, D] for a table pretrained [V, D]: the mean row + noise of 0.1 * per-dim std.

    Why: new tokens (SIDs, features) start at the same scale as the old ones, and since a logit
    is h . row, a row near the mean row gives logits near the average token's, so training does
    not start with huge losses; the noise breaks the symmetry between the new tokens.
    """
    if n < 0:
        raise WarmStartError(f"the number of new vocabulary rows must not be negative, got {n}.")
    noise = rng.standard_normal((n, pretrained.shape[1])) * (0.1 * pretrained.std(axis=0))
    return (pretrained.mean(axis=0) + noise).astype(pretrained.dtype)


def load_pretrained(
    gguf_path: str | os.PathLike[str],
    keep_layers: int | None = None,
    extra_vocab: int = 0,
    dtype: str = "float32",
    seed: int = 0,
) -> Decoder:
    """A Decoder holding the GGUF's weights: its first keep_layers blocks, vocabulary + extra_vocab rows.

    The new rows follow the pre-trained ones (ids V..V+extra_vocab-1), initialised by new_rows with
    numpy seed `seed`; with tied embeddings they also serve as the output head.
    """
    cfg, weights, _ = read_gguf(gguf_path, keep_layers)
    rng = np.random.default_rng(seed)
    pretrained = weights["token_embd.weight"]
    embedding = np.concatenate([pretrained, new_rows(pretrained, extra_vocab, rng)])
    cfg = cfg.replace(vocab_size=embedding.shape[0], dtype=dtype)
    params: dict[str, Any] = {
        "embed": {"embedding": embedding},
        "final_norm": {"weight": weights["output_norm.weight"]},
        "layers": {},
    }
    for i in range(cfg.n_layers):
        block: dict[str, Any] = {}
        for name, (*path, leaf) in _BLOCK_TENSORS.items():
            weight = weights[f"blk.{i}.{name}.weight"]
            node = block
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = weight.T if leaf == "kernel" else weight  # nnx kernels are [in, out]
        params["layers"][i] = block
    if not cfg.tie_embeddings:
        head = weights["output.weight"]
        params["lm_head"] = {"kernel": np.concatenate([head, new_rows(head, extra_vocab, rng)]).T}
    # Build the model abstractly (no random init of 135M parameters), then fill in the weights.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(seed))))
    def shapes(tree: Any) -> Any:
        return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)

    if shapes(nnx.to_pure_dict(state)) != shapes(params):
        raise RuntimeError("The GGUF weights do not line up with trainer.model.Decoder's parameters.")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), params))
    return nnx.merge(graphdef, state)


class TextTokenizer:
    """The GGUF's own byte-level BPE (GPT-2 style) rebuilt with the tokenizers package."""

    def __init__(self, tokens: list[str], merges: list[str], bos_id: int, eos_id: int,
                 special_tokens: list[str]) -> None:
        bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                         merges=[(left, right) for left, right in (merge.split(" ", 1) for merge in merges)])
        self._tokenizer = Tokenizer(bpe)
        # SmolLM2's pre-tokenizer (GGUF tokenizer.ggml.pre = "smollm"): every digit on its own,
        # then GPT-2's byte-level regex split without a prefix space.
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self._tokenizer.decoder = decoders.ByteLevel()
        # Control tokens such as <|im_start|> stay one id each instead of being split as text.
        self._tokenizer.add_special_tokens(special_tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike[str]) -> TextTokenizer:
        """The tokenizer stored in a GGUF's tokenizer.ggml.* metadata."""
        reader = _open(gguf_path)
        if _field(reader, "tokenizer.ggml.model") != "gpt2":
            raise WarmStartError(f"{gguf_path} does not hold a GPT-2 style byte-level BPE tokenizer.")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        token_types = _field(reader, "tokenizer.ggml.token_type")
        control = [token for token, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]
        return cls(tokens, _field(reader, "tokenizer.ggml.merges"), int(_field(reader, "tokenizer.ggml.bos_token_id")),
                   int(_field(reader, "tokenizer.ggml.eos_token_id")), control)

    @property
    def vocab_size(self) -> int:
        """Number of text token ids (49,152 for SmolLM2)."""
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (control tokens included, so encode/decode round-trips)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)
