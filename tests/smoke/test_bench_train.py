"""`plum bench train` times the quality rows' SFT step against a matmul peak of the same run and the
CPU's nominal peak (tiny budget); its FLOP count is checked against XLA's count of the step the
trainer itself compiles."""

from __future__ import annotations

import json
import os
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from ops.bench.train import nominal_peak
from ops.cli import cli
from trainer.data import Catalogue, RewardedSequences, sft_batches
from trainer.model import Decoder, DecoderConfig
from trainer.train import OptimConfig, TrainLoop, sid_phase
from trainer.vocab import VocabLayout

pytestmark = pytest.mark.smoke


def xla_flops_of_the_trainers_sft_step(cfg: DecoderConfig, layout: VocabLayout, batch: int, length: int,
                                       items: int, dropout: float) -> float:
    """XLA's cost analysis of the step `TrainLoop.step` runs (its own jitted function) on an SFT batch
    of windows of `items` items padded to `length`, built here from random item SIDs."""
    rng = np.random.default_rng(1)
    sids = np.array([layout.sid_tokens([*(int(rng.integers(w)) for w in layout.codebook_sizes), 0])
                     for _ in range(50)], np.int32)
    sequences = RewardedSequences(tuple(rng.integers(50, size=items) for _ in range(batch)),
                                  tuple(np.ones(items, np.float32) for _ in range(batch)))
    data = next(sft_batches(layout, Catalogue(sids, tuple(() for _ in sids)), sequences, batch, 20, (length,), rng))
    loop = TrainLoop(Decoder(cfg, nnx.Rngs(0)), OptimConfig(warmup_steps=0), dropout=dropout,
                     sid_levels=layout.sid_levels)
    phase = sid_phase(data["tokens"], data["weights"], layout.sid_levels)
    key = jax.random.key(0) if dropout > 0 else None
    compiled = loop._step.lower(loop.graphdef, loop.state, {k: jnp.asarray(v) for k, v in data.items()}, key,
                                sid_phase=phase).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_bench_train_times_the_sft_step_and_counts_its_flops_as_xla_does(tmp_path):
    out = tmp_path / "train.json"
    args = ["bench", "train", "--size", "tiny", "--vocab", "2048", "--batch", "8", "--length", "128", "--steps", "2",
            "--peak-size", "256"]
    result = CliRunner().invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert row["size"] == "tiny" and row["config"]["vocab_size"] == 2048 and row["batch"] == 8 and row["length"] == 128
    assert row["step"]["items_per_window"] == 21 and row["step"]["real_token_share"] == 1.0  # 2 + 21 x 6 tokens
    assert row["tokens_per_s"] == pytest.approx(8 * 128 / row["step_seconds"])

    # The step's FLOPs: XLA's count of the trainer's own compiled SFT step, taken here, equals the
    # bench's; the bench's analytic model FLOPs are at most that (XLA adds element-wise work, the
    # optimizer, dropout masks) and within a quarter of it. A CPT step (full-vocabulary head) or the
    # unstrided SID loss would count about twice the analytic figure.
    shape = report["sid_shape"]
    sid_rows = VocabLayout(tuple(shape["codebook_sizes"]), shape["suffix_size"]).size
    layout = VocabLayout(tuple(shape["codebook_sizes"]), shape["suffix_size"], text_ids=tuple(range(2048 - sid_rows)))
    assert layout.size == shape["vocabulary"] == 2048
    xla = xla_flops_of_the_trainers_sft_step(DecoderConfig(**row["config"]), layout, 8, 128, 21, row["step"]["dropout"])
    assert row["xla_flops_per_step"] == pytest.approx(xla, rel=1e-6)
    assert row["analytic_flops_per_step"] <= xla <= 1.25 * row["analytic_flops_per_step"]

    # Achieved FLOP/s against both peaks; the nominal peak of this x86 machine is readable, and no
    # step runs faster than it.
    assert row["achieved_flops_per_s"] == pytest.approx(row["analytic_flops_per_step"] / row["step_seconds"])
    assert row["mfu_vs_matmul"] == pytest.approx(row["achieved_flops_per_s"] / report["matmul_peak_flops_per_s"])
    nominal = report["nominal_peak"]
    assert nominal["flops_per_s"] == pytest.approx(nominal["cores"] * nominal["clock_hz"] * nominal["flops_per_cycle"])
    assert nominal["cores"] <= len(os.sched_getaffinity(0)) and nominal["flops_per_cycle"] in (8, 16, 32, 64)
    assert 0.5e9 < nominal["clock_hz"] < 6e9
    assert row["mfu_vs_nominal"] == pytest.approx(row["achieved_flops_per_s"] / nominal["flops_per_s"])
    assert row["achieved_flops_per_s"] < nominal["flops_per_s"]
    assert shlex.split(report["command"]) == ["plum", *args]  # the recorded command repeats this run


def test_bench_train_refuses_a_vocabulary_without_room_for_the_sids():
    result = CliRunner().invoke(cli, ["bench", "train", "--size", "tiny", "--vocab", "64"])
    assert result.exit_code == 2 and "--vocab 64" in result.output and "Traceback" not in result.output


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: {model}
model name\t: {name}
{mhz}siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse2 {flags}

processor\t: 1
vendor_id\t: {vendor}
"""


@pytest.mark.parametrize("fields, per_cycle, clock", [
    ({"vendor": "GenuineIntel", "family": 6, "model": 85, "name": "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz",
      "mhz": "cpu MHz\t\t: 3000.0\n", "flags": "avx avx2 fma avx512f"}, 64, 2.4e9),
    ({"vendor": "AuthenticAMD", "family": 25, "model": 17, "name": "AMD EPYC", "mhz": "cpu MHz\t\t: 2596.144\n",
      "flags": "avx avx2 fma avx512f"}, 32, 2.596144e9),
    ({"vendor": "AuthenticAMD", "family": 26, "model": 2, "name": "AMD EPYC", "mhz": "cpu MHz\t\t: 2600.0\n",
      "flags": "avx avx2 fma avx512f"}, 64, 2.6e9),
    ({"vendor": "AuthenticAMD", "family": 23, "model": 49, "name": "AMD EPYC 7B12", "mhz": "cpu MHz\t\t: 2250.0\n",
      "flags": "avx avx2 fma"}, 32, 2.25e9),
])
def test_nominal_peak_reads_cores_clock_and_vector_unit_from_cpuinfo(tmp_path, fields, per_cycle, clock):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(**fields))
    peak = nominal_peak(cpuinfo, cpufreq=tmp_path)
    threads = 2  # siblings 2 per 1 core: SMT, so two CPUs of the affinity mask are one core
    cores = max(1, len(os.sched_getaffinity(0)) // threads)
    assert (peak["flops_per_cycle"], peak["clock_hz"], peak["threads_per_core"]) == (per_cycle, clock, threads)
    assert peak["flops_per_s"] == pytest.approx(cores * clock * per_cycle)


def test_nominal_peak_says_when_the_clock_is_not_readable(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor="AuthenticAMD", family=25, model=17, name="AMD EPYC", mhz="",
                                      flags="avx avx2 fma avx512f"))
    peak = nominal_peak(cpuinfo, cpufreq=tmp_path)  # no cpufreq base_frequency there either
    assert peak["flops_per_s"] is None and peak["flops_per_cycle"] == 32
    assert "not readable" in peak["unreadable"] and peak["clock_hz"] is None
