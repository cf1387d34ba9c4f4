"""Configuration of the serving tier (the `serving:` section of the project config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServingSettings(BaseModel):
    """`plum serve`: ports, decoding, batching, version policy, management token, TLS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    grpc_port: int = Field(8500, ge=0, le=65535)  # 0: a free port (printed)
    rest_port: int = Field(8501, ge=0, le=65535)  # 0: a free port; -1 is not allowed, use rest: false
    rest: bool = True
    # The widest beam this server runs: a version searches with the width its manifest records (the
    # search its gates judged, trainer.continuous.beam_width), capped at this (logged when it differs);
    # a manifest without one gets this. Also the largest k a request may ask for.
    beam_width: int = Field(10, ge=1, le=256)
    max_batch: int = Field(32, ge=1, le=64)
    max_wait_ms: float = Field(2.0, ge=0.0)
    threads: int = Field(64, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)
    policy: Literal["latest", "specific", "all"] = "latest"
    num_versions: int = Field(1, ge=1)
    versions: tuple[int, ...] = ()  # for policy "specific"
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    token_file: str = ""  # management token; default <state>/serving/token (created 0600 when missing)
    tls_cert: str = ""  # PEM files: both set = TLS on the gRPC port
    tls_key: str = ""
