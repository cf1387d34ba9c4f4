"""The SID-v2 RQ-VAE: every flag changes the objective, codes are deterministic, no collapse."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from tokenizer.rqvae import RQVAE, RQVAEConfig, loss_fn
from tokenizer.rqvae_train import assign_codes, model_params, reset_dead_codes, restore_model, train

pytestmark = pytest.mark.unit

CFG = RQVAEConfig(modality_dims=(("a", 12), ("b", 6)), modality_hidden=32, latent_dim=8, codebook_sizes=(16, 8, 4))


def blobs(n=512, k=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, 18))
    labels = rng.integers(k, size=n)
    x = (centres[labels] + rng.normal(0, 0.2, (n, 18))).astype(np.float32)
    return x, np.ones((n, 2), np.float32), labels


def batch(n=64, seed=0):
    x, presence, _ = blobs(n, 8, seed)
    pos = np.full(n, -1, np.int32)
    pos[: n // 4] = np.arange(n // 4, n // 2)
    return {"x": x, "presence": presence, "pos": pos}


def loss_and_grad(cfg, data=None, seed=0):
    model = RQVAE(cfg, nnx.Rngs(0))
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, data or batch(), jax.random.key(seed))
    return float(loss), metrics, grads


@pytest.mark.parametrize("change, message", [
    ({"codebook_sizes": (4, 8)}, "must not grow"),
    ({"codebook_sizes": ()}, "at least one level"),
    ({"modality_dims": ()}, "modality_dims"),
    ({"temperature": 0.0}, "temperature"),
])
def test_config_mistakes_are_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **change)


def test_contrastive_flag_adds_exactly_the_weighted_infonce_term():
    off, _, _ = loss_and_grad(dataclasses.replace(CFG, contrastive=False, progressive_masking=False))
    on, metrics, _ = loss_and_grad(dataclasses.replace(CFG, contrastive=True, progressive_masking=False))
    assert on == pytest.approx(off + CFG.contrastive_weight * float(metrics["contrastive"]), rel=1e-5)
    assert float(metrics["contrastive"]) > 0


def test_progressive_masking_reconstructs_from_a_sampled_prefix():
    cfg = dataclasses.replace(CFG, contrastive=False)
    _, on, _ = loss_and_grad(cfg)
    _, off, _ = loss_and_grad(dataclasses.replace(cfg, progressive_masking=False))
    assert float(off["mean_levels_kept"]) == cfg.levels
    assert 1 <= float(on["mean_levels_kept"]) < cfg.levels
    recon = {float(loss_and_grad(cfg, seed=s)[1]["recon"]) for s in range(3)}
    assert len(recon) > 1  # the prefix depends on the rng


def test_fusion_and_multi_resolution_change_the_model():
    fused = RQVAE(CFG, nnx.Rngs(0))
    plain = RQVAE(dataclasses.replace(CFG, fusion=False), nnx.Rngs(0))
    assert hasattr(fused, "encoders") and not hasattr(plain, "encoders")
    assert loss_and_grad(CFG)[0] != loss_and_grad(dataclasses.replace(CFG, fusion=False))[0]
    flat = RQVAE(dataclasses.replace(CFG, multi_resolution=False, codebook_sizes=(16, 16, 16)), nnx.Rngs(0))
    assert [c[...].shape[0] for c in fused.codebooks] == [16, 8, 4]
    assert [c[...].shape[0] for c in flat.codebooks] == [16, 16, 16]
    single = dataclasses.replace(CFG, multi_resolution=False)
    assert single.level_sizes == (16, 16, 16)


def test_codes_are_deterministic_with_a_seed_and_survive_a_save():
    x, presence, _ = blobs(256)
    pairs = np.array([[0, 1], [2, 3]])
    a, _ = train(CFG, x, presence, pairs, 30, 64, 3e-3)
    b, _ = train(CFG, x, presence, pairs, 30, 64, 3e-3)
    c, _ = train(dataclasses.replace(CFG, seed=1), x, presence, pairs, 30, 64, 3e-3)
    codes = assign_codes(a, x, presence, 100)
    np.testing.assert_array_equal(codes, assign_codes(b, x, presence, 100))
    assert (codes != assign_codes(c, x, presence, 100)).any()
    restored = restore_model(CFG, model_params(a))
    np.testing.assert_array_equal(codes, assign_codes(restored, x, presence, 100))
    with pytest.raises(ValueError, match="do not match"):
        restore_model(dataclasses.replace(CFG, latent_dim=4), model_params(a))


def test_no_codebook_collapse_on_clustered_data():
    x, presence, labels = blobs(512, 32)
    model, history = train(dataclasses.replace(CFG, codebook_sizes=(32, 8, 4)), x, presence,
                           np.zeros((0, 2), np.int64), 200, 128, 3e-3)
    codes = assign_codes(model, x, presence, 128)
    assert len(set(codes[:, 0])) / 32 > 0.5
    assert len({tuple(c) for c in codes}) > 32
    assert np.isfinite(history[-1]["loss"])


def test_dead_codes_are_revived():
    x, presence, _ = blobs(256)
    model = RQVAE(CFG, nnx.Rngs(0))
    first = model.codebooks[0]
    first[...] = first[...].at[1:].set(1e6)  # every item picks code 0: 15 dead codes
    assert reset_dead_codes(model, x, presence, seed=0) >= 15
    assert len(set(assign_codes(model, x, presence, 64)[:, 0])) > 1


def test_an_item_missing_a_modality_still_gets_codes():
    x, presence, _ = blobs(64)
    presence[:10, 1] = 0
    x[:10, 12:] = np.nan  # whatever is there must not matter
    x = np.nan_to_num(x, nan=123.0)
    model = RQVAE(CFG, nnx.Rngs(0))
    codes = assign_codes(model, x, presence, 32)
    x2 = x.copy()
    x2[:10, 12:] = -7.0
    np.testing.assert_array_equal(codes[:10], assign_codes(model, x2, presence, 32)[:10])
    # Control: for items that have the modality, the same change does move codes.
    x3 = x.copy()
    x3[10:, 12:] = -7.0
    assert (assign_codes(model, x3, presence, 32)[10:] != codes[10:]).any(axis=1).sum() > 5


def test_default_codebooks_fit_the_catalogue_size():
    from tokenizer.rqvae import default_codebook_sizes

    assert default_codebook_sizes(1_682) == (256, 128, 64, 32)  # MovieLens-100K
    assert default_codebook_sizes(12_101) == (1024, 512, 256, 128)  # Amazon Beauty
    assert default_codebook_sizes(10_000_000) == (2048, 1024, 512, 256)  # the paper's sizes, at most
    assert default_codebook_sizes(50, levels=6)[-1] == 16
    with pytest.raises(ValueError):
        default_codebook_sizes(0)
