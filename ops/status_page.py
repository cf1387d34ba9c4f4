"""`plum status --serve`: a read-only status page (one HTML page and /status.json) on a local port.

A sampler thread reads the status (ops/status.py) every `interval_s` seconds and keeps the newest
reading plus a bounded history of consumer lag (in memory, `history` samples); request rates on
the page are over the time between two samples. The page is self-contained (no CDN, no external
script): its own JavaScript fetches /status.json, writes the figures into elements by id and
draws the plots as inline SVG: eval Recall@10 and training loss per servable version (from the
versions' manifests) and consumer lag over time.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ops.config import PlumConfig
from ops.errors import PlumError
from ops.status import StatusReader

log = logging.getLogger(__name__)


def lag_point(status: dict[str, Any]) -> dict[str, Any]:
    """One point of the lag history: the total and each partition's lag (None while unknown)."""
    rows = status["pipeline"].get("lag")
    return {"at": status["generated_at"],
            "total": None if rows is None else sum(r["lag"] for r in rows),
            "partitions": {} if rows is None else {f"{r['topic']}[{r['partition']}]": r["lag"] for r in rows}}


class StatusPage:
    """Samples the status in the background and serves it as a page and as JSON."""

    def __init__(self, cfg: PlumConfig, interval_s: float = 5.0, history: int = 720) -> None:
        self.reader = StatusReader(cfg, window_s=min(2.0, interval_s))
        self.interval_s = interval_s
        self.lag_history: deque[dict[str, Any]] = deque(maxlen=history)
        self.latest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd: ThreadingHTTPServer | None = None

    def sample(self) -> None:
        status = self.reader.read()
        with self.lock:
            self.lag_history.append(lag_point(status))
            self.latest = {**status, "sample_interval_s": self.interval_s, "lag_history": list(self.lag_history)}

    def _sample_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # the page must outlive one bad reading; it shows the error and the last one
                log.exception("status sample failed")
                with self.lock:
                    self.latest = {**self.latest, "sample_error": f"{type(exc).__name__}: {exc}"}

    def snapshot(self) -> bytes:
        with self.lock:
            return json.dumps(self.latest, default=str).encode()

    def serve(self, host: str, port: int) -> str:
        """Bind host:port (0: a free port), take the first sample, then serve and keep sampling; returns the
        URL. A port that cannot be bound is a PlumError."""
        page = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
                return

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/status.json":
                    self._send(200, page.snapshot(), "application/json")
                else:
                    self._send(404, b'{"error": "no such page; see / and /status.json"}', "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        try:  # bound before the first sample: a taken port fails at once
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PlumError(f"Cannot serve the status page on {host}:{port} ({exc.strerror or exc}); "
                            "choose another --port (0: any free port).") from None
        self._httpd.daemon_threads = True
        self.sample()
        self._threads = [threading.Thread(target=self._httpd.serve_forever, name="status-page", daemon=True),
                         threading.Thread(target=self._sample_forever, name="status-sampler", daemon=True)]
        for thread in self._threads:
            thread.start()
        return f"http://{host}:{self._httpd.server_port}/"

    def close(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            if self._threads:  # shutdown() waits for serve_forever, which only runs once the threads started
                self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=30)


def run(cfg: PlumConfig, host: str, port: int, interval_s: float, say: Callable[[str], None] = print,
        stop: threading.Event | None = None) -> None:
    """Serve the status page until SIGINT/SIGTERM (or `stop`)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Explicit handlers: a process started in the background inherits SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    page = StatusPage(cfg, interval_s)
    try:
        url = page.serve(host, port)
    except BaseException:
        page.close()
        raise
    say(f"status: page on {url} (JSON at {url}status.json), sampled every {interval_s:g} s; Ctrl-C stops")
    try:
        stop.wait()
    finally:
        page.close()
        say("status: page stopped")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>PLUM-stream status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 0 0 .4em; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 1em; }
  section { border: 1px solid #ccc; border-radius: 6px; padding: .8em 1em; }
  dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: 0; }
  dt { color: #666; } dd { margin: 0; font-variant-numeric: tabular-nums; }
  .down { color: #b00; font-weight: bold; } .up { color: #070; font-weight: bold; }
  table { border-collapse: collapse; } td, th { padding: .1em .6em; text-align: right; }
  th { color: #666; font-weight: normal; } ul { margin: .2em 0; padding-left: 1.2em; }
  svg { background: #fafafa; border: 1px solid #eee; } .note { color: #666; font-size: .9em; }
</style>
</head>
<body>
<h1>PLUM-stream status <span class="note">as of <span id="generated-at">loading</span>,
  state <span id="state-dir"></span></span></h1>
<p id="sample-error" class="down"></p>
<div class="grid">
<section><h2>Broker</h2><dl>
  <dt>state</dt><dd id="broker-state"></dd><dt>address</dt><dd id="broker-address"></dd></dl></section>
<section><h2>Pipeline</h2><dl>
  <dt>state</dt><dd id="pipeline-state"></dd>
  <dt>events applied</dt><dd id="events-applied"></dd>
  <dt>duplicates</dt><dd id="events-duplicate"></dd>
  <dt>item upserts</dt><dd id="items-upserted"></dd>
  <dt>rejected (DLQ)</dt><dd id="records-rejected"></dd>
  <dt>records/s</dt><dd id="records-per-second"></dd>
  <dt>last flush</dt><dd id="last-flush"></dd>
  <dt>consumer lag</dt><dd id="lag-total"></dd></dl>
  <table id="lag-table"><thead><tr><th>partition</th><th>end</th><th>position</th><th>lag</th></tr></thead>
  <tbody></tbody></table></section>
<section><h2>Dead-letter topic</h2><dl>
  <dt>topic</dt><dd id="dlq-topic"></dd><dt>records</dt><dd id="dlq-count"></dd></dl>
  <ul id="dlq-reasons"></ul></section>
<section><h2>Semantic IDs</h2><dl>
  <dt>version</dt><dd id="sid-version"></dd><dt>items with a SID</dt><dd id="sid-items"></dd>
  <dt>catalogue items</dt><dd id="sid-catalogue"></dd><dt>without a SID</dt><dd id="sid-without"></dd></dl></section>
<section><h2>Trainer</h2><dl>
  <dt>state</dt><dd id="trainer-state"></dd><dt>step</dt><dd id="trainer-step"></dd>
  <dt>loss</dt><dd id="trainer-loss"></dd><dt>tokens/s</dt><dd id="trainer-tokens"></dd>
  <dt>last checkpoint</dt><dd id="trainer-checkpoint"></dd><dt>watermark</dt><dd id="trainer-watermark"></dd>
  <dt>eval Recall@10</dt><dd id="trainer-recall"></dd><dt>eval NDCG@10</dt><dd id="trainer-ndcg"></dd></dl></section>
<section><h2>Serving</h2><dl>
  <dt>state</dt><dd id="serving-state"></dd>
  <dt>requests ok / invalid / error</dt><dd><span id="requests-ok"></span> / <span id="requests-invalid"></span>
    / <span id="requests-error"></span></dd>
  <dt>requests/s</dt><dd id="request-rate"></dd>
  <dt>latency mean / p50 / p99</dt><dd><span id="latency-mean"></span> / <span id="latency-p50"></span> /
    <span id="latency-p99"></span> ms</dd></dl>
  <ul id="serving-versions"></ul><ul id="serving-labels"></ul></section>
</div>
<h2 style="margin-top:1em">Servable versions <span class="note" id="model-dir"></span></h2>
<table id="versions-table"><thead><tr><th>version</th><th>labels</th><th>Recall@10</th><th>NDCG@10</th>
  <th>training loss</th><th>SID version</th><th>created</th></tr></thead><tbody></tbody></table>
<div class="grid" style="margin-top:1em">
<section><h2>Eval Recall@10 per version</h2><svg id="plot-recall" width="320" height="180"></svg></section>
<section><h2>Training loss per version</h2><svg id="plot-loss" width="320" height="180"></svg></section>
<section><h2>Consumer lag over time</h2><svg id="plot-lag" width="320" height="180"></svg></section>
</div>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
function int(v) { return v === null || v === undefined ? "n/a" : Number(v).toLocaleString("en-US"); }
function dec(v, d) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(d); }
function set(id, text, cls) {
  const el = document.getElementById(id);
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}
function partState(s) {
  if (!s.running) return ["not running", "down"];
  return ["running (pid " + s.pid + ")", "up"];
}
function list(id, items) {
  const ul = document.getElementById(id);
  ul.replaceChildren();
  for (const [text, attrs] of items) {
    const li = document.createElement("li");
    li.textContent = text;
    for (const [k, v] of Object.entries(attrs || {})) li.setAttribute(k, v);
    ul.appendChild(li);
  }
}
function node(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}
// points: [{x, y, label}] with numeric x and y; one circle per point (class "point").
function plot(id, points, yDigits) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 48, R = 10, T = 10, B = 28;
  if (points.length === 0) {
    svg.appendChild(node("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888"}, "no data yet"));
    return;
  }
  const xs = points.map(p => p.x), ys = points.map(p => p.y);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y1 = y0 + 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.appendChild(node("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}));
  svg.appendChild(node("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}));
  svg.appendChild(node("text", {x: L - 4, y: T + 8, "text-anchor": "end", "font-size": 10}, y1.toFixed(yDigits)));
  svg.appendChild(node("text", {x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10}, y0.toFixed(yDigits)));
  svg.appendChild(node("polyline", {points: points.map(p => sx(p.x) + "," + sy(p.y)).join(" "),
                                    fill: "none", stroke: "#36c", "stroke-width": 1.5}));
  for (const p of points) {
    svg.appendChild(node("circle", {class: "point", cx: sx(p.x), cy: sy(p.y), r: 3.5, fill: "#36c",
                                    "data-x": p.label, "data-y": p.y}));
  }
  const first = points[0], last = points[points.length - 1];
  svg.appendChild(node("text", {x: sx(first.x), y: H - 8, "text-anchor": "start", "font-size": 10}, first.label));
  if (points.length > 1) {
    svg.appendChild(node("text", {x: sx(last.x), y: H - 8, "text-anchor": "end", "font-size": 10}, last.label));
  }
}
function render(s) {
  set("generated-at", s.generated_at);
  set("state-dir", s.state_dir);
  set("sample-error", s.sample_error ? "last sample failed: " + s.sample_error : "");
  set("broker-state", s.broker.reachable ? "reachable" : "NOT reachable: " + s.broker.detail,
      s.broker.reachable ? "up" : "down");
  set("broker-address", s.broker.address);

  const p = s.pipeline, t = p.totals || {};
  set("pipeline-state", ...partState(p));
  set("events-applied", int(t.events_applied));
  set("events-duplicate", int(t.events_duplicate));
  set("items-upserted", int(t.items_upserted));
  set("records-rejected", int(t.records_rejected));
  set("records-per-second", p.records_per_second === null || p.records_per_second === undefined
      ? (p.throughput_detail || "n/a") : dec(p.records_per_second, 1));
  set("last-flush", p.last_flush || "never");
  set("lag-total", p.lag ? int(p.lag_total) : (p.lag_detail || "n/a"));
  const body = document.querySelector("#lag-table tbody");
  body.replaceChildren();
  for (const r of p.lag || []) {
    const tr = document.createElement("tr");
    tr.id = "lag-" + r.topic + "-" + r.partition;
    for (const v of [r.topic + "[" + r.partition + "]", int(r.end_offset), int(r.position), int(r.lag)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }

  set("dlq-topic", s.dlq.topic);
  set("dlq-count", s.dlq.records === null ? s.dlq.detail : int(s.dlq.records));
  list("dlq-reasons", s.dlq.recent.map(d => [d.source + ": " + d.reason, {"data-source": d.source}]));

  const sid = s.sid;
  set("sid-version", sid.version === null ? sid.detail : String(sid.version));
  set("sid-items", int(sid.items));
  set("sid-catalogue", int(sid.catalogue_items));
  set("sid-without", int(sid.without_sid));

  const tr = s.trainer;
  set("trainer-state", tr.running ? "running (pid " + tr.pid + "): " + tr.state
      : "not running" + (tr.state ? " (last status: " + tr.state + ", " + tr.updated_at + ")" : ""),
      tr.running ? "up" : "down");
  set("trainer-step", int(tr.step));
  set("trainer-loss", dec(tr.loss, 4));
  set("trainer-tokens", dec(tr.tokens_per_s, 1));
  set("trainer-checkpoint", tr.last_checkpoint ? "step " + tr.last_checkpoint.step + " at " + tr.last_checkpoint.at : "n/a");
  set("trainer-watermark", tr.watermark && tr.watermark.event_time ? tr.watermark.event_time : "n/a");
  set("trainer-recall", tr.last_eval ? dec(tr.last_eval.model["recall@10"], 4) : "n/a");
  set("trainer-ndcg", tr.last_eval ? dec(tr.last_eval.model["ndcg@10"], 4) : "n/a");

  const sv = s.serving;
  set("serving-state", ...partState(sv));
  const req = sv.requests || {}, lat = sv.latency || {};
  set("requests-ok", int(req.ok)); set("requests-invalid", int(req.invalid)); set("requests-error", int(req.error));
  set("request-rate", dec(sv.requests_per_second, 2));
  set("latency-mean", dec(lat.mean_ms, 1)); set("latency-p50", dec(lat.p50_ms, 1)); set("latency-p99", dec(lat.p99_ms, 1));
  list("serving-versions", (sv.versions || []).map(v => ["version " + v.version + " " + v.state + ", " +
      int(v.requests) + " requests", {id: "served-" + v.version, "data-state": v.state}]));
  list("serving-labels", Object.entries(sv.labels || {}).map(([label, l]) => [label + " \u2192 version " + l.version +
      ": " + int(l.requests) + " requests" + (l.requests_per_second === null ? "" : ", " + dec(l.requests_per_second, 2) + "/s"),
      {id: "label-" + label, "data-version": l.version, "data-requests": l.requests}]));

  const vs = s.versions;
  set("model-dir", vs.model_dir);
  const vbody = document.querySelector("#versions-table tbody");
  vbody.replaceChildren();
  for (const v of vs.versions) {
    const row = document.createElement("tr");
    row.id = "version-" + v.version;
    for (const c of [v.version, (v.labels || []).join(", "), dec(v["recall@10"], 4), dec(v["ndcg@10"], 4),
                     dec(v.train_loss, 4), v.sid_version, v.created_at]) {
      const td = document.createElement("td");
      td.textContent = c === null || c === undefined ? "n/a" : c;
      row.appendChild(td);
    }
    vbody.appendChild(row);
  }
  const per = key => vs.versions.filter(v => v[key] !== null && v[key] !== undefined)
      .map(v => ({x: v.version, y: v[key], label: String(v.version)}));
  plot("plot-recall", per("recall@10"), 3);
  plot("plot-loss", per("train_loss"), 2);
  plot("plot-lag", s.lag_history.filter(h => h.total !== null)
      .map(h => ({x: Date.parse(h.at) / 1000, y: h.total, label: h.at.slice(11, 19)})), 0);
}
async function refresh() {
  try {
    const response = await fetch("/status.json", {cache: "no-store"});
    const status = await response.json();
    render(status);
    setTimeout(refresh, (status.sample_interval_s || 5) * 1000);
  } catch (e) {
    set("sample-error", "cannot reach the status server: " + e);
    setTimeout(refresh, 5000);
  }
}
refresh();
</script>
</body>
</html>
"""
