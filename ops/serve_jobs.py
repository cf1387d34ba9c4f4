"""`plum serve`: the serving tier over the model base path, the Feast online store and a management
token (created beside the state when none is configured)."""

from __future__ import annotations

import secrets
import signal
import threading
from pathlib import Path

import click

from ops.config import PlumConfig
from ops.errors import PlumError
from ops.runtime import announce


def management_token(cfg: PlumConfig) -> tuple[str, Path]:
    """The token management calls must present, from the configured file or <state>/serving/token."""
    path = Path(cfg.serving.token_file) if cfg.serving.token_file else cfg.paths.state("serving", "token")
    if not path.is_file():
        if cfg.serving.token_file:
            raise PlumError(f"The management token file {path} does not exist.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    token = path.read_text().strip()
    if not token:
        raise PlumError(f"The management token file {path} is empty.")
    return token, path


def serve(cfg: PlumConfig, stop: threading.Event | None = None, ready: threading.Event | None = None) -> None:
    """Run the gRPC server (and the REST gateway) until SIGINT/SIGTERM or `stop`."""
    from features import FeatureStoreClient
    from serving.rest import start_rest
    from serving.server import ModelServer, start_grpc
    from serving.user_features import OnlineUserFeatures
    from serving.versions import ServingConfig, VersionPolicy

    settings = cfg.serving
    token, token_path = management_token(cfg)
    tls = None
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise PlumError("TLS needs both serving.tls_cert and serving.tls_key.")
    if settings.tls_cert:
        try:
            tls = (Path(settings.tls_cert).read_bytes(), Path(settings.tls_key).read_bytes())
        except OSError as exc:
            raise PlumError(f"Cannot read the TLS files: {exc}") from None
    policy = VersionPolicy(settings.policy, settings.num_versions, tuple(settings.versions))
    config = ServingConfig(cfg.paths.model_name, cfg.paths.model_dir, policy, None, settings.canary_share)
    store = FeatureStoreClient(cfg.feast_repo_dir, cfg.feast)
    core = ModelServer(config, settings, OnlineUserFeatures(store), token, say=click.echo)
    click.echo(f"serve: model {config.name!r} from {config.base_path} (policy {settings.policy}); "
               f"management token in {token_path}")
    core.start()
    try:
        grpc_server = start_grpc(core, settings.host, settings.grpc_port, settings.threads, tls)
    except OSError as exc:
        core.stop()
        raise PlumError(f"Cannot start the gRPC server: {exc}") from None
    rest = None
    if settings.rest:
        try:
            rest = start_rest(core, settings.host, settings.rest_port)
        except OSError as exc:
            grpc_server.server.stop(0)
            core.stop()
            raise PlumError(f"Cannot start the REST gateway on port {settings.rest_port}: {exc}") from None
    click.echo(f"serve: gRPC on {settings.host}:{grpc_server.port}{' (TLS)' if tls else ''}"
               + (f", REST on http://{settings.host}:{rest.port}" if rest else "")
               + f"; versions available: {core.manager.available() or 'none yet'}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    endpoints = {"grpc": f"{settings.host}:{grpc_server.port}"}
    if rest is not None:
        endpoints["rest"] = f"http://{settings.host}:{rest.port}"
    try:
        with announce(cfg, "serve", **endpoints):
            stop.wait()
    finally:
        click.echo("serve: stopping (in-flight requests finish)")
        if rest is not None:
            rest.stop()
        grpc_server.server.stop(grace=5).wait()
        core.stop()
