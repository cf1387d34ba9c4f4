"""`plum bench train`: training tokens/s and model FLOPs utilisation (MFU) of the shared train step.

The peak is measured in the same run: the best of several float32 matmuls of `--peak-size`
square matrices, so MFU compares the step with what this machine's matrix unit does right now
(the machine is shared and noisy). Model FLOPs per step come from XLA's cost analysis of the
compiled step (forward + backward + optimizer, as XLA counts them); the analytic 6 * params *
tokens + attention estimate is reported beside it.
"""

from __future__ import annotations

import time
from typing import Any

import click
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ops.bench.report import machine, update_readme_table, write_result
from trainer.model import DECODER_SIZES, Decoder, DecoderConfig
from trainer.train import OptimConfig, TrainLoop, train_step


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


def analytic_flops(cfg: DecoderConfig, batch: int, length: int) -> float:
    """6 * non-embedding params * tokens + attention (12 * layers * dim * length per token) + the head."""
    per_layer = (cfg.dim * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
                 + 3 * cfg.dim * cfg.ffn_dim * max(1, cfg.moe_top_k if cfg.moe_experts else 1))
    tokens = batch * length
    return (6 * cfg.n_layers * per_layer * tokens + 12 * cfg.n_layers * cfg.dim * length * tokens
            + 6 * cfg.dim * cfg.vocab_size * tokens)


def measure(cfg: DecoderConfig, batch: int, length: int, steps: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    data = {"tokens": rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32),
            "mask": np.ones((batch, length), bool), "weights": np.ones((batch, length), np.float32)}
    loop = TrainLoop(Decoder(cfg, nnx.Rngs(0)), OptimConfig(warmup_steps=0, total_steps=steps + 2))
    compiled = jax.jit(train_step, static_argnums=0).lower(loop.graphdef, loop.state, data).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    loop.step(data)  # compile
    started = time.perf_counter()
    for _ in range(steps):
        metrics = loop.step(data)
    seconds = (time.perf_counter() - started) / steps
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(loop.model(), nnx.Param)))
    return {"config": {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                                     "ffn_dim", "moe_experts")},
            "params": params, "batch": batch, "length": length, "step_seconds": seconds,
            "tokens_per_s": batch * length / seconds, "xla_flops_per_step": xla_flops,
            "analytic_flops_per_step": analytic_flops(cfg, batch, length), "final_loss": metrics["loss"]}


def run(sizes: tuple[str, ...], vocab: int, batch: int, length: int, steps: int, peak_size: int,
        output: str | None, smollm2_layers: int = 2) -> dict[str, Any]:
    backend = jax.default_backend()
    peak = matmul_peak(peak_size)
    click.echo(f"bench train: {backend} matmul peak {peak / 1e9:,.1f} GFLOP/s ({peak_size}x{peak_size} float32)")
    rows = []
    for size in sizes:
        cfg = DECODER_SIZES[size].replace(vocab_size=vocab)
        if size == "smollm2-135m":
            cfg = cfg.replace(n_layers=smollm2_layers)
        row = {"size": size, **measure(cfg, batch, length, steps)}
        flops = row["xla_flops_per_step"] or row["analytic_flops_per_step"]
        row["achieved_flops_per_s"] = flops / row["step_seconds"]
        row["mfu"] = row["achieved_flops_per_s"] / peak
        rows.append(row)
        click.echo(f"bench train: {size}: {row['params']:,} params, {row['tokens_per_s']:,.0f} tokens/s, "
                   f"{row['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s, MFU {row['mfu']:.1%}")
    command = ("plum bench train" + "".join(f" --size {s}" for s in sizes)
               + f" --vocab {vocab} --batch {batch} --length {length} --steps {steps} --peak-size {peak_size}"
               + (f" --smollm2-layers {smollm2_layers}" if "smollm2-135m" in sizes else ""))
    report = {"benchmark": "train", "command": command, "machine": {**machine(), "backend": backend,
              "devices": [str(d) for d in jax.devices()]}, "matmul_peak_flops_per_s": peak, "rows": rows,
              "target": "MFU >= 0.30 on this CPU"}
    name = "train" if backend == "cpu" else f"train-{backend}"
    path = write_result(name, report, output)
    if output is None:
        update_readme_table(name, readme_table(report))
    click.echo(f"bench train: wrote {path}")
    return report


def readme_table(report: dict[str, Any]) -> str:
    lines = ["| model | layers x width | params | batch x length | tokens/s | achieved GFLOP/s | matmul peak GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    peak = report["matmul_peak_flops_per_s"] / 1e9
    for row in report["rows"]:
        lines.append(f"| {row['size']} | {row['config']['n_layers']} x {row['config']['dim']} | {row['params']:,} | "
                     f"{row['batch']} x {row['length']} | "
                     f"{row['tokens_per_s']:,.0f} | {row['achieved_flops_per_s'] / 1e9:,.1f} | {peak:,.1f} | "
                     f"{row['mfu']:.1%} |")
    lines.append(f"\nMeasured {report['machine']['measured_at']} on {report['machine']['backend']} "
                 f"(commit {report['machine']['commit']}) with `{report['command']}`.")
    return "\n".join(lines) + "\n"
