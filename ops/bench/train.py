"""`plum bench train`: training tokens/s and model FLOPs utilisation (MFU) of the SFT step that the
quality rows train.

The step is the one `plum bench quality`'s PLUM rows run in SFT: `TrainLoop` with the SID-position
loss (each target SID token's softmax over its own position's tokens, computed per level at the
strided positions that predict it: `trainer.train.strided_sid_loss`), bench quality's residual
dropout and weight decay (`SFT_RECIPE`), on batches from `trainer.data.sft_batches`, the quality
rows' batch builder, with reward sampling. The data are synthetic but shaped like the quality
rows' Amazon Beauty data: Amazon Beauty's catalogue size and SID shape (codebooks 1024/512/256/128
from `default_codebook_sizes(12,101)`, 4 collision-suffix tokens), text rows filling the rest of
`--vocab` (9,801 is Beauty's vocabulary exactly), one click reward (every target kept, as on
Beauty), and every window as many items as `--length` holds (at most the protocol's 21), so every
batch has one padded length and the step compiles once. Token values do not change the work.

FLOPs: the analytic model FLOPs of the step (`sft_step_flops`: forward + backward matmuls at 2
FLOPs per multiply-add, PaLM's MFU count) are the numerator; XLA's cost analysis of the compiled
step (which also counts element-wise work, the optimizer and the dropout masks) is reported beside
it. Two peaks, both in the result:
- measured: the best of several float32 matmuls of `--peak-size` square matrices in the same run,
  what this machine's matrix unit does right now (the machine is shared and noisy);
- nominal: cores x clock x float32 FLOPs per cycle of the vector unit, from /proc/cpuinfo
  (`nominal_peak`, which records its assumptions and says where the clock is not readable).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import click
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ops.bench import SFT_RECIPE
from ops.bench.protocol import MAX_HISTORY
from ops.bench.report import machine, update_benchmarks_table, write_result
from ops.errors import PlumError
from tokenizer.rqvae import default_codebook_sizes
from trainer.data import RewardedSequences, prefix_length, sft_batches
from trainer.model import DECODER_SIZES, Decoder, DecoderConfig
from trainer.retrieval import make_catalogue
from trainer.train import OptimConfig, TrainLoop, sid_phase, train_step
from trainer.vocab import VocabLayout

BEAUTY_ITEMS = 12_101  # Amazon Beauty's catalogue: the quality rows' largest SID vocabulary
BEAUTY_SUFFIX = 4  # collision-suffix tokens of its SID table in the quality rows (quality.json)
CPUINFO = Path("/proc/cpuinfo")
CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")


def matmul_peak(size: int, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a [size, size] @ [size, size] matmul."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def _cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def flops_per_cycle(info: dict[str, str]) -> tuple[int | None, str]:
    """float32 FLOPs per cycle of one core's vector unit (an FMA counts 2), and the rule applied.
    /proc/cpuinfo names the instruction sets, not the execution units, so each rule assumes a unit count."""
    flags = set(info.get("flags", "").split())
    amd = info.get("vendor_id") == "AuthenticAMD"
    family = int(info.get("cpu family", "0") or 0)
    model = int(info.get("model", "0") or 0)
    if "avx512f" in flags:
        if amd and family == 25:
            return 32, "AVX-512 on AMD Zen 4 (family 25): 512-bit FMAs on two 256-bit pipes, 2 x 8 lanes x 2"
        return 64, "AVX-512: two 512-bit FMA units assumed, 2 x 16 lanes x 2 (parts with one unit have half)"
    if {"avx2", "fma"} <= flags:
        if amd and family == 23 and model < 0x30:
            return 16, "AVX2 + FMA on AMD Zen 1 (family 23, model < 0x30): two 128-bit FMA pipes, 2 x 4 lanes x 2"
        return 32, "AVX2 + FMA: two 256-bit FMA units assumed, 2 x 8 lanes x 2"
    if "avx" in flags:
        return 16, "AVX without FMA: one 256-bit add and one 256-bit multiply per cycle, 8 + 8"
    if "sse2" in flags:
        return 8, "SSE2: one 128-bit add and one 128-bit multiply per cycle, 4 + 4"
    return None, "no known x86 vector extension in /proc/cpuinfo flags"


def clock_hz(info: dict[str, str], cpufreq: Path = CPUFREQ) -> tuple[float | None, str]:
    """The nominal clock and where it was read: the base clock in the model name ("@ 2.40GHz"), the
    kernel's cpufreq base frequency, else "cpu MHz" of /proc/cpuinfo (the kernel's figure; on a
    virtual machine usually the host's base clock, and boost above it is not visible)."""
    named = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if named:
        return float(named.group(1)) * 1e9, f"model name {info['model name']!r}"
    base = cpufreq / "base_frequency"
    if base.is_file():
        return float(base.read_text()) * 1e3, str(base)
    if info.get("cpu MHz"):
        return float(info["cpu MHz"]) * 1e6, "/proc/cpuinfo cpu MHz (the kernel's figure; boost clocks not visible)"
    return None, "not readable: no clock in the model name, no cpufreq base_frequency, no cpu MHz"


def nominal_peak(cpuinfo: Path = CPUINFO, cpufreq: Path = CPUFREQ) -> dict[str, Any]:
    """Nominal float32 peak of the CPUs this process may run on: cores x clock x FLOPs per cycle.
    Cores: the CPUs in this process's affinity mask, divided by the hardware threads per core
    (siblings / cpu cores) where /proc/cpuinfo shows SMT; a virtual CPU otherwise counts as a core.
    `flops_per_s` is None, with the reason, where a factor is not readable."""
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.is_file():
        return {"flops_per_s": None, "unreadable": f"no x86 /proc/cpuinfo on {platform.machine()}"}
    info = _cpuinfo(cpuinfo.read_text())
    cpus = len(os.sched_getaffinity(0))
    threads = max(1, int(info.get("siblings", 1) or 1) // max(1, int(info.get("cpu cores", 1) or 1)))
    cores = max(1, cpus // threads)
    per_cycle, unit = flops_per_cycle(info)
    clock, source = clock_hz(info, cpufreq)
    peak = cores * clock * per_cycle if clock and per_cycle else None
    return {"flops_per_s": peak, "cores": cores, "cpus_in_affinity": cpus, "threads_per_core": threads,
            "clock_hz": clock, "clock_source": source, "flops_per_cycle": per_cycle, "vector_unit": unit,
            "cpu": info.get("model name"), "vendor": info.get("vendor_id"), "cpu_family": info.get("cpu family"),
            "cpu_model": info.get("model"),
            **({} if peak else {"unreadable": source if not clock else unit})}


def beauty_layout(vocab: int) -> VocabLayout:
    """Amazon Beauty's SID shape in the quality rows, with text rows filling the vocabulary to `vocab`."""
    sid_only = VocabLayout(default_codebook_sizes(BEAUTY_ITEMS), BEAUTY_SUFFIX)
    if vocab < sid_only.size:
        raise PlumError(f"--vocab {vocab} is smaller than Amazon Beauty's SID vocabulary ({sid_only.size} rows of "
                        f"specials, SID and reward tokens); give at least {sid_only.size} (9801 is Beauty's exactly).")
    return VocabLayout(sid_only.codebook_sizes, BEAUTY_SUFFIX, text_ids=tuple(range(vocab - sid_only.size)))


def window_items(layout: VocabLayout, length: int) -> int:
    """Items of the longest SFT window that fits `length` tokens (at most the protocol's history + 1)."""
    items = min(MAX_HISTORY + 1, (length - prefix_length(layout)) // (layout.sid_depth + 1))
    if items < 2:
        raise PlumError(f"--length {length} does not hold an SFT window of two items "
                        f"({prefix_length(layout) + 2 * (layout.sid_depth + 1)} tokens); give a longer length.")
    return items


def sft_data(layout: VocabLayout, batch: int, length: int, steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`steps` SFT batches from `sft_batches` over a random catalogue of Beauty's size in `layout` and
    random users whose sequences are one window of `window_items` items, all padded to `length`."""
    rng = np.random.default_rng(seed)
    sids = np.stack([rng.integers(size, size=BEAUTY_ITEMS) for size in layout.codebook_sizes]
                    + [np.zeros(BEAUTY_ITEMS, np.int64)], axis=1)
    catalogue = make_catalogue(layout, sids, [[] for _ in range(BEAUTY_ITEMS)])
    items = window_items(layout, length)
    users = 4 * batch
    sequences = RewardedSequences(tuple(rng.integers(BEAUTY_ITEMS, size=items) for _ in range(users)),
                                  tuple(np.ones(items, np.float32) for _ in range(users)))
    batches = sft_batches(layout, catalogue, sequences, batch, MAX_HISTORY, (length,), rng)
    return [next(batches) for _ in range(steps)]


def sft_step_flops(cfg: DecoderConfig, layout: VocabLayout, batch: int, length: int, phase: int) -> int:
    """Model FLOPs of one SFT step on [batch, length] tokens whose targets follow `phase`: forward and
    backward (3x the forward's) matmuls, 2 FLOPs per multiply-add, every position computed (padding
    too). Per position and layer 2 x (q, k, v, o and SwiGLU weights) plus 4 x width x length for the
    attention scores and the weighted values (every key slot, as the model computes them); the head
    multiplies each SID position's rows only at the positions that predict it (`strided_sid_loss`).
    Element-wise work, the optimizer and the dropout masks are not model FLOPs. Dense feed-forward only."""
    if cfg.moe_experts:
        raise ValueError("sft_step_flops counts a dense SwiGLU feed-forward; this config has experts")
    weights = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim
    attention = 2 * cfg.n_heads * cfg.head_dim * length
    blocks = cfg.n_layers * (2 * weights + 2 * attention) * batch * length
    stride = layout.sid_depth + 1
    head = sum(2 * batch * cfg.dim * width * len(range((phase + level) % stride, length - 1, stride))
               for level, (_, width) in enumerate(layout.sid_levels))
    return 3 * (blocks + head)


def measure(cfg: DecoderConfig, layout: VocabLayout, batch: int, length: int, steps: int) -> dict[str, Any]:
    """Time `steps` SFT steps (after one that compiles) and count the step's FLOPs analytically and by XLA."""
    data = sft_data(layout, batch, length, steps + 1)
    dropout, weight_decay = SFT_RECIPE["dropout"], SFT_RECIPE["weight_decay"]
    loop = TrainLoop(Decoder(cfg, nnx.Rngs(0)), OptimConfig(warmup_steps=0, total_steps=steps + 2,
                                                            weight_decay=weight_decay),
                     dropout=dropout, sid_levels=layout.sid_levels)
    phase = sid_phase(data[0]["tokens"], data[0]["weights"], layout.sid_levels)
    if phase is None:
        raise RuntimeError("the SFT batches' targets do not follow one SID phase: the step would not be strided")
    step = jax.jit(functools.partial(train_step, dropout_rate=dropout, sid_levels=loop.sid_levels),
                   static_argnums=0, static_argnames="sid_phase")
    key = jax.random.key(0) if dropout > 0 else None
    cost = step.lower(loop.graphdef, loop.state, {k: jnp.asarray(v) for k, v in data[0].items()}, key,
                      sid_phase=phase).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    loop.step(data[0])  # compile
    started = time.perf_counter()
    for timed in data[1:]:
        metrics = loop.step(timed)
    seconds = (time.perf_counter() - started) / steps
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(loop.model(), nnx.Param)))
    analytic = sft_step_flops(cfg, layout, batch, length, phase)
    xla = float(cost.get("flops", 0.0)) if cost else None
    return {"config": {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                                     "ffn_dim", "moe_experts")},
            "params": params, "batch": batch, "length": length,
            "step": {"loss": "SID-position softmax per level at the strided positions (strided_sid_loss)",
                     "sid_phase": phase, "items_per_window": window_items(layout, length),
                     "real_token_share": round(float(np.mean([d["mask"].mean() for d in data])), 4),
                     "target_tokens_per_batch": round(float(np.mean([d["weights"].sum() for d in data])), 1),
                     "dropout": dropout, "weight_decay": weight_decay},
            "step_seconds": seconds, "tokens_per_s": batch * length / seconds,
            "analytic_flops_per_step": analytic, "xla_flops_per_step": xla,
            "xla_over_analytic": round(xla / analytic, 4) if xla else None,
            "achieved_flops_per_s": analytic / seconds, "final_loss": metrics["loss"]}


def run(sizes: tuple[str, ...], vocab: int, batch: int, length: int, steps: int, peak_size: int,
        output: str | None, smollm2_layers: int = 2) -> dict[str, Any]:
    backend = jax.default_backend()
    layout = beauty_layout(vocab)
    window_items(layout, length)  # a length too short is refused before anything is timed
    peak = matmul_peak(peak_size)
    nominal = nominal_peak() if backend == "cpu" else {"flops_per_s": None, "unreadable": f"backend {backend}"}
    click.echo(f"bench train: {backend} matmul peak {peak / 1e9:,.1f} GFLOP/s ({peak_size}x{peak_size} float32); "
               + (f"nominal {nominal['flops_per_s'] / 1e9:,.1f} GFLOP/s ({nominal['cores']} cores x "
                  f"{nominal['clock_hz'] / 1e9:.3g} GHz x {nominal['flops_per_cycle']} FLOP/cycle)"
                  if nominal["flops_per_s"] else f"nominal peak unknown: {nominal['unreadable']}"))
    rows = []
    for size in sizes:
        cfg = DECODER_SIZES[size].replace(vocab_size=vocab)
        if size == "smollm2-135m":
            cfg = cfg.replace(n_layers=smollm2_layers)
        row = {"size": size, **measure(cfg, layout, batch, length, steps)}
        row["mfu_vs_matmul"] = row["achieved_flops_per_s"] / peak
        row["mfu_vs_nominal"] = row["achieved_flops_per_s"] / nominal["flops_per_s"] if nominal["flops_per_s"] else None
        rows.append(row)
        click.echo(f"bench train: {size}: {row['params']:,} params, {row['tokens_per_s']:,.0f} tokens/s, "
                   f"{row['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s, MFU {row['mfu_vs_matmul']:.1%} of the matmul "
                   f"peak" + (f", {row['mfu_vs_nominal']:.1%} of nominal" if row["mfu_vs_nominal"] else ""))
    command = ("plum bench train" + "".join(f" --size {s}" for s in sizes)
               + f" --vocab {vocab} --batch {batch} --length {length} --steps {steps} --peak-size {peak_size}"
               + (f" --smollm2-layers {smollm2_layers}" if "smollm2-135m" in sizes else ""))
    report = {"benchmark": "train", "command": command, "machine": {**machine(), "backend": backend,
              "devices": [str(d) for d in jax.devices()]}, "matmul_peak_flops_per_s": peak,
              "nominal_peak": nominal,
              "sid_shape": {"codebook_sizes": list(layout.codebook_sizes), "suffix_size": layout.suffix_size,
                            "vocabulary": layout.size, "catalogue_items": BEAUTY_ITEMS},
              "rows": rows, "target": "MFU >= 0.30 on this CPU"}
    name = "train" if backend == "cpu" else f"train-{backend}"
    path = write_result(name, report, output)
    if output is None:
        update_benchmarks_table(name, readme_table(report))
    click.echo(f"bench train: wrote {path}")
    return report


def _share(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "unknown"


def readme_table(report: dict[str, Any]) -> str:
    nominal = report["nominal_peak"]
    lines = ["| model | layers x width | params | batch x length | tokens/s | achieved GFLOP/s | "
             "matmul peak GFLOP/s | MFU vs matmul | nominal peak GFLOP/s | MFU vs nominal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peak = report["matmul_peak_flops_per_s"] / 1e9
    nominal_cell = f"{nominal['flops_per_s'] / 1e9:,.1f}" if nominal["flops_per_s"] else "unknown"
    for row in report["rows"]:
        lines.append(f"| {row['size']} | {row['config']['n_layers']} x {row['config']['dim']} | {row['params']:,} | "
                     f"{row['batch']} x {row['length']} | "
                     f"{row['tokens_per_s']:,.0f} | {row['achieved_flops_per_s'] / 1e9:,.1f} | {peak:,.1f} | "
                     f"{_share(row['mfu_vs_matmul'])} | {nominal_cell} | {_share(row['mfu_vs_nominal'])} |")
    shape = report["sid_shape"]
    lines.append(f"\nThe SFT step of the quality rows (SID-position loss, strided; dropout and weight decay of the "
                 f"recipe) on synthetic batches shaped like Amazon Beauty's: codebooks "
                 f"{'/'.join(map(str, shape['codebook_sizes']))} + {shape['suffix_size']} suffix tokens, vocabulary "
                 f"{shape['vocabulary']:,}. Achieved: analytic model FLOPs per step / step time (XLA's count of the "
                 f"compiled step is {', '.join(str(r['xla_over_analytic']) for r in report['rows'])} times it, "
                 f"element-wise work and the optimizer included).")
    if nominal["flops_per_s"]:
        lines.append(f"Nominal peak: {nominal['cores']} cores x {nominal['clock_hz'] / 1e9:.3g} GHz "
                     f"({nominal['clock_source']}) x {nominal['flops_per_cycle']} float32 FLOP/cycle "
                     f"({nominal['vector_unit']}).")
        if report["matmul_peak_flops_per_s"] > nominal["flops_per_s"]:
            lines.append(f"The measured matmul rate is {report['matmul_peak_flops_per_s'] / nominal['flops_per_s']:.2f} "
                         f"times this nominal peak, which cannot be: the clock read is below the one the cores "
                         f"run at (boost, not visible here), so MFU vs nominal overstates and MFU vs matmul is "
                         f"the firmer figure.")
    else:
        lines.append(f"Nominal peak unknown: {nominal['unreadable']}.")
    lines.append(f"Measured {report['machine']['measured_at']} on {report['machine']['backend']} "
                 f"(commit {report['machine']['commit']}) with `{report['command']}`.")
    return "\n".join(lines) + "\n"
