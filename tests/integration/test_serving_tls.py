"""TLS on the gRPC port: a client that trusts the server's certificate gets answers; a plaintext
client does not."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from serving.config import ServingSettings
from serving.server import ModelServer, start_grpc
from serving.versions import ServingConfig
from serving.user_features import UserFeatures
from tests.support.serving_state import build_serving_state

pytestmark = pytest.mark.integration


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_grpc_over_tls(tmp_path):
    cfg = build_serving_state(tmp_path / "state")
    settings = ServingSettings(max_batch=2)
    core = ModelServer(ServingConfig("plum", cfg.paths.model_dir), settings, lambda users: [UserFeatures()] * len(users),
                       token="t", say=lambda m: None)
    core.start()
    cert, key = self_signed()
    running = start_grpc(core, "127.0.0.1", 0, 4, tls=(cert, key))
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "plum"
    try:
        secure = grpc.secure_channel(f"localhost:{running.port}", grpc.ssl_channel_credentials(root_certificates=cert))
        response = model_service_pb2_grpc.ModelServiceStub(secure).GetModelStatus(request, timeout=30)
        assert [s.version for s in response.model_version_status] == [1]
        plain = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        with pytest.raises(grpc.RpcError) as caught:
            model_service_pb2_grpc.ModelServiceStub(plain).GetModelStatus(request, timeout=5)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        secure.close()
        plain.close()
    finally:
        running.server.stop(0)
        core.stop()
