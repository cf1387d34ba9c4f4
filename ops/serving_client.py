"""A gRPC client of `plum serve` (TensorFlow Serving's PredictionService and ModelService): one
user's Predict request, the response read back as recommendations, the versions' states.

It imports TensorFlow's protos (seconds): import it only where a client is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
)

from serving.api import make_tensor, tensor_values

K = 10


@dataclass(frozen=True)
class Recommended:
    """One recommended item: its id, its SID (codes + collision suffix) and the search's score."""

    item_id: str
    sid: tuple[int, ...]
    score: float


def predict_request(model_name: str, user_id: str, k: int = K, label: str | None = None) -> predict_pb2.PredictRequest:
    """Top-k for one user (history from the server's feature store); `label` asks for a labelled version."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["user_id"].CopyFrom(make_tensor(np.array([user_id], object), types_pb2.DT_STRING))
    request.inputs["k"].CopyFrom(make_tensor(np.int64(k), types_pb2.DT_INT64))
    return request


def predict_requests(model_name: str, user_ids: list[str], k: int = K) -> list[predict_pb2.PredictRequest]:
    """One single-user Predict request per user."""
    return [predict_request(model_name, user, k) for user in user_ids]


def read_response(response: predict_pb2.PredictResponse) -> tuple[int, list[list[Recommended]]]:
    """The version that answered and, per requested user, the items found (padding dropped)."""
    items = tensor_values("item_ids", response.outputs["item_ids"])
    sids = tensor_values("sids", response.outputs["sids"])
    scores = tensor_values("scores", response.outputs["scores"])
    rows = [[Recommended(str(item), tuple(int(c) for c in sid if c >= 0), float(score))
             for item, sid, score in zip(item_row, sid_row, score_row) if item]
            for item_row, sid_row, score_row in zip(items, sids, scores)]
    return int(response.model_spec.version.value), rows


class ServingClient:
    """Stubs for one model of a server at `target` (host:port)."""

    def __init__(self, target: str, model_name: str) -> None:
        self.model_name = model_name
        self.channel = grpc.insecure_channel(target)
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def wait_connected(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def states(self) -> dict[int, str]:
        """Each version the server knows of, and its state (START, LOADING, AVAILABLE, UNLOADING, END)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        response = self.models.GetModelStatus(request, timeout=10)
        names = get_model_status_pb2.ModelVersionStatus.State
        return {s.version: names.Name(s.state) for s in response.model_version_status}

    def recommend(self, user_id: str, k: int = K, label: str | None = None,
                  timeout: float = 30.0) -> tuple[int, list[Recommended]]:
        """One user's top-k; returns the version that answered and the items."""
        version, rows = read_response(self.predict.Predict(predict_request(self.model_name, user_id, k, label),
                                                           timeout=timeout))
        return version, rows[0]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
