"""The REST form of the TensorFlow Serving API on the same core as gRPC.

  POST /v1/models/<name>[/versions/<v> | /labels/<l>]:predict
       {"instances": [{"user_id": "42", "k": 10}, ...]}  -> {"predictions": [{item_ids, sids, scores}], "model_version"}
       {"inputs": {"user_id": ["42", "7"], "k": 10}}     -> {"outputs": {item_ids, sids, scores, model_version}}
  GET  /v1/models/<name>[/versions/<v>]                  -> {"model_version_status": [...]}
  GET  /v1/models/<name>[/versions/<v> | /labels/<l>]/metadata -> {"model_spec", "metadata": {"signature_def"}}
  GET  /monitoring/prometheus/metrics                     -> Prometheus text (serving/metrics.py)
Errors are {"error": message} with 400 (bad request), 401 (no token), 404 (no such path), 500.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST

from serving.api import (InvalidRequest, Target, json_values, metadata_response, output_arrays, parse_inputs,
                         status_response)
from serving.engine import Request
from serving.metrics import PATH as METRICS_PATH
from serving.server import ModelServer
from serving.versions import UnknownVersion

PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                  r"(?P<suffix>:predict|/metadata)?$")
MAX_BODY = 4 * 1024 * 1024


def _arrays(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """JSON inputs as arrays of the dtype the JSON held (decoded by kind in serving/api.py)."""
    return {name: json_values(name, value) for name, value in inputs.items()}


def _jsonable(array: np.ndarray) -> Any:
    """Nested lists; a float that JSON cannot hold (-inf padding) becomes null."""
    if array.dtype.kind == "f":
        return np.where(np.isfinite(array), array.astype(object), None).tolist()
    return array.tolist()


class _Handler(BaseHTTPRequestHandler):
    core: ModelServer  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the server prints its own lines
        return

    def _send(self, code: int, body: dict[str, Any]) -> None:
        self._send_bytes(code, json.dumps(body).encode(), "application/json")

    def _send_bytes(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[Target, str] | None:
        match = PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._send(404, {"error": f"no such endpoint {self.path!r}; see /v1/models/<name>"})
            return None
        name = match["name"]
        if name != self.core.name:
            raise InvalidRequest(f"unknown model {name!r}; this server serves {self.core.name!r}")
        version = int(match["version"]) if match["version"] else None
        return Target(name, version, match["label"]), match["suffix"] or ""

    def _guard(self, method: str) -> None:
        try:
            if method == "GET" and self.path.split("?", 1)[0] == METRICS_PATH:
                self._send_bytes(200, self.core.metrics.exposition(), CONTENT_TYPE_LATEST)
                return
            routed = self._route()
            if routed is None:
                return
            target, suffix = routed
            if method == "POST" and suffix == ":predict":
                self._send(200, self._predict(target))
            elif method == "GET" and suffix == "/metadata":
                response = metadata_response(self.core.name, self.core.manager.choose(target.version, target.label))
                self._send(200, json_format.MessageToDict(response))
            elif method == "GET" and suffix == "" and target.label is None:
                response = status_response(self.core.manager.snapshot(), target.version)
                self._send(200, json_format.MessageToDict(response, always_print_fields_with_no_presence=True))
            else:
                self._send(404, {"error": f"{method} {self.path} is not an endpoint of this server"})
        except (InvalidRequest, UnknownVersion) as exc:
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # never let one request take the server down
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _predict(self, target: Target) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            raise InvalidRequest(f"the request body must be a JSON object of at most {MAX_BODY} bytes")
        body_bytes = self.rfile.read(length)
        rows: list[bool] = []
        requests, results = self.core.predict(target, lambda: self._parse(body_bytes, rows))
        if not rows:
            outputs = {k: _jsonable(v) for k, v in output_arrays(results, requests[0].k).items()}
            return {"outputs": {**outputs, "model_version": results[0].version}}
        return {"predictions": [{"item_ids": list(r.item_ids), "sids": [list(s) for s in r.sids],
                                 "scores": list(r.scores)} for r in results],
                "model_version": results[0].version}

    def _parse(self, body_bytes: bytes, rows: list[bool]) -> list[Request]:
        """The requests of a predict body; appends True to `rows` for the row ("instances") format."""
        try:
            body = json.loads(body_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
            raise InvalidRequest('the body needs exactly one of "instances" (rows) or "inputs" (columns)')
        settings = self.core.settings
        if "inputs" in body:
            if not isinstance(body["inputs"], dict):
                raise InvalidRequest('"inputs" must be an object of input name -> value')
            return parse_inputs(_arrays(body["inputs"]), settings.beam_width, settings.max_batch)
        rows.append(True)
        instances = body["instances"]
        if not isinstance(instances, list) or not instances or len(instances) > settings.max_batch:
            raise InvalidRequest(f'"instances" must be a list of 1 to {settings.max_batch} objects')
        requests = []
        for instance in instances:
            if not isinstance(instance, dict):
                raise InvalidRequest('each instance must be an object such as {"user_id": "42", "k": 10}')
            requests += parse_inputs(_arrays(instance), settings.beam_width, settings.max_batch)
        return requests

    def do_POST(self) -> None:
        self._guard("POST")

    def do_GET(self) -> None:
        self._guard("GET")


@dataclass
class RunningRest:
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_rest(core: ModelServer, host: str, port: int) -> RunningRest:
    handler = type("Handler", (_Handler,), {"core": core})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="rest", daemon=True)
    thread.start()
    return RunningRest(server, thread)
