"""`plum bench serve`: the serving tier under load, with SASRec served by the same server as the reference.

One run, one temporary state directory:
1. models: MovieLens-100K under the standard split (ops/bench/protocol.py); SIDs from the tokenizer's
   fit job; a PLUM decoder of a named size with a short SFT (for latency the weights' size matters,
   not their quality) exported as version 1 of model `plum`; SASRec trained on the same split and
   exported as version 1 of model `sasrec` (manifest kind sasrec-dot: a dot-product top-K over its
   item embeddings, what a user would otherwise deploy);
2. features: a Feast repo applied in the state directory and every user's training history (the
   last 50 items, as the pipeline keeps them) pushed to the online store;
3. load: `plum serve` in its own process; C client threads in this process, each a closed loop of
   single-user Predict calls (k=10, a random known user) over gRPC for a fixed time; per level:
   requests/s, p50/p99 latency, failures; for PLUM (dynamic batching as configured) and SASRec;
   the largest level again on a server started with max_batch 1 (no batching);
4. hot swaps: at the swap concurrency, N times: export a copy of the served decoder (as the trainer
   does), wait until responses come from it and GetModelStatus shows the old version END; failed
   requests, and p99 of the requests overlapping a swap window against the rest;
5. profile: with no server running, where one request's time goes, in this process and at batch 1:
   the Feast online read, and the version's recommend (prompt build, beam search, item mapping).

The client threads share the machine's cores with the server: on a small machine they take CPU
from it, so the figures understate what the server alone would do.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click
import grpc
import jax
import numpy as np
import pandas as pd
from flax import nnx
from tensorflow_serving.apis import predict_pb2

from features import FeatureStoreClient
from ops.assets import fetch_asset, smollm2_gguf
from ops.bench.protocol import MAX_HISTORY, ProtocolData, catalogue_frame, prepare
from ops.bench.report import command_line, machine, update_benchmarks_table, write_result
from ops.config import PlumConfig
from ops.processes import ServerProcess, write_config
from ops.serving_client import K, ServingClient, predict_requests
from ops.status import scrape
from serving.batcher import resolve
from serving.config import ServingSettings
from serving.engine import Request, load_servable
from serving.metrics import PATH as METRICS_PATH
from serving.user_features import OnlineUserFeatures
from tokenizer.jobs import fit as fit_sids
from tokenizer.text_encoder import TextEncoder
from trainer.jobs import PROMPT_FORMAT
from trainer.retrieval import RetrievalSettings, init_model, make_catalogue, text_vocabulary, train_stages
from trainer.sasrec import SASRecConfig, train_sasrec
from trainer.servable import export_sasrec_version, export_version
from trainer.vocab import VocabLayout, suffix_capacity
from trainer.warm_start import TextTokenizer

DATASET = "movielens-100k"
PLUM, SASREC = "plum", "sasrec"  # model names under the bench's model base
ONLINE_HISTORY = 50  # items of a user's history the pipeline keeps online (features/repo.py)
WARM_UP_S = 2.0  # unrecorded load before a server's first level
SWAP_GAP_S = 3.0  # steady load before, between and after swaps: the samples outside swap windows
SWAP_TIMEOUT_S = 180.0
START_TIMEOUT_S = 300.0
PROFILE_REQUESTS = 50
TARGET_P99_MS_AT_1 = 50.0
TARGET_REQUESTS_PER_S_AT_32 = 100.0
TARGET_SWAPS = 10


@dataclasses.dataclass(frozen=True)
class ServeRun:
    """What one `plum bench serve` invocation builds and measures."""

    model_size: str = "small"
    sft_steps: int = 100
    sid_steps: int = 300
    sasrec_epochs: int = 5
    seconds: float = 20.0
    concurrency: tuple[int, ...] = (1, 8, 32)
    swaps: int = 10
    swap_concurrency: int = 8

    def command(self) -> str:
        return command_line("plum bench serve", self)


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderVersion:
    """What export_version needs to publish the decoder again (each hot swap does)."""

    model: Any
    manifest: dict[str, Any]
    item_ids: list[str]
    sids: np.ndarray

    def export(self, model_dir: Path) -> int:
        return int(export_version(model_dir, self.model, self.manifest, self.item_ids, self.sids).name)


# Models and features -----------------------------------------------------------------------------
def _parameters(model: Any) -> int:
    return sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build_decoder(cfg: PlumConfig, run: ServeRun, data: ProtocolData) -> tuple[DecoderVersion, dict[str, Any]]:
    """SIDs fitted on the catalogue, the vocabulary with the titles' text tokens, a short SFT."""
    started = time.monotonic()
    cache = Path(cfg.paths.cache_dir)
    encoder = TextEncoder(fetch_asset("minilm", cache), cache_path=cache / "text_embeddings.db")
    table, _ = fit_sids(cfg.paths.sid_dir, catalogue_frame(data.dataset), data.train_pairs, encoder,
                        cfg.tokenizer.model_copy(update={"steps": run.sid_steps}), say=lambda m: None)
    item_ids = [str(i) for i in data.sequences.item_ids]
    sids = np.array([table.sid(i) for i in item_ids], np.int64)
    tokenizer = TextTokenizer.from_gguf(smollm2_gguf(cfg.paths.cache_dir))
    titles = [tokenizer.encode(str(t)) if t else []
              for t in data.dataset.items.set_index("item_id").loc[item_ids, "title"]]
    layout = VocabLayout(tuple(table.codebook_sizes), suffix_capacity(table.suffix_size),
                         text_ids=text_vocabulary(titles))
    settings = RetrievalSettings(model_size=run.model_size, sft_steps=run.sft_steps, max_history=MAX_HISTORY,
                                 beam_width=cfg.serving.beam_width)
    model, histories = train_stages(init_model(settings, layout), settings, layout,
                                    make_catalogue(layout, sids, titles), data.train, say=click.echo)
    manifest = {"stage": "bench-serve", "vocabulary": layout.to_json(), "sid_version": table.version,
                "prompt_schema": {"format": PROMPT_FORMAT, "max_history": MAX_HISTORY, "features": []},
                "note": f"{run.sft_steps} SFT steps: a real model size and vocabulary, not trained to quality"}
    info = {"model_size": run.model_size, "model_config": dataclasses.asdict(model.cfg),
            "parameters": _parameters(model), "vocabulary_tokens": layout.size, "text_tokens": len(layout.text_ids),
            "sid_codebooks": list(table.codebook_sizes), "sid_depth": layout.sid_depth,
            "sid_uniqueness_before_suffix": table.metrics["uniqueness_before_suffix"],
            "sft_steps": run.sft_steps, "final_sft_loss": histories["sft"][-1]["loss"],
            "train_seconds": round(time.monotonic() - started, 1)}
    click.echo(f"bench serve: PLUM decoder ({run.model_size}, {info['parameters']:,} parameters, vocabulary "
               f"{layout.size:,} tokens, {len(item_ids):,} items) ready in {info['train_seconds']:.0f} s")
    return DecoderVersion(model, manifest, item_ids, sids), info


def build_sasrec(model_dir: Path, run: ServeRun, data: ProtocolData) -> dict[str, Any]:
    """SASRec on the same split, exported as a sasrec-dot version."""
    started = time.monotonic()
    settings = SASRecConfig(n_items=data.split.n_items, max_len=MAX_HISTORY, epochs=run.sasrec_epochs,
                            eval_every=run.sasrec_epochs)
    model, _ = train_sasrec(data.split, settings)
    export_sasrec_version(model_dir, model, [str(i) for i in data.sequences.item_ids],
                          {"stage": "bench-serve", "note": f"{run.sasrec_epochs} epochs"})
    info = {"settings": dataclasses.asdict(settings), "parameters": _parameters(model),
            "train_seconds": round(time.monotonic() - started, 1)}
    click.echo(f"bench serve: SASRec ({info['parameters']:,} parameters) ready in {info['train_seconds']:.0f} s")
    return info


def history_frame(data: ProtocolData) -> pd.DataFrame:
    """Every user's training history as the pipeline keeps it online (view user_history)."""
    frame = data.dataset.interactions
    times = frame.groupby("user_id")["timestamp"].apply(lambda t: np.sort(t.to_numpy()).astype(np.int64))
    item_ids = data.sequences.item_ids
    rows = []
    for user, items, rewards in zip(data.sequences.user_ids, data.train.items, data.train.rewards):
        user_times = times[user][:len(items)]
        rows.append({"user_id": str(user),
                     "history_item_ids": [str(item_ids[i]) for i in items[-ONLINE_HISTORY:]],
                     "history_rewards": [float(r) for r in rewards[-ONLINE_HISTORY:]],
                     "history_times": [int(t) for t in user_times[-ONLINE_HISTORY:]],
                     "event_count": len(items),
                     "event_timestamp": pd.Timestamp(int(user_times[-1]), unit="s", tz="UTC")})
    return pd.DataFrame(rows)


# The server and the load ---------------------------------------------------------------------------
class BenchServer:
    """`plum serve` for one model name in its own process, on free ports, with gRPC stubs to it."""

    def __init__(self, cfg: PlumConfig, config_file: Path, model_name: str, label: str,
                 env: dict[str, str] | None = None) -> None:
        self.model_name, self.label = model_name, label
        self.process = ServerProcess(cfg, f"bench-serve-{re.sub(r'[^a-z0-9]+', '-', label)}.log",
                                     env={"PLUM_PATHS__MODEL_NAME": model_name, **(env or {})}, config_file=config_file)
        try:
            self.process.wait_ready(START_TIMEOUT_S)
        except BaseException:
            self.process.stop()
            raise
        self.start_seconds = self.process.start_seconds
        self.rest_url = self.process.rest_url  # None with REST off: no batch figures then
        self.client = ServingClient(self.process.grpc_target, model_name)
        self.predict = self.client.predict

    def log(self) -> str:
        return self.process.log()

    def states(self) -> dict[int, str]:
        return self.client.states()

    def batch_totals(self) -> dict[str, float]:
        """The server's own batch counters (its Prometheus metrics): batches, users, seconds per stage."""
        totals = {"batches": 0.0, "users": 0.0, "features_s": 0.0, "search_s": 0.0}
        if self.rest_url is None:
            return totals
        samples = scrape(self.rest_url + METRICS_PATH, timeout=10)
        totals["batches"] = samples.get(("plum_serving_batch_size_count", ()), 0.0)
        totals["users"] = samples.get(("plum_serving_batch_size_sum", ()), 0.0)
        for stage in ("features", "search"):
            totals[f"{stage}_s"] = samples.get(("plum_serving_batch_seconds_sum", (("stage", stage),)), 0.0)
        return totals

    def __enter__(self) -> "BenchServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.process.stop()


@dataclasses.dataclass(frozen=True)
class Sample:
    started: float  # time.perf_counter()
    seconds: float
    version: int  # 0 for a failed request

    @property
    def ended(self) -> float:
        return self.started + self.seconds


class LoadGenerator:
    """`clients` threads, each a closed loop of Predict calls with a random user's request, until stopped."""

    def __init__(self, server: BenchServer, requests: list[predict_pb2.PredictRequest], clients: int,
                 seed: int = 0) -> None:
        self.server, self.requests = server, requests
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.last_version = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed * 1000 + n,), daemon=True)
                         for n in range(clients)]
        self.started_at = 0.0

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            request = rng.choice(self.requests)
            started = time.perf_counter()
            try:
                response = self.server.predict.Predict(request, timeout=30)
                version = response.model_spec.version.value
                self.last_version = version
            except grpc.RpcError as exc:
                version = 0
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            self.samples.append(Sample(started, time.perf_counter() - started, version))

    def __enter__(self) -> "LoadGenerator":
        self.started_at = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def latency_figures(samples: list[Sample]) -> dict[str, Any]:
    ok = np.array([s.seconds for s in samples if s.version], np.float64) * 1000
    if not len(ok):
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {"p50_ms": round(float(np.percentile(ok, 50)), 2), "p99_ms": round(float(np.percentile(ok, 99)), 2),
            "mean_ms": round(float(ok.mean()), 2), "max_ms": round(float(ok.max()), 2)}


def measure_level(server: BenchServer, requests: list[predict_pb2.PredictRequest], clients: int,
                  seconds: float) -> dict[str, Any]:
    """Closed-loop load for `seconds`: throughput over the time until the last request ended; the server's
    mean batch and its time per batch (Feast read, search) over the same interval."""
    before = server.batch_totals()
    with LoadGenerator(server, requests, clients, seed=clients) as load:
        time.sleep(seconds)
    after = server.batch_totals()
    change = {name: after[name] - before[name] for name in after}
    batches = max(change["batches"], 1.0)
    samples = load.samples
    elapsed = max(s.ended for s in samples) - load.started_at if samples else seconds
    ok = sum(1 for s in samples if s.version)
    figures = {"clients": clients, "requests": ok, "failures": len(samples) - ok,
               "requests_per_s": round(ok / elapsed, 1), **latency_figures(samples),
               "errors": sorted(set(load.errors))[:5],
               "mean_batch": round(change["users"] / batches, 2),
               "features_ms_per_batch": round(change["features_s"] / batches * 1000, 2),
               "search_ms_per_batch": round(change["search_s"] / batches * 1000, 2)}
    click.echo(f"bench serve: {server.label} at {clients} clients: {figures['requests_per_s']} requests/s, "
               f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, {figures['failures']} failed; "
               f"mean batch {figures['mean_batch']}, search {figures['search_ms_per_batch']} ms per batch")
    return figures


def warm_up(server: BenchServer, requests: list[predict_pb2.PredictRequest], clients: int) -> None:
    with LoadGenerator(server, requests, clients, seed=99):
        time.sleep(WARM_UP_S)


def _wait(condition: Callable[[], bool], what: str, server: BenchServer) -> float:
    started = time.perf_counter()
    while not condition():
        server.process.check()
        if time.perf_counter() - started > SWAP_TIMEOUT_S:
            raise RuntimeError(f"timed out after {SWAP_TIMEOUT_S:.0f} s waiting for {what}; the server's log:\n"
                               + server.log()[-3000:])
        time.sleep(0.05)
    return time.perf_counter()


def measure_swaps(server: BenchServer, requests: list[predict_pb2.PredictRequest], clients: int, swaps: int,
                  decoder: DecoderVersion, model_dir: Path) -> dict[str, Any]:
    """Hot swaps under load: each exports a copy of the decoder, then waits for traffic to move and the
    old version to end. A swap window runs from the export's start to the old version's END."""
    windows, rows = [], []
    current = max(server.states())
    with LoadGenerator(server, requests, clients, seed=7) as load:
        time.sleep(SWAP_GAP_S)
        for n in range(1, swaps + 1):
            began = time.perf_counter()
            new = decoder.export(model_dir)
            exported = time.perf_counter()
            serving = _wait(lambda: load.last_version == new, f"responses from version {new}", server)
            ended = _wait(lambda: server.states().get(current) == "END", f"version {current} to end", server)
            windows.append((began, ended))
            rows.append({"from": current, "to": new, "export_s": round(exported - began, 2),
                         "first_response_after_s": round(serving - began, 2), "old_end_after_s": round(ended - began, 2)})
            click.echo(f"bench serve: swap {n}/{swaps}: version {current} -> {new}, traffic moved after "
                       f"{serving - began:.1f} s, version {current} END after {ended - began:.1f} s")
            current = new
            time.sleep(SWAP_GAP_S)
    samples = load.samples
    inside, outside = [], []
    for sample in samples:
        overlaps = any(sample.started < end and sample.ended > begin for begin, end in windows)
        (inside if overlaps else outside).append(sample)
    failed = sum(1 for s in samples if not s.version)
    return {"clients": clients, "swaps": rows, "requests": len(samples) - failed, "failed_requests": failed,
            "errors": sorted(set(load.errors))[:5],
            "inside_swap_windows": {"requests": len(inside), **latency_figures(inside)},
            "outside_swap_windows": {"requests": len(outside), **latency_figures(outside)},
            "versions_answering": sorted({s.version for s in samples if s.version})}


def profile_request(cfg: PlumConfig, model_name: str, user_ids: list[str]) -> dict[str, Any]:
    """Where one request's time goes, in this process with no server running, at batch 1: the Feast
    online read, then the version's recommend (prompt build, search, item mapping); medians in ms."""
    model_dir = cfg.paths.model_dir.parent / model_name
    servable = load_servable(model_dir, 1, cfg.serving.beam_width)
    servable.warm_up(1)
    features = OnlineUserFeatures(FeatureStoreClient(cfg.feast_repo_dir, cfg.feast))
    rng = random.Random(1)
    read, recommend = [], []
    for user in [rng.choice(user_ids) for _ in range(PROFILE_REQUESTS)]:
        started = time.perf_counter()
        requests, histories = resolve([Request(user, K)], features)
        read.append(time.perf_counter() - started)
        started = time.perf_counter()
        servable.recommend(requests, histories)
        recommend.append(time.perf_counter() - started)
    return {"requests": PROFILE_REQUESTS, "feast_read_p50_ms": round(float(np.median(read)) * 1000, 2),
            "recommend_p50_ms": round(float(np.median(recommend)) * 1000, 2)}


# The run ------------------------------------------------------------------------------------------------
def _serve_levels(server: BenchServer, requests: list[predict_pb2.PredictRequest], levels: tuple[int, ...],
                  seconds: float) -> list[dict[str, Any]]:
    warm_up(server, requests, max(levels))
    return [measure_level(server, requests, clients, seconds) for clients in levels]


def run(cfg: PlumConfig, serve_run: ServeRun, output: str | None = None) -> dict[str, Any]:
    """Build both models in a temporary state, measure them behind `plum serve`; write the JSON (and the
    table in docs/benchmarks.md for the default file)."""
    state = Path(tempfile.mkdtemp(prefix="plum-bench-serve-"))
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={
        "state_dir": str(state / "stack"), "model_base": "", "model_name": PLUM})})
    settings = cfg.serving
    levels = tuple(sorted(set(serve_run.concurrency)))
    facts = machine()
    started = time.monotonic()
    try:
        cfg.paths.state("logs").mkdir(parents=True, exist_ok=True)
        config_file = write_config(cfg, cfg.paths.state("bench-serve.yaml"))
        data = prepare(DATASET, cfg, MAX_HISTORY)
        decoder, plum_info = build_decoder(cfg, serve_run, data)
        decoder.export(cfg.paths.model_dir)
        sasrec_info = build_sasrec(cfg.paths.model_dir.parent / SASREC, serve_run, data)
        store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
        store.apply()
        store.push_online("user_history", history_frame(data))
        user_ids = [str(u) for u in data.sequences.user_ids]
        click.echo(f"bench serve: {len(user_ids):,} users' histories online; the client threads share the "
                   f"{facts['cpus']} CPUs with the server")

        plum_requests, sasrec_requests = predict_requests(PLUM, user_ids), predict_requests(SASREC, user_ids)
        with BenchServer(cfg, config_file, PLUM, "plum") as server:
            start_seconds = {PLUM: server.start_seconds}
            plum_levels = _serve_levels(server, plum_requests, levels, serve_run.seconds)
            swaps = measure_swaps(server, plum_requests, serve_run.swap_concurrency, serve_run.swaps, decoder,
                                  cfg.paths.model_dir)
        click.echo(f"bench serve: {serve_run.swaps} swaps: {swaps['failed_requests']} failed requests; p99 inside "
                   f"swap windows {swaps['inside_swap_windows']['p99_ms']} ms, outside "
                   f"{swaps['outside_swap_windows']['p99_ms']} ms")
        with BenchServer(cfg, config_file, PLUM, "plum, max_batch 1", env={"PLUM_SERVING__MAX_BATCH": "1"}) as server:
            unbatched = _serve_levels(server, plum_requests, (levels[-1],), serve_run.seconds)[0]
        with BenchServer(cfg, config_file, SASREC, "sasrec") as server:
            start_seconds[SASREC] = server.start_seconds
            sasrec_levels = _serve_levels(server, sasrec_requests, levels, serve_run.seconds)
        profile = {PLUM: profile_request(cfg, PLUM, user_ids), SASREC: profile_request(cfg, SASREC, user_ids)}
    finally:
        shutil.rmtree(state, ignore_errors=True)

    batched = plum_levels[-1]
    for name, rows in ((PLUM, plum_levels), (SASREC, sasrec_levels)):
        if (one := _level(rows, 1)) is not None:  # what the server adds: gRPC, batcher wait, tensors
            parts = profile[name]["feast_read_p50_ms"] + profile[name]["recommend_p50_ms"]
            profile[name]["rest_of_p50_at_1_ms"] = round(one["p50_ms"] - parts, 2)
    report = {
        "benchmark": "serve",
        "command": serving_overrides(settings) + serve_run.command(),
        "machine": facts,
        "note": f"the load generator's {max(levels)} client threads run on the same {facts['cpus']} CPUs as "
                "the server: they take CPU from it",
        "settings": {**dataclasses.asdict(serve_run), "dataset": DATASET, "k": K,
                     "beam_width": settings.beam_width, "max_batch": settings.max_batch,
                     "max_wait_ms": settings.max_wait_ms, "server_threads": settings.threads,
                     "poll_interval_s": settings.poll_interval_s, "items": len(decoder.item_ids),
                     "users": len(user_ids), "online_history": ONLINE_HISTORY,
                     "request": "one user per Predict over gRPC, a random known user, closed loop per client"},
        "models": {PLUM: plum_info, SASREC: sasrec_info},
        "server_start_s": start_seconds,
        "levels": {PLUM: plum_levels, SASREC: sasrec_levels},
        "batching": {"clients": levels[-1], "batched": batched, "unbatched": unbatched,
                     "throughput_ratio": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2)
                     if unbatched["requests_per_s"] else None},
        "swaps": swaps,
        "profile": profile,
        "seconds_total": round(time.monotonic() - started, 1),
    }
    report["targets"] = targets(report)
    path = write_result("serve", report, output)
    if output is None:  # docs/benchmarks.md shows the default result file, not ad-hoc runs
        update_benchmarks_table("serve", readme_table(report))
    click.echo("bench serve: targets: " + "; ".join(f"{t['target']}: {'met' if t['met'] else 'NOT met'}"
                                                    for t in report["targets"].values()))
    click.echo(f"bench serve: wrote {path}")
    return report


def serving_overrides(settings: ServingSettings) -> str:
    """The serving settings that differ from the defaults, as the environment that sets them."""
    defaults = ServingSettings()
    return "".join(f"PLUM_SERVING__{name.upper()}={getattr(settings, name)} "
                   for name in ("beam_width", "max_batch", "max_wait_ms", "threads", "poll_interval_s")
                   if getattr(settings, name) != getattr(defaults, name))


def _level(rows: list[dict[str, Any]], clients: int) -> dict[str, Any] | None:
    return next((row for row in rows if row["clients"] == clients), None)


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets for PLUM; a level that was not run is not met."""
    one, many = _level(report["levels"][PLUM], 1), _level(report["levels"][PLUM], 32)
    p99 = one["p99_ms"] if one else None
    rate = many["requests_per_s"] if many else None
    failed = report["swaps"]["failed_requests"]
    swaps = len(report["swaps"]["swaps"])
    return {"p99_at_1": {"target": f"p99 <= {TARGET_P99_MS_AT_1:g} ms at concurrency 1",
                         "value": "not run" if p99 is None else f"{p99} ms",
                         "met": p99 is not None and p99 <= TARGET_P99_MS_AT_1},
            "throughput_at_32": {"target": f">= {TARGET_REQUESTS_PER_S_AT_32:g} requests/s at concurrency 32",
                                 "value": "not run" if rate is None else f"{rate} requests/s",
                                 "met": rate is not None and rate >= TARGET_REQUESTS_PER_S_AT_32},
            "swap_failures": {"target": f"0 failed requests over {TARGET_SWAPS} hot swaps",
                              "value": f"{failed} failed over {swaps} swaps",
                              "met": failed == 0 and swaps >= TARGET_SWAPS}}


def _batch_cells(row: dict[str, Any]) -> str:
    if "mean_batch" not in row:
        return "n/a | n/a"
    return f"{row['mean_batch']} | {row['features_ms_per_batch']} / {row['search_ms_per_batch']}"


def readme_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = ["| model | clients | requests/s | p50 (ms) | p99 (ms) | failed | mean batch | ms per batch (Feast / search) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in ((PLUM, f"PLUM ({report['models'][PLUM]['model_size']} decoder, beam {s['beam_width']})"),
                        (SASREC, "SASRec dot-product top-K (reference)")):
        for row in report["levels"][name]:
            lines.append(f"| {label} | {row['clients']} | {row['requests_per_s']:,.1f} | {row['p50_ms']} | "
                         f"{row['p99_ms']} | {row['failures']} | {_batch_cells(row)} |")
    b, w, p = report["batching"], report["swaps"], report["profile"]
    u = b["unbatched"]
    lines.append(f"| PLUM, no batching (max_batch 1) | {u['clients']} | {u['requests_per_s']:,.1f} | {u['p50_ms']} | "
                 f"{u['p99_ms']} | {u['failures']} | {_batch_cells(u)} |")
    lines += ["", "| figure | value |", "|---|---|",
              f"| batching: throughput at {b['clients']} clients, max_batch {s['max_batch']} / max_batch 1 | "
              f"{b['throughput_ratio']}x |",
              f"| hot swaps under load ({w['clients']} clients) | {len(w['swaps'])} swaps, "
              f"{w['failed_requests']} failed of {w['requests'] + w['failed_requests']:,} requests |",
              f"| p99 inside / outside swap windows (ms) | {w['inside_swap_windows']['p99_ms']} / "
              f"{w['outside_swap_windows']['p99_ms']} |",
              *(f"| {title}, one request in this process at batch 1: Feast read / the version's recommend / "
                f"rest of the p50 at 1 client (gRPC, batcher, tensors), ms | {p[name]['feast_read_p50_ms']} / "
                f"{p[name]['recommend_p50_ms']} / {p[name].get('rest_of_p50_at_1_ms', 'n/a')} |"
                for name, title in ((PLUM, "PLUM"), (SASREC, "SASRec")))]
    for t in report["targets"].values():
        lines.append(f"| target: {t['target']} | {t['value']}: {'met' if t['met'] else 'NOT met'} |")
    m = report["models"][PLUM]
    lines.append(f"\nMeasured {report['machine']['measured_at']} on {report['machine']['cpus']} CPUs (commit "
                 f"{report['machine']['commit']}) with `{report['command']}`: {s['items']:,} MovieLens-100K items, "
                 f"PLUM {m['parameters']:,} parameters over a {m['vocabulary_tokens']:,}-token vocabulary "
                 f"({m['sft_steps']} SFT steps: sized, not trained to quality), {s['seconds']:g} s per level, "
                 f"the client threads on the same CPUs as the server; everything in ops/bench/results/serve.json.")
    return "\n".join(lines) + "\n"
