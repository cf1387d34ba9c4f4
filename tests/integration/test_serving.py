"""`plum serve` as a real process, called with the standard tensorflow-serving-api gRPC stubs and over
REST: Predict, metadata, status, bad requests, management without the token, hot-swap under load,
a corrupt version refused while the old one keeps serving."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.support.serving_state import build_serving_state
from trainer.servable import export_version, load_version, version_numbers

pytestmark = pytest.mark.integration


def tensor(values, dtype, shape=None) -> tensor_pb2.TensorProto:
    shape = [len(values)] if shape is None else shape
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]))
    field = {types_pb2.DT_STRING: "string_val", types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val",
             types_pb2.DT_FLOAT: "float_val", types_pb2.DT_BOOL: "bool_val"}[dtype]
    getattr(proto, field).extend(v.encode() if isinstance(v, str) else v for v in values)
    return proto


def predict_request(users=("user-1",), k=5, name="plum", **extra) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["user_id"].CopyFrom(tensor(list(users), types_pb2.DT_STRING))
    request.inputs["k"].CopyFrom(tensor([k], types_pb2.DT_INT32, []))
    for key, proto in extra.items():
        request.inputs[key].CopyFrom(proto)
    return request


class Server:
    """`plum serve` in a subprocess on free ports."""

    def __init__(self, state: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PLUM_PATHS__STATE_DIR": str(state),
               "PLUM_SERVING__MAX_BATCH": "8", "PLUM_SERVING__POLL_INTERVAL_S": "0.2"}
        self.process = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--grpc-port", "0",
                                         "--rest-port", "0"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + 240
        while not (match := re.search(r"gRPC on 127.0.0.1:(\d+), REST on http://127.0.0.1:(\d+)", self.output)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the server did not start:\n{self.output}")
            time.sleep(0.1)
        self.grpc_port, self.rest_port = int(match[1]), int(match[2])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def status(self) -> dict[int, tuple[str, str]]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "plum"
        response = self.models.GetModelStatus(request, timeout=10)
        states = get_model_status_pb2.ModelVersionStatus.State
        return {s.version: (states.Name(s.state), s.status.error_message) for s in response.model_version_status}

    def wait_for(self, condition, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; server output:\n{self.output}"
            time.sleep(0.1)

    def rest(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.rest_port}{path}", data=data)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("serving") / "state"
    cfg = build_serving_state(state)
    running = Server(state)
    running.cfg = cfg
    try:
        yield running
    finally:
        running.stop()


def test_predict_returns_unseen_catalogue_items_from_the_answering_version(server):
    response = server.predict.Predict(predict_request(("user-1", "user-2", "someone-new"), k=5), timeout=60)
    assert response.model_spec.version.value == 1 and response.outputs["model_version"].int64_val == [1]
    items = [v.decode() for v in response.outputs["item_ids"].string_val]
    assert [d.size for d in response.outputs["item_ids"].tensor_shape.dim] == [3, 5]
    assert [d.size for d in response.outputs["sids"].tensor_shape.dim] == [3, 5, 3]
    _, _, catalogue, _ = load_version(server.cfg.paths.model_dir, 1)
    assert all(i in catalogue for i in items)
    seen_by_user_1 = {f"item-1-{(1 + t) % 16}" for t in range(10)}  # the history pushed to Feast
    assert not seen_by_user_1 & set(items[:5]) and len(set(items[:5])) == 5
    assert len(set(items[10:])) == 5  # a user without history still gets recommendations
    scores = list(response.outputs["scores"].float_val)
    assert scores[:5] == sorted(scores[:5], reverse=True)
    # A history override (and exclude_seen off) is honoured: the answer changes with the history.
    override = server.predict.Predict(predict_request(
        ("user-1",), k=5, history=tensor(["item-3-0", "item-3-1", "item-3-2"], types_pb2.DT_STRING),
        exclude_seen=tensor([False], types_pb2.DT_BOOL, [])), timeout=60)
    assert [v.decode() for v in override.outputs["item_ids"].string_val] != items[:5]


def test_metadata_describes_the_signature_and_status_reports_available(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "plum"
    request.metadata_field.append("signature_def")
    response = server.predict.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert {"user_id", "k", "history", "context", "exclude_seen"} <= set(signature.inputs)
    assert {"item_ids", "sids", "scores", "model_version"} <= set(signature.outputs)
    assert server.status()[1] == ("AVAILABLE", "")
    code, body = server.rest("/v1/models/plum")
    assert code == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize("request_, message", [
    (lambda: predict_request(name="other"), "unknown model 'other'"),
    (lambda: predict_request(k=0), "k must be an integer from 1 to 10"),
    (lambda: predict_request(k=11), "k must be an integer from 1 to 10"),
    (lambda: predict_pb2.PredictRequest(model_spec={"name": "plum"}), "input 'user_id' is missing"),
    (lambda: predict_request(user_id=tensor([1.5], types_pb2.DT_FLOAT)), "has dtype DT_FLOAT; expected DT_STRING"),
    (lambda: predict_request(colour=tensor(["red"], types_pb2.DT_STRING)), "unknown input(s) 'colour'"),
    (lambda: predict_request(context=tensor(["{not json"], types_pb2.DT_STRING, [])), "context must be a JSON"),
    (lambda: _versioned(99), "version 99 of model 'plum' is not available"),
])
def test_bad_requests_get_invalid_argument_with_a_reason(server, request_, message):
    with pytest.raises(grpc.RpcError) as caught:
        server.predict.Predict(request_(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert server.predict.Predict(predict_request(), timeout=30).model_spec.version.value == 1  # still serving


def test_stock_client_tensors_of_any_integer_or_float_width_get_the_same_answer(server):
    """tf.make_tensor_proto of numpy arrays (packed into tensor_content) of any integer width for k and of
    any float width for history_rewards answer as the canonical request does, over gRPC and over REST."""
    import numpy as np
    import tensorflow as tf

    history = ["item-3-0", "item-3-1", "item-3-2"]

    def answer(k, rewards) -> list[str]:
        request = predict_request(("user-1",), k=5, history=tf.make_tensor_proto(np.array(history)),
                                  history_rewards=tf.make_tensor_proto(rewards))
        request.inputs["k"].CopyFrom(tf.make_tensor_proto(k))
        response = server.predict.Predict(request, timeout=60)
        return [v.decode() for v in response.outputs["item_ids"].string_val]

    canonical = answer(np.array(4, np.int64), np.array([1.0, 0.0, 1.0], np.float32))
    assert len(canonical) == 4
    for k_dtype, reward_dtype in [(np.int8, np.float16), (np.int16, np.float64), (np.int32, np.int32),
                                  (np.uint8, np.float32), (np.uint64, np.int64)]:
        assert answer(np.array(4, k_dtype), np.array([1, 0, 1], reward_dtype)) == canonical, (k_dtype, reward_dtype)
    # A different reward changes the prompt, so the answer is not fixed whatever the inputs are.
    assert answer(np.array(4, np.int64), np.array([0.0, 1.0, 0.0], np.float32)) != canonical
    code, body = server.rest("/v1/models/plum:predict", {"instances": [
        {"user_id": "user-1", "k": 4, "history": history, "history_rewards": [1, 0, 1]}]})
    assert code == 200 and body["predictions"][0]["item_ids"] == canonical
    with pytest.raises(grpc.RpcError) as caught:
        answer(np.array(4.0, np.float32), np.array([1.0, 0.0, 1.0], np.float32))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'k' has dtype DT_FLOAT; expected DT_INT64 or any integer dtype" in caught.value.details()


def _versioned(version: int) -> predict_pb2.PredictRequest:
    request = predict_request()
    request.model_spec.version.value = version
    return request


def test_rest_predict_and_its_errors(server):
    code, body = server.rest("/v1/models/plum:predict", {"instances": [{"user_id": "user-3", "k": 3}]})
    assert code == 200 and len(body["predictions"][0]["item_ids"]) == 3 and body["model_version"] == 1
    code, body = server.rest("/v1/models/plum:predict", {"inputs": {"user_id": ["user-3", "user-4"], "k": 2}})
    assert code == 200 and len(body["outputs"]["item_ids"]) == 2
    code, body = server.rest("/v1/models/plum:predict", {"instances": [{"k": 3}]})
    assert code == 400 and "user_id" in body["error"]
    code, body = server.rest("/v1/models/nope:predict", {"instances": [{"user_id": "u"}]})
    assert code == 400 and "unknown model" in body["error"]


def _metrics(server) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_prometheus_metrics_count_requests_batches_and_version_states(server):
    before = _metrics(server)
    for users in (("user-1",), ("user-2", "user-3"), ("user-4",)):
        server.predict.Predict(predict_request(users, k=3), timeout=60)
    with pytest.raises(grpc.RpcError):
        server.predict.Predict(predict_request(k=0), timeout=30)
    after = _metrics(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("plum_serving_requests_total", outcome="ok") == 3
    assert delta("plum_serving_requests_total", outcome="invalid") == 1
    assert delta("plum_serving_request_seconds_count") == 3
    assert delta("plum_serving_batch_size_sum") == 4  # four users, in however many batches
    assert delta("plum_serving_batch_seconds_count", stage="search") == delta("plum_serving_batch_size_count") >= 1
    assert after[("plum_serving_version_state", (("state", "AVAILABLE"), ("version", "1")))] == 1


def test_management_calls_need_the_token(server):
    request = model_management_pb2.ReloadConfigRequest()
    config = request.config.model_config_list.config.add()
    config.name = "plum"
    config.model_version_policy.latest.num_versions = 1
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as caught:
            server.models.HandleReloadConfigRequest(request, metadata=metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = (server.cfg.paths.state("serving", "token")).read_text().strip()
    server.models.HandleReloadConfigRequest(request, metadata=(("authorization", f"Bearer {token}"),), timeout=120)


def test_hot_swap_under_load_fails_no_request_and_a_corrupt_version_is_refused(server):
    model_dir = server.cfg.paths.model_dir
    failures: list[str] = []
    versions: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = server.predict.Predict(predict_request(("user-5",), k=3), timeout=30)
                versions.append(response.model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        server.wait_for(lambda: len(versions) > 20)
        before = max(version_numbers(model_dir))
        model, manifest, item_ids, sids = load_version(model_dir, before)
        new = int(export_version(model_dir, model, {k: v for k, v in manifest.items() if k != "version"},
                                 item_ids, sids).name)
        server.wait_for(lambda: versions and versions[-1] == new)
        server.wait_for(lambda: server.status().get(before, ("",))[0] == "END")
        # A corrupt version (complete directory name, broken manifest) is refused; the new one stays.
        broken = model_dir / str(new + 1)
        shutil.copytree(model_dir / str(new), model_dir / f".tmp-{new + 1}")
        (model_dir / f".tmp-{new + 1}" / "manifest.json").write_text("{broken")
        os.replace(model_dir / f".tmp-{new + 1}", broken)
        server.wait_for(lambda: server.status().get(new + 1, ("",))[0] == "END")
        count = len(versions)
        server.wait_for(lambda: len(versions) > count + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert set(versions) == {before, new} or set(versions) == {new}
    assert versions[-1] == new
    status = server.status()
    assert status[new] == ("AVAILABLE", "") and "not valid JSON" in status[new + 1][1]
