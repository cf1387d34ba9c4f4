"""The SmolLM2-135M warm start against llama.cpp's conventions and an independent numpy forward pass."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf.quants import dequantize

from trainer.model import DECODER_SIZES, Decoder
from trainer.warm_start import TextTokenizer, WarmStartError, load_pretrained, read_gguf

pytestmark = pytest.mark.equivalence

PROMPT = "The capital of France is"
SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome."
PRETRAINED_VOCAB = 49_152


@pytest.fixture(scope="module")
def gguf_path(asset_cache_dir) -> Path:
    from ops.assets import smollm2_gguf
    from ops.errors import AssetError

    try:
        path = smollm2_gguf(asset_cache_dir)
    except AssetError as error:
        pytest.skip(f"the SmolLM2 GGUF is not available ({error}); run `plum assets fetch smollm2`")
    if not path.is_file():
        pytest.skip(f"{path} is missing; run `plum assets fetch smollm2`")
    return path


@pytest.fixture(scope="module")
def tokenizer(gguf_path) -> TextTokenizer:
    return TextTokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def two_layers(gguf_path) -> Decoder:
    return load_pretrained(gguf_path, keep_layers=2)


def _logits(model: Decoder, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of one unpadded sequence."""
    return np.asarray(model(jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), bool))[0][0])


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved rows."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, weight.shape[1]) \
        .swapaxes(1, 2).reshape(weight.shape)


def numpy_llama(w: dict[str, np.ndarray], ids: list[int], n_layers: int, n_heads: int, n_kv_heads: int,
                theta: float, eps: float, rope: str) -> np.ndarray:
    """Textbook Llama forward of one unpadded sequence in float64 -> logits [T, V] (tied head).

    rope="interleaved" rotates pairs (2i, 2i+1) as llama.cpp does on the GGUF's own (permuted)
    Q/K rows; rope="rotate_half" rotates pairs (i, i + Dh/2) as HF does on un-permuted rows.
    """
    w = {name: array.astype(np.float64) for name, array in w.items()}
    t, dim = len(ids), w["token_embd.weight"].shape[1]
    dh = dim // n_heads
    angles = np.arange(t)[:, None] * theta ** (-np.arange(0, dh, 2) / dh)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # [T, 1, Dh/2]

    def rotate(x: np.ndarray) -> np.ndarray:
        if rope == "interleaved":
            a, b = x[..., 0::2], x[..., 1::2]
            return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
        a, b = x[..., :dh // 2], x[..., dh // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight

    x = w["token_embd.weight"][ids]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rotate((h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, dh))
        k = rotate((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv_heads, dh))
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv_heads, dh)
        k, v = (np.repeat(a, n_heads // n_kv_heads, axis=1) for a in (k, v))  # head h reads kv h // group
        scores = np.where(causal, np.einsum("thd,shd->hts", q, k) / np.sqrt(dh), -np.inf)
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", attn, v).reshape(t, dim) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def test_tokenizer_round_trips_text_and_knows_its_special_tokens(tokenizer):
    for text in [SENTENCE, "Star Wars (1977): Action|Adventure", "  naïve café, 12345\n\ttabs", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(PROMPT) == [504, 3575, 282, 4649, 314]  # 'The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis'
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]  # digit by digit
    assert tokenizer.vocab_size == PRETRAINED_VOCAB
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [tokenizer.bos_id, 4093, tokenizer.eos_id]


def test_full_model_greedily_answers_paris(gguf_path, tokenizer):
    model = load_pretrained(gguf_path)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.tie_embeddings) \
        == (30, 576, 9, 3, PRETRAINED_VOCAB, True)
    next_token = int(np.argmax(_logits(model, tokenizer.encode(PROMPT))[-1]))
    assert tokenizer.decode([next_token]) == " Paris"


def test_jax_logits_match_a_float64_numpy_forward_on_the_raw_gguf(gguf_path, tokenizer, two_layers):
    reader = gguf.GGUFReader(gguf_path)
    raw = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors
           if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2}
    theta = float(reader.fields["llama.rope.freq_base"].contents())
    eps = float(reader.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    _, unpermuted, _ = read_gguf(gguf_path, keep_layers=2)
    ids = tokenizer.encode(SENTENCE)
    got = _logits(two_layers, ids)
    # llama.cpp's interleaved RoPE on the file's rows and HF's rotate-half on ours must agree
    # (this checks the un-permutation independently), and the JAX model must match both.
    interleaved = numpy_llama(raw, ids, 2, 9, 3, theta, eps, rope="interleaved")
    rotate_half = numpy_llama(unpermuted, ids, 2, 9, 3, theta, eps, rope="rotate_half")
    np.testing.assert_allclose(rotate_half, interleaved, atol=1e-9)
    # Tolerance: float32 sums over 576-1536 terms carry ~1e-6 relative error; logits reach ~30, so
    # ~1e-4 is expected and 1e-3 leaves margin, while a wrong head grouping or RoPE pairing
    # moves logits by whole units.
    assert np.abs(got - interleaved).max() < 1e-3


def test_extra_vocabulary_leaves_pretrained_logits_alone_and_starts_near_the_mean(gguf_path, tokenizer,
                                                                                  two_layers):
    extended = load_pretrained(gguf_path, keep_layers=2, extra_vocab=10)
    assert extended.cfg.vocab_size == PRETRAINED_VOCAB + 10
    ids = tokenizer.encode(SENTENCE)
    base, logits = _logits(two_layers, ids), _logits(extended, ids)
    # Not bit-identical: XLA tiles the wider output matmul differently (measured 6e-5 on logits ~70).
    np.testing.assert_allclose(logits[:, :PRETRAINED_VOCAB], base, atol=5e-4)
    table = np.asarray(extended.embed.embedding[...])
    old, new = table[:PRETRAINED_VOCAB], table[PRETRAINED_VOCAB:]
    z = (new - old.mean(0)) / old.std(0)  # documented: mean row + N(0, (0.1 * per-dim std)^2)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 0.1) < 0.01
    # New tokens' logits sit near the average pre-trained logit, far inside the logit spread.
    spread = base.std(-1, keepdims=True)
    assert np.abs(logits[:, PRETRAINED_VOCAB:] - base.mean(-1, keepdims=True)).max() < 0.5 * spread.min()


def test_keep_layers_out_of_range_is_a_clear_error(gguf_path):
    with pytest.raises(WarmStartError, match="keep_layers must lie between 1 and 30"):
        read_gguf(gguf_path, keep_layers=31)


def _write_gguf(path: Path, model: Decoder, arch: str = "llama") -> None:
    """Write a Decoder as llama.cpp's converter would: [out, in] tensors, Q/K rows permuted."""
    cfg = model.cfg
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    writer.add_tensor("token_embd.weight", np.asarray(params["embed"]["embedding"]))
    writer.add_tensor("output_norm.weight", np.asarray(params["final_norm"]["weight"]))
    for i, layer in params["layers"].items():
        attn, ffn = layer["attn"], layer["ffn"]
        tensors = {
            "attn_norm": layer["attn_norm"]["weight"], "ffn_norm": layer["ffn_norm"]["weight"],
            "attn_q": llama_cpp_permute(np.asarray(attn["q_proj"]["kernel"]).T, cfg.n_heads),
            "attn_k": llama_cpp_permute(np.asarray(attn["k_proj"]["kernel"]).T, cfg.n_kv_heads),
            "attn_v": attn["v_proj"]["kernel"].T, "attn_output": attn["o_proj"]["kernel"].T,
            "ffn_gate": ffn["gate_proj"]["kernel"].T, "ffn_up": ffn["up_proj"]["kernel"].T,
            "ffn_down": ffn["down_proj"]["kernel"].T,
        }
        for name, array in tensors.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_model_written_as_llama_cpp_would_loads_back_unchanged(tmp_path):
    cfg = DECODER_SIZES["tiny"].replace(rope_theta=500.0, norm_eps=1e-6, max_len=64)
    original = Decoder(cfg, nnx.Rngs(0))
    _write_gguf(tmp_path / "tiny.gguf", original)
    loaded = load_pretrained(tmp_path / "tiny.gguf")
    assert loaded.cfg == cfg.replace(norm_eps=float(np.float32(1e-6)))  # GGUF stores float32
    ids = [3, 14, 15, 9, 26, 5]
    np.testing.assert_allclose(_logits(loaded, ids), _logits(original, ids), atol=1e-5)


def test_files_that_are_not_llama_ggufs_are_clear_errors(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(WarmStartError, match="not a readable GGUF"):
        read_gguf(tmp_path / "notes.gguf")
    with pytest.raises(WarmStartError, match="does not exist"):
        load_pretrained(tmp_path / "missing.gguf")
    _write_gguf(tmp_path / "gpt2.gguf", Decoder(DECODER_SIZES["tiny"], nnx.Rngs(0)), arch="gpt2")
    with pytest.raises(WarmStartError, match="needs a Llama GGUF"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_retrieval_warm_start_keeps_the_text_rows_and_layers_and_trains(gguf_path, tokenizer, two_layers):
    """bench quality's CR2 init: SmolLM2's first layers, its embedding rows for the layout's text tokens
    (and BOS/EOS), new rows for the rest; then a train step runs on it."""
    from trainer.retrieval import RetrievalSettings, init_model
    from trainer.train import OptimConfig, TrainLoop
    from trainer.vocab import BOS, EOS, VocabLayout

    text_ids = tuple(sorted(set(tokenizer.encode(SENTENCE))))
    layout = VocabLayout((8, 4), 2, text_ids=text_ids)
    settings = RetrievalSettings(init="smollm2", keep_layers=2)
    model = init_model(settings, layout, gguf_path, (tokenizer.bos_id, tokenizer.eos_id))
    assert model.cfg.n_layers == 2 and model.cfg.vocab_size == layout.size
    old = np.asarray(two_layers.embed.embedding[...])
    new = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(new[layout.text_offset:layout.text_offset + len(text_ids)], old[list(text_ids)])
    np.testing.assert_array_equal(new[BOS], old[tokenizer.bos_id])
    np.testing.assert_array_equal(new[EOS], old[tokenizer.eos_id])
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.q_proj.kernel[...]),
                                  np.asarray(two_layers.layers[1].attn.q_proj.kernel[...]))
    tokens = np.array([[BOS, *range(layout.text_offset, layout.text_offset + 6)]], np.int32)
    batch = {"tokens": tokens, "mask": np.ones_like(tokens, bool), "weights": np.ones(tokens.shape, np.float32)}
    loop = TrainLoop(model, OptimConfig(warmup_steps=0, total_steps=2))
    assert np.isfinite(loop.step(batch)["loss"])
