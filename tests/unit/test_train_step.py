"""The shared CPT/SFT train step, the mesh, and model checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.checkpoint import CheckpointError, load_model, read_manifest, save_model
from trainer.model import DECODER_SIZES, Decoder, Dropout
from trainer.train import OptimConfig, TrainLoop, loss_fn, next_token_loss, param_spec, sid_level_loss, sid_phase

pytestmark = pytest.mark.unit

TINY = DECODER_SIZES["tiny"]


def _batch(seed: int = 0, rows: int = 8, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), bool)
    mask[:, -3:] = False  # right padding
    weights = np.zeros((rows, length), np.float32)
    weights[:, 2:length - 4] = 1.0
    return {"tokens": tokens, "mask": mask, "weights": weights}


def test_next_token_loss_counts_only_weighted_positions():
    logits = jnp.zeros((1, 3, 4)).at[0, 0, 2].set(10.0)  # position 0 is confident in token 2
    tokens = jnp.array([[0, 2, 1]])
    only_first = next_token_loss(logits, tokens, jnp.array([[1.0, 0.0, 0.0]]))[0]
    only_second = next_token_loss(logits, tokens, jnp.array([[0.0, 1.0, 0.0]]))[0]
    assert float(only_first) < 1e-3
    assert float(only_second) == pytest.approx(np.log(4), rel=1e-5)


def test_sid_level_loss_normalises_each_target_over_its_own_sid_position():
    """Hand-computed: SID positions are tokens 2-4 and 5-6; logits cover rows 2..6. The first target
    (token 3) is scored against tokens 2-4 only, the second (token 6) against 5-6 only; unweighted
    positions count nothing, whatever their target."""
    levels = ((2, 3), (5, 2))
    logits = jnp.array([[[1.0, 2.0, 0.5, 9.0, 9.0], [7.0, 7.0, 7.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0, 0.0]]])
    tokens = jnp.array([[0, 3, 6]])
    first = -(2.0 - np.log(np.exp(1.0) + np.exp(2.0) + np.exp(0.5)))
    second = -(1.0 - np.log(np.exp(0.0) + np.exp(1.0)))
    loss, total = sid_level_loss(logits, 2, tokens, jnp.array([[1.0, 1.0, 0.0]]), levels)
    assert float(total) == 2.0 and float(loss) == pytest.approx((first + second) / 2, rel=1e-6)
    only_second, _ = sid_level_loss(logits, 2, tokens, jnp.array([[0.0, 1.0, 1.0]]), levels)
    assert float(only_second) == pytest.approx(second, rel=1e-6)
    # label smoothing 0.1: a tenth of each target spread evenly over its own position's tokens
    first_z, second_z = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(0.5)), np.log(np.exp(0.0) + np.exp(1.0))
    smoothed = (0.9 * first + 0.1 * (first_z - 3.5 / 3), 0.9 * second + 0.1 * (second_z - 0.5))
    loss, _ = sid_level_loss(logits, 2, tokens, jnp.array([[1.0, 1.0, 0.0]]), levels, smoothing=0.1)
    assert float(loss) == pytest.approx(sum(smoothed) / 2, rel=1e-6)


def test_sft_loss_reads_only_the_sid_rows_of_the_output_head():
    """The SFT loss projects onto the SID rows alone and equals the same per-position softmax taken
    from the whole vocabulary's logits; TrainLoop refuses a batch that weighs a non-SID target."""
    levels = ((4, 10), (14, 8), (22, 2))
    model = Decoder(TINY, nnx.Rngs(0))
    batch = _batch()
    batch["tokens"][:, 1:] = np.random.default_rng(1).integers(4, 24, batch["tokens"][:, 1:].shape)
    full, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
    rows, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]), rows=(4, 24))
    np.testing.assert_allclose(rows, full[..., 4:24], atol=1e-6)
    loss, metrics = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, sid_levels=levels)
    expected, _ = sid_level_loss(full[..., 4:24], 4, jnp.asarray(batch["tokens"]), jnp.asarray(batch["weights"]), levels)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    loop = TrainLoop(model, OptimConfig(warmup_steps=0, total_steps=3), sid_levels=levels)
    loop.step(batch)
    batch["tokens"][0, 3] = 2  # a weighted target outside every SID position
    with pytest.raises(ValueError, match="not a SID token"):
        loop.step(batch)


@pytest.mark.parametrize("with_features, smoothing", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_strided_sft_loss_equals_the_per_position_loss_on_real_sft_batches(with_features, smoothing):
    """SFT batches (tiled windows, reward-sampled targets, with or without context features in the
    prompt) follow one SID phase, and the loss taken per level at the strided positions has the
    value and gradients of the loss over every position; a batch off the phase takes the general path."""
    from trainer.data import Catalogue, RewardedSequences, sft_batches
    from trainer.vocab import FeatureSpec, VocabLayout

    features = (FeatureSpec("surface", "categorical", ("home", "search")),) if with_features else ()
    layout = VocabLayout((6, 4, 3), 2, features=features, text_ids=(7, 8))
    rng = np.random.default_rng(0)
    sids = np.array([layout.sid_tokens((rng.integers(6), rng.integers(4), rng.integers(3), k % 2))
                     for k in range(20)], np.int32)
    catalogue = Catalogue(sids, tuple(() for _ in range(20)))
    lengths = (3, 9, 14, 2, 25)
    seqs = RewardedSequences(tuple(rng.integers(0, 20, n) for n in lengths),
                             tuple(rng.choice([0.5, 1.0], n).astype(np.float32) for n in lengths))
    context = [{"surface": "home"}] * len(lengths) if with_features else None
    batches = sft_batches(layout, catalogue, seqs, 6, 8, (16, 32, 64), np.random.default_rng(1), context)
    model = Decoder(TINY.replace(vocab_size=layout.size), nnx.Rngs(0))
    levels = layout.sid_levels

    def loss_and_grads(batch: dict[str, jax.Array], phase: int | None) -> tuple[float, list[np.ndarray]]:
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, None, levels, phase, smoothing)
        return float(metrics["loss"]), [np.asarray(g) for g in jax.tree.leaves(nnx.to_pure_dict(grads))]

    for _ in range(2):
        batch = next(batches)
        phase = sid_phase(batch["tokens"], batch["weights"], levels)
        assert phase is not None
        device = {k: jnp.asarray(v) for k, v in batch.items()}
        strided, general = loss_and_grads(device, phase), loss_and_grads(device, None)
        assert strided[0] == pytest.approx(general[0], rel=1e-5) and strided[0] > 0
        for a, b in zip(strided[1], general[1]):
            np.testing.assert_allclose(a, b, atol=1e-6)
    off = {k: v.copy() for k, v in batch.items()}
    first = np.flatnonzero(off["weights"][0])[0]
    off["weights"][0, first] = 0.0  # one level-0 target dropped: still on the phase
    assert sid_phase(off["tokens"], off["weights"], levels) == phase
    off["tokens"][0, first + 3], off["weights"][0, first + 2] = levels[0][0], 1.0  # a level-0 token where level 2 belongs
    assert sid_phase(off["tokens"], off["weights"], levels) is None
    assert sid_phase(off["tokens"], np.zeros_like(off["weights"]), levels) == 0  # no targets: any phase


def test_training_reduces_loss_on_a_fixed_batch():
    loop = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=60))
    batch = _batch()
    first = loop.step(batch)["loss"]
    for _ in range(59):
        last = loop.step(batch)["loss"]
    assert last < 0.5 * first


def test_progress_rows_report_the_share_of_real_tokens_per_window():
    loop = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(warmup_steps=0, total_steps=4))
    full, padded = _batch(), _batch()  # 9 real tokens of 12 per row
    padded["mask"] = padded["mask"].copy()
    padded["mask"][:, :2] = False  # 2 more padded positions per row
    padded["weights"] = padded["weights"] * padded["mask"]
    lines: list[str] = []
    history = loop.run(iter([full, full, padded, padded]), 4, lines.append, report_every=2)
    assert [row["step"] for row in history] == [2, 4]
    assert history[0]["real_share"] == pytest.approx(9 / 12)
    assert history[1]["real_share"] == pytest.approx(7 / 12)
    assert len(lines) == 2 and "tokens/s" in lines[0]


def test_dropout_steps_repeat_by_seed_and_differ_from_plain_steps():
    """Dropout draws new masks every step from the seed: the same seed repeats a run exactly, a
    rate of 0 is the plain step, and the dropped forward pass changes the loss."""
    batch = _batch()

    def losses(dropout: float, seed: int = 0) -> list[float]:
        loop = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=5),
                         dropout=dropout, seed=seed)
        return [loop.step(batch)["loss"] for _ in range(3)]

    plain, dropped = losses(0.0), losses(0.3)
    assert losses(0.0, seed=7) == plain  # no dropout: the seed does not matter
    assert losses(0.3) == dropped
    assert losses(0.3, seed=1) != dropped
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain, dropped))
    with pytest.raises(ValueError, match="dropout"):
        TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(), dropout=1.0)


def test_train_loop_applies_label_smoothing_to_the_sft_loss_only():
    levels = ((4, 10), (14, 8), (22, 2))
    batch = _batch()
    batch["tokens"][:, 1:] = np.random.default_rng(1).integers(4, 24, batch["tokens"][:, 1:].shape)

    def first_loss(smoothing: float) -> float:
        loop = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(warmup_steps=0, total_steps=2), sid_levels=levels,
                         label_smoothing=smoothing)
        return loop.step(batch)["loss"]

    plain, smoothed = first_loss(0.0), first_loss(0.2)
    model = Decoder(TINY, nnx.Rngs(0))
    device = {k: jnp.asarray(v) for k, v in batch.items()}
    expected = loss_fn(model, device, sid_levels=levels, label_smoothing=0.2)[1]["loss"]
    assert smoothed == pytest.approx(float(expected), rel=1e-5) and abs(smoothed - plain) > 1e-4
    with pytest.raises(ValueError, match="label_smoothing must lie"):
        TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(), sid_levels=levels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="SFT loss"):
        TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(), label_smoothing=0.1)


def _params(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_weight_average_follows_the_decayed_mean_of_the_steps_and_survives_a_state_round_trip():
    """The average starts at the init and takes each step's weights with the warm-up decay
    min(d, (1 + n) / (10 + n)); the averaged model is not the live one; a state dict carries it."""
    batch = _batch()
    loop = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=20),
                     ema_decay=0.5)
    expected = _params(loop.model())
    for n in range(1, 6):
        loop.step(batch)
        decay = min(0.5, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * c for e, c in zip(expected, _params(loop.model()))]
    averaged = _params(loop.averaged_model())
    for e, a in zip(expected, averaged):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, c) for a, c in zip(averaged, _params(loop.model())))

    saved = loop.state_dict()
    loop.step(batch)
    assert any(not np.allclose(a, b) for a, b in zip(_params(loop.averaged_model()), averaged))
    loop.load_state_dict(saved)
    for a, b in zip(_params(loop.averaged_model()), averaged):
        np.testing.assert_array_equal(a, b)

    plain = TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=20))
    plain.step(batch)
    assert "ema" not in plain.state_dict()
    loop.load_state_dict(plain.state_dict())  # no average in the checkpoint: a new one at its weights
    for a, b in zip(_params(loop.averaged_model()), _params(plain.model())):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_params(plain.averaged_model()), _params(plain.model())):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainLoop(Decoder(TINY, nnx.Rngs(0)), OptimConfig(), ema_decay=1.0)


def test_decoding_never_drops():
    """The dropout argument is the only way in: without it the forward pass is deterministic and
    equals the cached decoding path."""
    model = Decoder(TINY, nnx.Rngs(0))
    batch = _batch()
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    first, _ = model(tokens, mask)
    again, _ = model(tokens, mask)
    dropped, _ = model(tokens, mask, Dropout(0.5, jax.random.key(0)))
    cached, _ = model.extend(tokens, mask, model.init_cache(len(tokens), tokens.shape[1]))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert float(jnp.abs(dropped - first).max()) > 1e-3
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(first)[real], rtol=1e-4, atol=1e-4)


def test_param_spec_splits_the_largest_divisible_dimension():
    assert param_spec((64, 32), 2) == jax_spec("fsdp", None)
    assert param_spec((3, 32), 2) == jax_spec(None, "fsdp")
    assert param_spec((3,), 2) == jax_spec()
    assert param_spec((64, 32), 1) == jax_spec()


def jax_spec(*axes):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*axes)


def test_sharded_step_matches_a_single_device(tmp_path):
    """Two forced host devices, data- and fsdp-sharded, give the single-device losses and params."""
    script = textwrap.dedent("""
        import json, sys
        import jax, numpy as np
        from flax import nnx
        from trainer.model import DECODER_SIZES, Decoder
        from trainer.train import OptimConfig, TrainLoop, make_mesh
        sys.path.insert(0, "tests/unit")
        from test_train_step import _batch
        out = {"devices": len(jax.devices())}
        for name, (data, fsdp) in {"single": (1, 1), "data": (2, 1), "fsdp": (1, 2)}.items():
            mesh = make_mesh(data, fsdp, jax.devices()[:data * fsdp])
            loop = TrainLoop(Decoder(DECODER_SIZES["tiny"], nnx.Rngs(0)), OptimConfig(warmup_steps=0, total_steps=3), mesh)
            losses = [loop.step(_batch(seed))["loss"] for seed in range(3)]
            params = jax.tree.leaves(nnx.state(loop.model(), nnx.Param))
            out[name] = {"losses": losses, "checksum": float(sum(np.abs(np.asarray(p)).sum() for p in params))}
        print(json.dumps(out))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    for name in ("data", "fsdp"):
        np.testing.assert_allclose(out[name]["losses"], out["single"]["losses"], rtol=1e-5)
        assert out[name]["checksum"] == pytest.approx(out["single"]["checksum"], rel=1e-5)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = Decoder(TINY.replace(vocab_size=80), nnx.Rngs(3))
    path = save_model(tmp_path / "ckpt", model, {"sid_version": 7, "vocabulary": {"size": 80}})
    restored, manifest = load_model(path)
    batch = _batch()
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    np.testing.assert_array_equal(np.asarray(model(tokens, mask)[0]), np.asarray(restored(tokens, mask)[0]))
    assert manifest["sid_version"] == 7 and manifest["model_config"]["vocab_size"] == 80
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(path, model, {})


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_manifest(tmp_path / "half")
