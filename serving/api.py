"""The TensorFlow Serving API of PLUM-stream: request parsing, the signature, model status and config
reload, shared by the gRPC servicers (serving/grpc_server.py) and the REST gateway (serving/rest.py).

Signature `serving_default` (method `tensorflow/serving/predict`):
  inputs   user_id       DT_STRING [] or [N]   required; N <= max_batch
           k             DT_INT32/DT_INT64 []  optional, default 10, 1 <= k <= beam width
           history       DT_STRING [H]         optional override of the stored history (one user only)
           history_rewards DT_FLOAT [H]        optional, with history (default 1.0 each)
           context       DT_STRING []          optional JSON object of context-feature values
           exclude_seen  DT_BOOL []            optional, default true
  outputs  item_ids      DT_STRING [N, k]      "" where fewer than k items were found
           sids          DT_INT64 [N, k, D]    the items' SIDs (codes + collision suffix), -1 padded
           scores        DT_FLOAT [N, k]       log-probability of each SID, -inf padded
           model_version DT_INT64 []           the version that answered
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving.engine import Recommendation, Request
from serving.versions import VersionStatus

SIGNATURE = "serving_default"
METHOD = "tensorflow/serving/predict"
DEFAULT_K = 10
INPUTS = {"user_id": types_pb2.DT_STRING, "k": types_pb2.DT_INT64, "history": types_pb2.DT_STRING,
          "history_rewards": types_pb2.DT_FLOAT, "context": types_pb2.DT_STRING, "exclude_seen": types_pb2.DT_BOOL}
OUTPUTS = {"item_ids": types_pb2.DT_STRING, "sids": types_pb2.DT_INT64, "scores": types_pb2.DT_FLOAT,
           "model_version": types_pb2.DT_INT64}
STATES = dict(get_model_status_pb2.ModelVersionStatus.State.items())


class InvalidRequest(Exception):
    """A client mistake; the message says what is wrong (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Target:
    """What a request asks for: model name, and optionally a version or a label."""

    name: str
    version: int | None
    label: str | None


# Tensors -------------------------------------------------------------------------------------------
def tensor_values(name: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto's values as a numpy array of its shape (the value lists, not tensor_content)."""
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    dtype = proto.dtype
    if dtype == types_pb2.DT_STRING:
        try:
            values = [v.decode("utf-8") for v in proto.string_val]
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {name!r} holds bytes that are not UTF-8") from None
        array = np.array(values, dtype=object)
    elif dtype in (types_pb2.DT_INT32, types_pb2.DT_INT64):
        raw = proto.int_val if dtype == types_pb2.DT_INT32 else proto.int64_val
        array = np.array(list(raw), np.int64)
        if proto.tensor_content:
            array = np.frombuffer(proto.tensor_content, np.int32 if dtype == types_pb2.DT_INT32 else np.int64)
    elif dtype == types_pb2.DT_FLOAT:
        array = np.frombuffer(proto.tensor_content, np.float32) if proto.tensor_content else \
            np.array(list(proto.float_val), np.float32)
    elif dtype == types_pb2.DT_BOOL:
        array = np.array(list(proto.bool_val), bool)
    else:
        raise InvalidRequest(f"input {name!r} has dtype {types_pb2.DataType.Name(dtype)}; expected "
                             f"{types_pb2.DataType.Name(INPUTS.get(name, types_pb2.DT_STRING))}")
    size = int(np.prod(shape)) if shape else 1
    if array.size == 1 and size > 1:
        array = np.repeat(array, size)  # TF Serving's shorthand: one value fills the shape
    if array.size != size:
        raise InvalidRequest(f"input {name!r} has shape {list(shape)} but {array.size} values")
    return array.reshape(shape)


def make_tensor(array: np.ndarray | list | int, dtype: int) -> tensor_pb2.TensorProto:
    array = np.asarray(array, dtype=object if dtype == types_pb2.DT_STRING else None)
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(n)) for n in array.shape]))
    flat = array.reshape(-1).tolist()
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(str(v).encode() for v in flat)
    elif dtype == types_pb2.DT_INT64:
        proto.int64_val.extend(int(v) for v in flat)
    elif dtype == types_pb2.DT_INT32:
        proto.int_val.extend(int(v) for v in flat)
    elif dtype == types_pb2.DT_FLOAT:
        proto.float_val.extend(float(v) for v in flat)
    elif dtype == types_pb2.DT_BOOL:
        proto.bool_val.extend(bool(v) for v in flat)
    return proto


# Requests ------------------------------------------------------------------------------------------
def target_of(spec: Any, served_name: str) -> Target:
    """The model spec's name/version/label, checked against the served model."""
    if not spec.name:
        raise InvalidRequest("model_spec.name is missing")
    if spec.name != served_name:
        raise InvalidRequest(f"unknown model {spec.name!r}; this server serves {served_name!r}")
    if spec.signature_name not in ("", SIGNATURE):
        raise InvalidRequest(f"unknown signature {spec.signature_name!r}; the model has {SIGNATURE!r}")
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return Target(spec.name, int(spec.version.value), None)
    if which == "version_label":
        return Target(spec.name, None, spec.version_label)
    return Target(spec.name, None, None)


def parse_inputs(inputs: dict[str, np.ndarray], beam_width: int, max_batch: int) -> list[Request]:
    """Validated requests from named input arrays (gRPC tensors or REST JSON, already arrays)."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InvalidRequest(f"unknown input(s) {', '.join(map(repr, unknown))}; the signature takes "
                             f"{', '.join(INPUTS)}")
    if "user_id" not in inputs:
        raise InvalidRequest("input 'user_id' is missing")
    users = np.asarray(inputs["user_id"])
    if users.ndim > 1 or users.size == 0:
        raise InvalidRequest("input 'user_id' must be a string or a list of 1 or more strings")
    users = users.reshape(-1)
    if len(users) > max_batch:
        raise InvalidRequest(f"{len(users)} users in one request; at most {max_batch}")
    if not all(isinstance(u, str) and u for u in users):
        raise InvalidRequest("input 'user_id' must hold non-empty strings")
    k = _scalar(inputs, "k", DEFAULT_K)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= int(k) <= beam_width:
        raise InvalidRequest(f"k must be an integer from 1 to {beam_width} (the beam width), got {k!r}")
    exclude = _scalar(inputs, "exclude_seen", True)
    if not isinstance(exclude, (bool, np.bool_)):
        raise InvalidRequest(f"exclude_seen must be a boolean, got {exclude!r}")
    context: dict[str, Any] = {}
    if "context" in inputs:
        raw = _scalar(inputs, "context", "")
        try:
            context = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"context must be a JSON object: {exc}") from None
        if not isinstance(context, dict):
            raise InvalidRequest("context must be a JSON object of feature name -> value")
    history = rewards = None
    if "history" in inputs:
        if len(users) != 1:
            raise InvalidRequest("a history override applies to one user; send one user_id with it")
        history = tuple(str(i) for i in np.asarray(inputs["history"]).reshape(-1))
        if "history_rewards" in inputs:
            rewards = tuple(float(r) for r in np.asarray(inputs["history_rewards"], np.float64).reshape(-1))
            if len(rewards) != len(history):
                raise InvalidRequest(f"history_rewards has {len(rewards)} values for {len(history)} history items")
    elif "history_rewards" in inputs:
        raise InvalidRequest("history_rewards needs a history")
    return [Request(str(u), int(k), history, rewards, context, bool(exclude)) for u in users]


def _scalar(inputs: dict[str, np.ndarray], name: str, default: Any) -> Any:
    if name not in inputs:
        return default
    value = np.asarray(inputs[name])
    if value.size != 1:
        raise InvalidRequest(f"input {name!r} must be a scalar, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item


def grpc_inputs(request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    out = {}
    for name, proto in request.inputs.items():
        expected = INPUTS.get(name)
        if expected is not None and not _dtype_ok(proto.dtype, expected):
            raise InvalidRequest(f"input {name!r} has dtype {types_pb2.DataType.Name(proto.dtype)}; expected "
                                 f"{types_pb2.DataType.Name(expected)}")
        out[name] = tensor_values(name, proto)
    return out


def _dtype_ok(got: int, expected: int) -> bool:
    return got == expected or (expected == types_pb2.DT_INT64 and got == types_pb2.DT_INT32) or \
        (expected == types_pb2.DT_FLOAT and got == types_pb2.DT_DOUBLE)


# Responses -----------------------------------------------------------------------------------------
def output_arrays(results: list[Recommendation], k: int) -> dict[str, np.ndarray]:
    depth = max((len(s) for r in results for s in r.sids), default=0)
    items = np.full((len(results), k), "", dtype=object)
    sids = np.full((len(results), k, depth), -1, np.int64)
    scores = np.full((len(results), k), -np.inf, np.float32)
    for row, result in enumerate(results):
        n = len(result.item_ids)
        items[row, :n] = result.item_ids
        if n:
            sids[row, :n] = np.array(result.sids, np.int64)
        scores[row, :n] = result.scores
    return {"item_ids": items, "sids": sids, "scores": scores}


def predict_response(name: str, results: list[Recommendation], k: int) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    version = results[0].version
    response.model_spec.name = name
    response.model_spec.version.value = version
    response.model_spec.signature_name = SIGNATURE
    for key, array in output_arrays(results, k).items():
        response.outputs[key].CopyFrom(make_tensor(array, OUTPUTS[key]))
    response.outputs["model_version"].CopyFrom(make_tensor(np.int64(version), types_pb2.DT_INT64))
    return response


def signature_def() -> meta_graph_pb2.SignatureDef:
    sig = meta_graph_pb2.SignatureDef(method_name=METHOD)
    shapes = {"user_id": [-1], "k": [], "history": [-1], "history_rewards": [-1], "context": [],
              "exclude_seen": [], "item_ids": [-1, -1], "sids": [-1, -1, -1], "scores": [-1, -1],
              "model_version": []}
    for table, spec in ((sig.inputs, INPUTS), (sig.outputs, OUTPUTS)):
        for key, dtype in spec.items():
            info = table[key]
            info.name, info.dtype = key, dtype
            info.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shapes[key])
    return sig


def metadata_response(name: str, version: int) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = version
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signatures.signature_def[SIGNATURE].CopyFrom(signature_def())
    response.metadata["signature_def"].Pack(signatures)
    return response


def status_response(statuses: list[VersionStatus], version: int | None = None
                    ) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        if version is not None and status.version != version:
            continue
        entry = response.model_version_status.add()
        entry.version, entry.state = status.version, STATES[status.state]
        if status.error:
            entry.status.error_code = 3  # tensorflow.error.INVALID_ARGUMENT: the version's files are bad
            entry.status.error_message = status.error
    return response
