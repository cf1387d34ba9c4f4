"""Predict inputs decode by kind, the same for gRPC tensors (as tf.make_tensor_proto builds them) and
REST JSON: any integer width for ids and k, any float or integer width for rewards, a reason otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from serving.api import InvalidRequest, grpc_inputs, json_values, parse_inputs

pytestmark = pytest.mark.unit


def _grpc(**inputs):
    request = predict_pb2.PredictRequest()
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value))
    return parse_inputs(grpc_inputs(request), beam_width=10, max_batch=8)


def _rest(**inputs):
    return parse_inputs({name: json_values(name, value) for name, value in inputs.items()}, 10, 8)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_k_of_any_integer_width_is_read_as_its_value(dtype):
    [request] = _grpc(user_id=np.array(["u1"]), k=np.array(7, dtype))
    assert request.k == 7


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64])
def test_history_rewards_of_any_numeric_width_keep_their_values(dtype):
    [request] = _grpc(user_id=np.array(["u1"]), history=np.array(["a", "b", "c"]),
                      history_rewards=np.array([1, 0, 2], dtype))
    assert request.history == ("a", "b", "c") and request.rewards == (1.0, 0.0, 2.0)


def test_integer_ids_are_their_decimal_strings_over_grpc_and_rest():
    grpc_requests = _grpc(user_id=np.array([188, 7], np.int32))
    assert [r.user_id for r in grpc_requests] == ["188", "7"]
    [rest] = _rest(user_id=188, history=[1, 22, 333], k=3)
    assert rest.user_id == "188" and rest.history == ("1", "22", "333") and rest.k == 3


def test_tensor_content_packing_is_read_like_value_lists():
    packed = tf.make_tensor_proto(np.arange(4, dtype=np.int16))  # numpy arrays go into tensor_content
    assert packed.tensor_content
    [request] = _grpc(user_id=np.array(["u1"]), history=packed)
    assert request.history == ("0", "1", "2", "3")


def test_rest_and_grpc_give_the_same_requests():
    grpc_request = _grpc(user_id=np.array(["u1"]), k=np.array(4, np.int64), exclude_seen=np.array(False),
                         context=np.array('{"device": "tv"}'), history=np.array(["x", "y"]),
                         history_rewards=np.array([0.5, 1.0], np.float32))
    rest_request = _rest(user_id="u1", k=4, exclude_seen=False, context={"device": "tv"}, history=["x", "y"],
                         history_rewards=[0.5, 1.0])
    assert grpc_request == rest_request


@pytest.mark.parametrize("inputs, message", [
    (dict(user_id=np.array([1.5])), "input 'user_id' has dtype DT_DOUBLE; expected DT_STRING or any integer"),
    (dict(user_id=np.array(["u"]), k=np.array(2.0)), "input 'k' has dtype DT_DOUBLE; expected DT_INT64"),
    (dict(user_id=np.array(["u"]), k=np.array("3")), "input 'k' has dtype DT_STRING"),
    (dict(user_id=np.array(["u"]), exclude_seen=np.array(1)), "input 'exclude_seen' has dtype DT_INT64"),
    (dict(user_id=np.array(["u"]), history=np.array(["a"]), history_rewards=np.array(["high"])),
     "input 'history_rewards' has dtype DT_STRING"),
    (dict(user_id=np.array(["u"]), history=np.array(["a"]), history_rewards=np.array([np.nan], np.float32)),
     "history_rewards must be finite"),
])
def test_wrong_dtypes_are_refused_with_the_input_and_what_to_send(inputs, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        _grpc(**inputs)


@pytest.mark.parametrize("inputs, message", [
    (dict(user_id=[1.5]), "input 'user_id' has dtype DT_DOUBLE"),
    (dict(user_id="u", k="3"), "input 'k' has dtype DT_STRING"),
    (dict(user_id="u", k=True), "input 'k' has dtype DT_BOOL"),
    (dict(user_id="u", exclude_seen="no"), "input 'exclude_seen' has dtype DT_STRING"),
    (dict(user_id="u", history=["a", None]), "input 'history' has dtype JSON null/string"),
    (dict(user_id=["a", ["b"]]), "a list of lists of different lengths"),
    (dict(user_id="u", context=[1]), "input 'context' has dtype DT_INT64"),
])
def test_rest_json_of_the_wrong_type_is_refused_with_a_reason(inputs, message):
    with pytest.raises(InvalidRequest, match=message):
        _rest(**inputs)
