"""The model server: version manager + dynamic batcher behind PredictionService and ModelService (gRPC,
the protos and stubs of tensorflow-serving-api), and the REST gateway on the same core.

Errors: a client mistake is INVALID_ARGUMENT with a message; a management call without the right
token is UNAUTHENTICATED; nothing a request does can stop the server (every handler maps its
failure to a status).
"""

from __future__ import annotations

import hmac
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.api import (
    InvalidRequest, Target, grpc_inputs, metadata_response, parse_inputs, predict_response, status_response,
    target_of,
)
from serving.batcher import Batcher, FeatureReader
from serving.config import ServingSettings
from serving.engine import Recommendation, Request
from serving.metrics import ServingMetrics
from serving.versions import ServingConfig, UnknownVersion, VersionManager, VersionPolicy

Say = Callable[[str], None]


class Unauthorized(Exception):
    """A management call without the right token."""


class ModelServer:
    """What both APIs call: predict, metadata, status, reload."""

    def __init__(self, config: ServingConfig, settings: ServingSettings, features: FeatureReader, token: str,
                 say: Say = print) -> None:
        self.settings, self.token, self.say = settings, token, say
        self.manager = VersionManager(config, settings.beam_width, settings.max_batch, say=say,
                                      poll_interval_s=settings.poll_interval_s)
        self.metrics = ServingMetrics()
        self.metrics.watch(self.manager)
        self.batcher = Batcher(self.manager, features, settings.max_batch, settings.max_wait_ms / 1000,
                               self.metrics)

    @property
    def name(self) -> str:
        return self.manager.config.name

    def start(self) -> None:
        try:  # the online store opens on its first read (about 0.4 s): not on a client's request
            self.batcher.features(["plum-warm-up"])
        except Exception as exc:  # reported here; requests retry the read and fail with the cause
            self.say(f"serve: warning: reading user features failed: {exc}")
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop()
        self.batcher.stop()

    def predict(self, target: Target, parse: Callable[[], list[Request]]) -> tuple[list[Request], list[Recommendation]]:
        """Parse (a client mistake raises InvalidRequest) and answer one Predict call, counted in the metrics."""
        started = time.perf_counter()
        outcome = "error"
        try:
            requests = parse()
            version = self.manager.choose(target.version, target.label)
            try:
                results = self.batcher.recommend(requests, version)
            except UnknownVersion:
                # The chosen version was unloaded between choosing and batching (a swap): choose again.
                version = self.manager.choose(target.version, target.label)
                results = self.batcher.recommend(requests, version)
            outcome = "ok"
            self.metrics.version_requests.labels(str(version)).inc()
            return requests, results
        except (InvalidRequest, UnknownVersion):
            outcome = "invalid"
            raise
        finally:
            self.metrics.requests.labels(outcome).inc()
            if outcome == "ok":
                self.metrics.latency.observe(time.perf_counter() - started)

    def check_token(self, presented: str | None) -> None:
        if not presented or not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise Unauthorized("management calls need the server's token: metadata 'authorization: Bearer <token>' "
                               "(gRPC) or the header 'Authorization: Bearer <token>' (REST)")

    def reload(self, model_configs: list[Any]) -> None:
        """HandleReloadConfigRequest: this server serves one model; its policy and labels may change."""
        if len(model_configs) != 1:
            raise InvalidRequest(f"this server serves exactly one model ({self.name!r}); the config lists "
                                 f"{len(model_configs)}")
        mc = model_configs[0]
        if mc.name != self.name:
            raise InvalidRequest(f"unknown model {mc.name!r}; this server serves {self.name!r}")
        if mc.base_path and Path(mc.base_path).resolve() != self.manager.config.base_path.resolve():
            raise InvalidRequest("changing the model's base path needs a restart of the server")
        which = mc.model_version_policy.WhichOneof("policy_choice")
        policy = self.manager.config.policy
        if which == "latest":
            policy = VersionPolicy("latest", max(1, mc.model_version_policy.latest.num_versions or 1))
        elif which == "specific":
            policy = VersionPolicy("specific", versions=tuple(mc.model_version_policy.specific.versions))
        elif which == "all":
            policy = VersionPolicy("all")
        labels = dict(mc.version_labels) if mc.version_labels else self.manager.config.labels
        self.manager.reconfigure(ServingConfig(self.name, self.manager.config.base_path, policy, labels,
                                               self.manager.config.canary_share))
        self.say(f"serve: config reloaded: policy {policy}, labels {labels if labels is not None else 'from labels.json'}")


def _status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, (InvalidRequest, UnknownVersion)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Unauthorized):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INTERNAL


def _guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Map a handler's failure to a gRPC status: client mistakes by type, anything else INTERNAL."""
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except (InvalidRequest, UnknownVersion, Unauthorized) as exc:
            context.abort(_status_for(exc), str(exc))
        except grpc.RpcError:
            raise
        except Exception as exc:  # never let one request take the server down
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    wrapper.__name__ = handler.__name__
    return wrapper


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer) -> None:
        self.server = server

    @_guarded
    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        target = target_of(request.model_spec, self.server.name)
        settings = self.server.settings
        requests, results = self.server.predict(
            target, lambda: parse_inputs(grpc_inputs(request), settings.beam_width, settings.max_batch))
        return predict_response(self.server.name, results, requests[0].k)

    @_guarded
    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                         context: grpc.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        target = target_of(request.model_spec, self.server.name)
        unknown = [f for f in request.metadata_field if f != "signature_def"]
        if unknown:
            raise InvalidRequest(f"metadata field(s) {unknown} unknown; only 'signature_def' is available")
        return metadata_response(self.server.name, self.server.manager.choose(target.version, target.label))


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer) -> None:
        self.server = server

    @_guarded
    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                       context: grpc.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        target = target_of(request.model_spec, self.server.name)
        return status_response(self.server.manager.snapshot(), target.version)

    @_guarded
    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest,
                                  context: grpc.ServicerContext) -> model_management_pb2.ReloadConfigResponse:
        metadata = dict(context.invocation_metadata())
        header = metadata.get("authorization", "")
        self.server.check_token(header[len("Bearer "):] if header.startswith("Bearer ") else None)
        self.server.reload(list(request.config.model_config_list.config))
        return model_management_pb2.ReloadConfigResponse()


@dataclass
class RunningGrpc:
    server: grpc.Server
    port: int


def start_grpc(core: ModelServer, host: str, port: int, threads: int, tls: tuple[bytes, bytes] | None = None
               ) -> RunningGrpc:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return RunningGrpc(server, bound)
