"""The TensorFlow Serving API of PLUM-stream: request parsing, the signature, model status and config
reload, shared by the gRPC servicers (serving/server.py) and the REST gateway (serving/rest.py).

Signature `serving_default` (method `tensorflow/serving/predict`):
  inputs   user_id       DT_STRING [] or [N]   required; N <= max_batch
           k             DT_INT64 []           optional, default 10, 1 <= k <= beam width
           history       DT_STRING [H]         optional override of the stored history (one user only)
           history_rewards DT_FLOAT [H]        optional, with history (default 1.0 each)
           context       DT_STRING []          optional JSON object of context-feature values
           exclude_seen  DT_BOOL []            optional, default true
  outputs  item_ids      DT_STRING [N, k]      "" where fewer than k items were found
           sids          DT_INT64 [N, k, D]    the items' SIDs (codes + collision suffix), -1 padded
           scores        DT_FLOAT [N, k]       log-probability of each SID, -inf padded
           model_version DT_INT64 []           the version that answered
Inputs are decoded by kind, the same way for gRPC tensors and REST JSON: ids (user_id, history) are
strings or integers of any width (sent as their decimal strings); k is an integer of any width;
history_rewards are numbers of any float or integer width. `tf.make_tensor_proto` of Python values
or numpy arrays of these kinds is accepted as it comes; any other dtype is INVALID_ARGUMENT naming
the input, the dtype received and what to send.
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
# The value field and numpy dtype of each TensorProto dtype this server reads (tensor_content, where
# a client packs values, holds the same numpy dtype's bytes).
_PROTO_VALUES = {
    types_pb2.DT_STRING: ("string_val", np.dtype(object)), types_pb2.DT_BOOL: ("bool_val", np.dtype(bool)),
    types_pb2.DT_INT8: ("int_val", np.dtype(np.int8)), types_pb2.DT_INT16: ("int_val", np.dtype(np.int16)),
    types_pb2.DT_INT32: ("int_val", np.dtype(np.int32)), types_pb2.DT_INT64: ("int64_val", np.dtype(np.int64)),
    types_pb2.DT_UINT8: ("int_val", np.dtype(np.uint8)), types_pb2.DT_UINT16: ("int_val", np.dtype(np.uint16)),
    types_pb2.DT_UINT32: ("uint32_val", np.dtype(np.uint32)), types_pb2.DT_UINT64: ("uint64_val", np.dtype(np.uint64)),
    types_pb2.DT_HALF: ("half_val", np.dtype(np.float16)), types_pb2.DT_FLOAT: ("float_val", np.dtype(np.float32)),
    types_pb2.DT_DOUBLE: ("double_val", np.dtype(np.float64)),
}
_DTYPE_NAMES = {numpy: types_pb2.DataType.Name(dtype) for dtype, (_, numpy) in _PROTO_VALUES.items()}


def _dtype_name(dtype: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"number {dtype} (no TensorFlow dtype)"


def tensor_values(name: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto's values as a numpy array of its shape and dtype (strings as str objects), from its
    value list or its tensor_content; one value fills the whole shape (TF Serving's shorthand)."""
    if proto.dtype not in _PROTO_VALUES:
        raise _wrong_dtype(name, _dtype_name(proto.dtype))
    field, dtype = _PROTO_VALUES[proto.dtype]
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if dtype == object:
        if proto.tensor_content:
            raise InvalidRequest(f"input {name!r} packs strings in tensor_content; send them in string_val "
                                 "(as tf.make_tensor_proto does)")
        try:
            array = np.array([v.decode("utf-8") for v in proto.string_val], dtype=object)
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {name!r} holds bytes that are not UTF-8") from None
    elif proto.tensor_content:
        if len(proto.tensor_content) % dtype.itemsize:
            raise InvalidRequest(f"input {name!r} has {len(proto.tensor_content)} bytes of tensor_content, "
                                 f"not a whole number of {_DTYPE_NAMES[dtype]} values")
        array = np.frombuffer(proto.tensor_content, dtype)
    elif proto.dtype == types_pb2.DT_HALF:  # half_val holds the float16 bit patterns
        array = np.array(list(proto.half_val), np.uint16).view(np.float16)
    else:
        array = np.array(list(getattr(proto, field)), dtype)
    size = int(np.prod(shape)) if shape else 1
    if array.size == 1 and size > 1:
        array = np.repeat(array, size)
    if array.size != size:
        raise InvalidRequest(f"input {name!r} has shape {list(shape)} but {array.size} values")
    return array.reshape(shape)


def json_values(name: str, value: Any) -> np.ndarray:
    """A REST input as an array whose dtype is what the JSON held: booleans (bool), integers (int64),
    numbers (float64), strings (object); anything else (null, objects, a mix) stays an object array,
    which the decoders below refuse unless the input takes it (context takes an object)."""
    array = np.array(value, dtype=object)
    flat = list(array.reshape(-1))
    if any(isinstance(v, list) for v in flat):
        raise InvalidRequest(f"input {name!r} is a list of lists of different lengths; send a rectangular array")
    if not flat:
        return array
    if all(isinstance(v, bool) for v in flat):
        return array.astype(bool)
    if all(isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in flat):
        return array.astype(np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        return array.astype(np.float64)
    return array


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


# Decoding by kind of input (the same for gRPC tensors and REST JSON) ---------------------------------
IDS, INTEGER, NUMBERS, FLAG, JSON_OBJECT = "ids", "integer", "numbers", "flag", "json"
INPUT_KINDS = {"user_id": IDS, "k": INTEGER, "history": IDS, "history_rewards": NUMBERS, "context": JSON_OBJECT,
               "exclude_seen": FLAG}
# What each kind takes, as a refusal says it.
_SEND = {
    IDS: "DT_STRING or any integer dtype (JSON strings or integers): ids as strings or integers",
    INTEGER: "DT_INT64 or any integer dtype (a JSON integer): an integer",
    NUMBERS: "DT_FLOAT or any float or integer dtype (JSON numbers): numbers",
    FLAG: "DT_BOOL (JSON true or false): a boolean",
    JSON_OBJECT: "DT_STRING holding a JSON object (over REST, the object itself)",
}


def _received(values: np.ndarray) -> str:
    """The dtype of decoded values, as a refusal names it: the TensorFlow dtype, or the JSON types."""
    if values.dtype != object:
        return _DTYPE_NAMES.get(values.dtype, str(values.dtype))
    kinds = sorted({"string" if isinstance(v, str) else "null" if v is None else type(v).__name__
                    for v in values.reshape(-1)})
    return "DT_STRING" if kinds == ["string"] else f"JSON {'/'.join(kinds)}"


def _wrong_dtype(name: str, received: str) -> InvalidRequest:
    if name not in INPUT_KINDS:
        return InvalidRequest(f"input {name!r} has dtype {received}, which no input of this signature takes")
    return InvalidRequest(f"input {name!r} has dtype {received}; expected {_SEND[INPUT_KINDS[name]]}")


def decode_ids(name: str, values: np.ndarray) -> tuple[str, ...]:
    """Ids as the signature has them (strings): strings as they are, integers of any width in decimal."""
    flat = values.reshape(-1)
    if values.dtype.kind in "iu":
        return tuple(str(int(v)) for v in flat)
    if values.dtype == object and all(isinstance(v, str) for v in flat):
        return tuple(flat)
    raise _wrong_dtype(name, _received(values))


def decode_numbers(name: str, values: np.ndarray, integer: bool = False) -> np.ndarray:
    """Numbers of any integer width, or unless `integer` of any float width too, as int64 / float64."""
    if values.size == 0 and values.dtype == object:  # an empty JSON list
        values = values.astype(np.float64)
    if values.dtype.kind in "iu" or (values.dtype.kind == "f" and not integer):
        return values.astype(np.int64 if integer else np.float64)
    raise _wrong_dtype(name, _received(values))


def decode_flag(name: str, values: np.ndarray) -> bool:
    """A boolean scalar."""
    if values.dtype.kind != "b":
        raise _wrong_dtype(name, _received(values))
    return bool(_scalar(name, values))


def decode_json_object(name: str, values: np.ndarray) -> dict[str, Any]:
    """A JSON object, sent as a string holding it (or over REST as the object itself)."""
    raw = _scalar(name, values) if values.dtype == object else None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{name} must be a JSON object: {exc}") from None
    elif not isinstance(raw, dict):
        raise _wrong_dtype(name, _received(values))
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{name} must be a JSON object of feature name -> value")
    return raw


def _scalar(name: str, values: np.ndarray) -> Any:
    if values.size != 1:
        raise InvalidRequest(f"input {name!r} must be a scalar, got shape {list(values.shape)}")
    item = values.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item


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


def _check_names(names: Any) -> None:
    unknown = sorted(set(names) - set(INPUTS))
    if unknown:
        raise InvalidRequest(f"unknown input(s) {', '.join(map(repr, unknown))}; the signature takes "
                             f"{', '.join(INPUTS)}")
    if "user_id" not in names:
        raise InvalidRequest("input 'user_id' is missing")


def parse_inputs(inputs: dict[str, np.ndarray], beam_width: int, max_batch: int) -> list[Request]:
    """Validated requests from named input arrays (tensor_values of gRPC tensors, json_values of REST)."""
    _check_names(inputs)
    if inputs["user_id"].ndim > 1 or inputs["user_id"].size == 0:
        raise InvalidRequest("input 'user_id' must be a string or a list of 1 or more strings")
    users = decode_ids("user_id", inputs["user_id"])
    if len(users) > max_batch:
        raise InvalidRequest(f"{len(users)} users in one request; at most {max_batch}")
    if not all(users):
        raise InvalidRequest("input 'user_id' must hold non-empty strings")
    k = int(_scalar("k", decode_numbers("k", inputs["k"], integer=True))) if "k" in inputs else DEFAULT_K
    if not 1 <= k <= beam_width:
        raise InvalidRequest(f"k must be an integer from 1 to {beam_width} (the beam width), got {k}")
    exclude = decode_flag("exclude_seen", inputs["exclude_seen"]) if "exclude_seen" in inputs else True
    context = decode_json_object("context", inputs["context"]) if "context" in inputs else {}
    history = rewards = None
    if "history" in inputs:
        if len(users) != 1:
            raise InvalidRequest("a history override applies to one user; send one user_id with it")
        history = decode_ids("history", inputs["history"])
        if "history_rewards" in inputs:
            values = decode_numbers("history_rewards", inputs["history_rewards"]).reshape(-1)
            if not np.isfinite(values).all():
                raise InvalidRequest("history_rewards must be finite numbers")
            rewards = tuple(float(r) for r in values)
            if len(rewards) != len(history):
                raise InvalidRequest(f"history_rewards has {len(rewards)} values for {len(history)} history items")
    elif "history_rewards" in inputs:
        raise InvalidRequest("history_rewards needs a history")
    return [Request(u, k, history, rewards, context, exclude) for u in users]


def grpc_inputs(request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    """A Predict request's input tensors as arrays (names checked first)."""
    _check_names(request.inputs)
    return {name: tensor_values(name, proto) for name, proto in request.inputs.items()}


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
