"""`plum status`: one report of the whole loop, every figure read from the running system.

Where each part's figures come from (a part that is down is reported as down, never guessed):
- broker: the configured Kafka, or the embedded broker `plum stack up` recorded, probed.
- pipeline: totals, read positions and the time of the newest batch from its state store; lag per
  partition is the broker's end offset minus the applied position (ingest/metrics.py); records/s
  from the running pipeline's Prometheus endpoint, found through its record in <state>/run/.
- dead-letter topic: its record count (end minus beginning offsets) and the newest records' reasons.
- SIDs: the newest SID table; coverage against the catalogue (every item the pipeline received an
  upsert for, the item_metadata it pushes to Feast).
- trainer: its status file (<state>/trainer/status.json); running if its record is alive.
- versions: each servable version's manifest (eval figures, training loss at export), labels.json.
- serving: the running server's /monitoring/prometheus/metrics, scraped twice (rates and latency
  over the window between the scrapes).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from ingest.config import KafkaConfig
from ops.config import PlumConfig
from ops.runtime import RunningPart, find

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RECENT_DEAD_LETTERS = 5


# -- pure helpers -----------------------------------------------------------------------------
def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: `buckets` are (upper bound, cumulative count), +inf last;
    linear interpolation inside the bucket that holds the rank. None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the largest finite bound: the bound is all that is known
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _matching(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for (sample, labels), value in samples.items() if sample == name]


def _latency(before: Samples | None, after: Samples) -> dict[str, float | None]:
    """Mean, p50 and p99 of plum_serving_request_seconds (ms): over the window when it saw requests."""
    def buckets(samples: Samples | None) -> dict[float, float]:
        rows = _matching(samples or {}, "plum_serving_request_seconds_bucket")
        return {float(labels["le"]): value for labels, value in rows}

    def total(samples: Samples | None, suffix: str) -> float:
        return (samples or {}).get((f"plum_serving_request_seconds_{suffix}", ()), 0.0)

    now, then = buckets(after), buckets(before)
    count = total(after, "count") - total(before, "count")
    basis = "window"
    if before is None or count <= 0:  # no window, or no requests in it: the server's lifetime figures
        then, count, basis, before = {}, total(after, "count"), "since start", None
    if count <= 0:
        return {"basis": None, "mean_ms": None, "p50_ms": None, "p99_ms": None}
    window = [(le, value - then.get(le, 0.0)) for le, value in now.items()]
    mean = (total(after, "sum") - total(before, "sum")) / count
    p50, p99 = histogram_quantile(0.5, window), histogram_quantile(0.99, window)
    return {"basis": basis, "mean_ms": round(mean * 1000, 3),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3)}


def serving_figures(before: Samples | None, after: Samples, window_s: float) -> dict[str, Any]:
    """What the server's metrics say: requests, rate and latency over the window, version states,
    labels and each version's traffic. `before` is the scrape `window_s` earlier (None: no rates)."""
    def per(name: str, key: str, samples: Samples | None) -> dict[str, float]:
        return {labels[key]: value for labels, value in _matching(samples or {}, name)}

    requests = per("plum_serving_requests_total", "outcome", after)
    traffic = per("plum_serving_version_requests_total", "version", after)
    rate = None
    traffic_rate: dict[str, float | None] = {v: None for v in traffic}
    if before is not None and window_s > 0:
        earlier = per("plum_serving_requests_total", "outcome", before)
        rate = (sum(requests.values()) - sum(earlier.values())) / window_s
        earlier_traffic = per("plum_serving_version_requests_total", "version", before)
        traffic_rate = {v: (n - earlier_traffic.get(v, 0.0)) / window_s for v, n in traffic.items()}
    states = {int(labels["version"]): labels["state"]
              for labels, value in _matching(after, "plum_serving_version_state") if value == 1}
    labels = {labels["label"]: int(value) for labels, value in _matching(after, "plum_serving_label_version")}
    versions = [{"version": v, "state": states[v], "requests": int(traffic.get(str(v), 0)),
                 "requests_per_second": traffic_rate.get(str(v))} for v in sorted(states)]
    return {
        "requests": {outcome: int(n) for outcome, n in sorted(requests.items())},
        "requests_per_second": rate,
        "window_s": window_s if before is not None else None,
        "latency": _latency(before, after),
        "versions": versions,
        "labels": {label: {"version": v, "requests": int(traffic.get(str(v), 0)),
                           "requests_per_second": traffic_rate.get(str(v))} for label, v in sorted(labels.items())},
    }


def _iso(unix: float | None) -> str | None:
    return None if unix is None else datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


# -- reading the parts --------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic: why it was rejected and where it came from."""

    reason: str
    source: str  # topic[partition]@offset
    timestamp: str | None


def read_dead_letters(kafka: KafkaConfig, last: int | None = None, timeout_s: float = 10.0
                      ) -> tuple[int, list[DeadLetter]]:
    """The dead-letter topic's record count and its newest `last` records (all when None), oldest first."""
    from kafka import TopicPartition

    from ingest.kafka_clients import end_offsets, make_consumer, topic_partitions

    count = topic_partitions(kafka, [kafka.dlq_topic])[kafka.dlq_topic]
    if not count:
        return 0, []
    ends = end_offsets(kafka, kafka.dlq_topic, count)
    consumer = make_consumer(kafka)
    try:
        tps = [TopicPartition(kafka.dlq_topic, p) for p in range(count)]
        begins = consumer.beginning_offsets(tps)
        total = sum(ends[tp.partition] - begins[tp] for tp in tps)
        stops = {tp: ends[tp.partition] for tp in tps if ends[tp.partition] > begins[tp]}
        consumer.assign(list(stops))
        for tp, end in stops.items():
            consumer.seek(tp, begins[tp] if last is None else max(begins[tp], end - last))
        records = []
        todo = dict(stops)
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            for tp, batch in consumer.poll(timeout_ms=200).items():
                records.extend(r for r in batch if r.offset < stops[tp])  # not what arrived after the count
            todo = {tp: end for tp, end in todo.items() if consumer.position(tp) < end}
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    letters = []
    for record in records[-last:] if last is not None else records:
        headers = {k: (v or b"").decode(errors="replace") for k, v in record.headers}
        source = (f"{headers.get('plum.source.topic', '?')}[{headers.get('plum.source.partition', '?')}]"
                  f"@{headers.get('plum.source.offset', '?')}")
        letters.append(DeadLetter(headers.get("plum.dlq.reason", ""), source,
                                  _iso(record.timestamp / 1000) if record.timestamp and record.timestamp > 0 else None))
    return total, letters


def dlq_reasons(cfg: PlumConfig, limit: int = 1000) -> list[str]:
    """The reasons on the dead-letter topic (its newest `limit` records)."""
    return [letter.reason for letter in read_dead_letters(cfg.kafka, last=limit)[1]]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """A Prometheus endpoint's samples (a server listening on every interface is reached on loopback)."""
    url = url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//127.0.0.1:")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_metrics(response.read().decode())


def _running(part: RunningPart | None) -> dict[str, Any]:
    if part is None:
        return {"running": False}
    return {"running": True, "pid": part.pid, "started_at": part.started_at, "endpoints": part.endpoints}


def broker_status(cfg: PlumConfig) -> tuple[KafkaConfig | None, dict[str, Any]]:
    """(the reachable Kafka config or None, the broker's section)."""
    from ingest.kafka_clients import KafkaUnavailableError, probe, topic_partitions
    from kafka.errors import KafkaError

    from ops.errors import StackError
    from ops.stack import resolve

    section: dict[str, Any] = {"embedded": cfg.kafka.is_embedded, "address": cfg.kafka.bootstrap_servers}
    try:
        kafka = resolve(cfg).kafka
        section["address"] = kafka.bootstrap_servers
        probe(kafka)
        topics = [kafka.events_topic, kafka.items_topic, kafka.dlq_topic]
        section["topics"] = topic_partitions(kafka, topics)
    except (StackError, KafkaUnavailableError, KafkaError) as exc:
        return None, {**section, "reachable": False, "detail": str(exc)}
    return kafka, {**section, "reachable": True}


def pipeline_status(cfg: PlumConfig, kafka: KafkaConfig | None) -> dict[str, Any]:
    """Totals, lag per partition, throughput and the newest batch's time."""
    from ingest.metrics import read_progress
    from ingest.state_store import PipelineStateStore

    section = _running(find(cfg, "pipeline"))
    db = cfg.paths.pipeline_state_db
    if not db.exists():
        return {**section, "detail": f"no pipeline state store at {db}: the pipeline has not run here"}
    store = PipelineStateStore(db)
    try:
        sample = read_progress(store, kafka)
    finally:
        store.close()
    section.update(totals=sample.totals, last_flush=_iso(sample.last_flush))
    lag = sample.lag
    if lag is None:
        section["lag"] = None
        section["lag_detail"] = "unknown: the broker is not reachable"
    else:
        section["lag"] = [{"topic": t, "partition": p, "end_offset": sample.ends[(t, p)],
                           "position": sample.positions.get((t, p), 0), "lag": n} for (t, p), n in lag.items()]
        section["lag_total"] = sum(lag.values())
    section["records_per_second"] = None
    url = section.get("endpoints", {}).get("metrics")
    if not section["running"]:
        section["throughput_detail"] = "not running"
    elif url is None:
        section["throughput_detail"] = "the running pipeline serves no metrics (pipeline.metrics_port 0 or in use)"
    else:
        try:
            value = scrape(url).get(("plum_pipeline_records_per_second", ()))
        except (OSError, ValueError) as exc:
            section["throughput_detail"] = f"its metrics at {url} did not answer: {exc}"
        else:
            section["records_per_second"] = value
            if value is None:
                section["throughput_detail"] = "measuring (needs two samples)"
    return section


def dlq_status(cfg: PlumConfig, kafka: KafkaConfig | None) -> dict[str, Any]:
    """How many records the dead-letter topic holds, and the newest ones' reasons."""
    from ingest.kafka_clients import KafkaUnavailableError
    from kafka.errors import KafkaError

    section: dict[str, Any] = {"topic": cfg.kafka.dlq_topic, "records": None, "recent": []}
    if kafka is None:
        return {**section, "detail": "unknown: the broker is not reachable"}
    try:
        total, letters = read_dead_letters(kafka, last=RECENT_DEAD_LETTERS)
    except (KafkaUnavailableError, KafkaError) as exc:
        return {**section, "detail": f"could not read the topic: {exc}"}
    return {**section, "records": total, "recent": [asdict(letter) for letter in reversed(letters)]}


def sid_status(cfg: PlumConfig) -> dict[str, Any]:
    """The newest SID version and the catalogue items it does not cover."""
    from ingest.state_store import PipelineStateStore
    from tokenizer.sid_table import SIDTableError, load_table, versions

    section: dict[str, Any] = {"version": None}
    catalogue: list[str] | None = None
    if cfg.paths.pipeline_state_db.exists():
        store = PipelineStateStore(cfg.paths.pipeline_state_db)
        try:
            catalogue = store.catalogue_item_ids()
        finally:
            store.close()
    section["catalogue_items"] = None if catalogue is None else len(catalogue)
    if not versions(cfg.paths.sid_dir):
        return {**section, "detail": f"no SID table in {cfg.paths.sid_dir}: run `plum tokenize fit`"}
    try:
        table = load_table(cfg.paths.sid_dir)
    except SIDTableError as exc:
        return {**section, "detail": str(exc)}
    section.update(version=table.version, items=len(table.codes), created_at=table.created_at,
                   uniqueness_before_suffix=table.metrics.get("uniqueness_before_suffix"))
    if catalogue is not None:
        missing = [item for item in catalogue if item not in table.codes]
        section.update(without_sid=len(missing), without_sid_examples=missing[:5])
    return section


def trainer_status(cfg: PlumConfig) -> dict[str, Any]:
    """The continuous trainer's own status file, and whether it runs."""
    from trainer.continuous import STATUS

    section = _running(find(cfg, "trainer"))
    path = cfg.paths.trainer_dir / STATUS
    section["status_file"] = str(path)
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return {**section, "detail": "no status file: the continuous trainer has not run here"}
    except (OSError, ValueError) as exc:
        return {**section, "detail": f"unreadable status file: {exc}"}
    evaluation = status.get("last_eval") or {}
    section.update({key: status.get(key) for key in (
        "state", "step", "loss", "tokens_per_s", "updated_at", "sid_version", "events_read", "held_out", "waiting")})
    section.update(last_checkpoint=status.get("last_checkpoint") or None, watermark=status.get("watermark") or None,
                   last_eval=None if "model" not in evaluation else {
                       "step": evaluation.get("step"), "at": evaluation.get("at"),
                       "examples": evaluation.get("examples"), "model": evaluation["model"],
                       "served_version": evaluation.get("served_version"), "served": evaluation.get("served"),
                       "export_refused": evaluation.get("export_refused")},
                   exports=[e.get("version") for e in status.get("exports") or []])
    return section


def versions_status(cfg: PlumConfig) -> dict[str, Any]:
    """Every servable version's manifest figures, and the labels."""
    from trainer.checkpoint import CheckpointError, read_manifest
    from trainer.servable import labels, version_numbers

    model_dir = cfg.paths.model_dir
    section: dict[str, Any] = {"model_dir": str(model_dir), "labels": {}, "versions": []}
    try:
        section["labels"] = labels(model_dir)
    except CheckpointError as exc:
        section["labels_detail"] = str(exc)
    for number in version_numbers(model_dir):
        try:
            manifest = read_manifest(model_dir / str(number))
        except CheckpointError as exc:
            section["versions"].append({"version": number, "detail": str(exc)})
            continue
        evaluation = manifest.get("eval") or {}
        section["versions"].append({
            "version": number, "created_at": manifest.get("created_at"), "kind": manifest.get("kind", "plum-decoder"),
            "sid_version": manifest.get("sid_version"), "train_loss": manifest.get("train_loss"),
            "recall@10": evaluation.get("recall@10"), "ndcg@10": evaluation.get("ndcg@10"),
            "invalid_sid_rate": evaluation.get("invalid_sid_rate"), "eval_examples": evaluation.get("examples"),
            "watermark": (manifest.get("data_watermark") or {}).get("event_time"),
            "labels": sorted(label for label, v in section["labels"].items() if v == number)})
    return section


class StatusReader:
    """Reads the whole status; keeps the server's last scrape, so consecutive reads give request
    rates over the time between them (the first read scrapes twice, `window_s` apart)."""

    def __init__(self, cfg: PlumConfig, window_s: float = 2.0) -> None:
        self.cfg, self.window_s = cfg, window_s
        self._scrape: tuple[int, float, Samples] | None = None  # (server pid, monotonic time, samples)

    def serving(self) -> dict[str, Any]:
        section = _running(find(self.cfg, "serve"))
        url = section.get("endpoints", {}).get("rest")
        if not section["running"]:
            return {**section, "detail": "not running"}
        if url is None:
            return {**section, "detail": "the running server has no REST gateway (serving.rest false): no metrics"}
        metrics_url = f"{url}/monitoring/prometheus/metrics"
        try:
            previous = self._scrape if self._scrape and self._scrape[0] == section["pid"] else None
            if previous is None:
                previous = (section["pid"], time.monotonic(), scrape(metrics_url))
                time.sleep(self.window_s)
            now = time.monotonic()
            samples = scrape(metrics_url)
        except (OSError, ValueError) as exc:
            self._scrape = None
            return {**section, "detail": f"its metrics at {metrics_url} did not answer: {exc}"}
        self._scrape = (section["pid"], now, samples)
        return {**section, "metrics_url": metrics_url, **serving_figures(previous[2], samples, now - previous[1])}

    def read(self) -> dict[str, Any]:
        cfg = self.cfg
        kafka, broker = broker_status(cfg)
        return {
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "state_dir": str(cfg.paths.state()),
            "broker": broker,
            "pipeline": pipeline_status(cfg, kafka),
            "dlq": dlq_status(cfg, kafka),
            "sid": sid_status(cfg),
            "trainer": trainer_status(cfg),
            "versions": versions_status(cfg),
            "serving": self.serving(),
        }


# -- text -------------------------------------------------------------------------------------
def _n(value: Any, digits: int = 4) -> str:
    """A figure as text: integers with separators, floats rounded, unknown as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _state(section: dict[str, Any]) -> str:
    if not section.get("running"):
        return "not running"
    where = ", ".join(f"{k} {v}" for k, v in sorted(section.get("endpoints", {}).items()))
    return f"running (pid {section['pid']}{', ' + where if where else ''})"


def _lines_broker(s: dict[str, Any]) -> Iterable[str]:
    where = f"{s['address']}{' (embedded)' if s.get('embedded') else ''}"
    if not s["reachable"]:
        yield f"broker     NOT reachable: {s['detail']}"
        return
    topics = ", ".join(f"{t} ({n} partitions)" if n else f"{t} (missing)" for t, n in s.get("topics", {}).items())
    yield f"broker     reachable at {where}; topics {topics}"


def _lines_pipeline(s: dict[str, Any]) -> Iterable[str]:
    yield f"pipeline   {_state(s)}"
    if "totals" not in s:
        yield f"           {s['detail']}"
        return
    t = s["totals"]
    yield (f"           {_n(t['events_applied'])} events applied, {_n(t['events_duplicate'])} duplicates, "
           f"{_n(t['items_upserted'])} item upserts, {_n(t['records_rejected'])} rejected to the DLQ, "
           f"{_n(t.get('events_expired', 0))} expired to the DLQ")
    rate = _n(s["records_per_second"], 1) + " records/s" if s["records_per_second"] is not None else \
        f"throughput {s.get('throughput_detail', 'n/a')}"
    yield f"           {rate}; last flush {s['last_flush'] or 'never'}"
    if s["lag"] is None:
        yield f"           lag {s['lag_detail']}"
    else:
        parts = ", ".join(f"{r['topic']}[{r['partition']}] {_n(r['lag'])}" for r in s["lag"])
        yield f"           lag {_n(s['lag_total'])} in all: {parts}"


def _lines_dlq(s: dict[str, Any]) -> Iterable[str]:
    if s["records"] is None:
        yield f"dlq        {s['topic']}: {s['detail']}"
        return
    yield f"dlq        {_n(s['records'])} records in {s['topic']}" + ("; newest:" if s["recent"] else "")
    for letter in s["recent"]:
        yield f"             {letter['source']}: {letter['reason']}"


def _lines_sid(s: dict[str, Any]) -> Iterable[str]:
    catalogue = "no catalogue yet" if s["catalogue_items"] is None else f"catalogue {_n(s['catalogue_items'])} items"
    if s["version"] is None:
        yield f"sid        {s['detail']}; {catalogue}"
        return
    line = (f"sid        version {s['version']}: {_n(s['items'])} items, uniqueness before suffix "
            f"{_n(s['uniqueness_before_suffix'], 3)}; {catalogue}")
    if "without_sid" in s:
        examples = f" (e.g. {', '.join(s['without_sid_examples'])})" if s["without_sid_examples"] else ""
        line += f", {_n(s['without_sid'])} without a SID{examples}"
    yield line


def _lines_trainer(s: dict[str, Any]) -> Iterable[str]:
    yield f"trainer    {_state(s)}"
    if "step" not in s:
        yield f"           {s['detail']}"
        return
    yield (f"           last status {s['updated_at']}: {s['state']}, step {_n(s['step'])}, loss {_n(s['loss'])}, "
           f"{_n(s['tokens_per_s'], 1)} tokens/s")
    checkpoint = s["last_checkpoint"] or {}
    watermark = s["watermark"] or {}
    yield (f"           last checkpoint step {_n(checkpoint.get('step'))} at {checkpoint.get('at', 'n/a')}; "
           f"watermark {watermark.get('event_time') or 'n/a'} ({_n(watermark.get('events'))} events)")
    evaluation = s["last_eval"]
    if evaluation:
        m = evaluation["model"]
        served = ""
        if evaluation.get("served"):
            served = (f"; served version {evaluation['served_version']} recall@10 "
                      f"{_n(evaluation['served'].get('recall@10'))}")
        refused = f"; not exported: {evaluation['export_refused']}" if evaluation.get("export_refused") else ""
        yield (f"           last eval step {_n(evaluation['step'])} on {_n(evaluation['examples'])} held-out events: "
               f"recall@10 {_n(m.get('recall@10'))}, ndcg@10 {_n(m.get('ndcg@10'))}, invalid-SID rate "
               f"{_n(m.get('invalid_sid_rate'))}{served}{refused}")


def _lines_versions(s: dict[str, Any]) -> Iterable[str]:
    labels = ", ".join(f"{label} -> {v}" for label, v in sorted(s["labels"].items())) or "none"
    yield f"versions   {len(s['versions'])} in {s['model_dir']}; labels {labels}"
    for v in s["versions"]:
        if "detail" in v:
            yield f"             {v['version']}: {v['detail']}"
            continue
        tag = f" [{', '.join(v['labels'])}]" if v["labels"] else ""
        yield (f"             {v['version']}{tag}: recall@10 {_n(v['recall@10'])}, ndcg@10 {_n(v['ndcg@10'])}, "
               f"training loss {_n(v['train_loss'])}, SID version {_n(v['sid_version'])}, created {v['created_at']}")


def _lines_serving(s: dict[str, Any]) -> Iterable[str]:
    yield f"serving    {_state(s)}"
    if "versions" not in s:
        if s.get("running"):
            yield f"           {s['detail']}"
        return
    states = ", ".join(f"{v['version']} {v['state']}" for v in s["versions"]) or "none"
    yield f"           versions {states}"
    for label, t in s["labels"].items():
        rate = f", {_n(t['requests_per_second'], 2)}/s" if t["requests_per_second"] is not None else ""
        yield f"           label {label} -> version {t['version']}: {_n(t['requests'])} requests{rate}"
    requests = ", ".join(f"{outcome} {_n(n)}" for outcome, n in s["requests"].items())
    latency = s["latency"]
    window = f"over the last {s['window_s']:.1f} s" if s["window_s"] else "(no window)"
    yield f"           requests {requests}; {_n(s['requests_per_second'], 2)} requests/s {window}"
    when = window if latency["basis"] == "window" else "since start"
    if latency["basis"] is None:
        yield "           latency n/a (no requests yet)"
    else:
        yield (f"           latency mean {_n(latency['mean_ms'], 1)} ms, p50 {_n(latency['p50_ms'], 1)} ms, "
               f"p99 {_n(latency['p99_ms'], 1)} ms ({when})")


def format_status(status: dict[str, Any]) -> str:
    """The status as text, one block per part."""
    lines = [f"PLUM-stream status of {status['state_dir']} at {status['generated_at']}"]
    for section, render in (("broker", _lines_broker), ("pipeline", _lines_pipeline), ("dlq", _lines_dlq),
                            ("sid", _lines_sid), ("trainer", _lines_trainer), ("versions", _lines_versions),
                            ("serving", _lines_serving)):
        lines.extend(render(status[section]))
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=False, default=str)
