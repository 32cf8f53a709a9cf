from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Settings of the REST gateway (env prefix INFERMESH_GATEWAY_)."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 in containers."""

    http_port: int = 8080
    """Port of the REST API and the pages."""

    grpc_port: int = 50050
    """Port of the `infermesh.pipeline.v1.Pipeline` gRPC service; 0 lets the OS pick one."""

    tokenizer: str = "127.0.0.1:50051"
    """Tokenizer service address."""

    inference: str = "127.0.0.1:8001"
    """Inference service address."""

    postprocessor: str = "127.0.0.1:50052"
    """Post-processor address."""

    explainer: str = "127.0.0.1:50053"
    """Explainer address."""

    model_name: str = "finance-sentiment"
    """Model the /v1 routes use."""

    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted (413 beyond)."""

    max_texts: int = 64
    """Texts per /v1/sentiment request (413 beyond)."""

    request_timeout_seconds: float = 10.0
    """Deadline for one request's pipeline call (504 beyond)."""

    explain_timeout_seconds: float = 30.0
    """Deadline for one explanation (504 beyond)."""

    api_keys: list[SecretStr] = []
    """Keys accepted in `Authorization: Bearer <key>` or `X-API-Key`; empty: no auth (warned at start)."""

    dashboard: bool = True
    """Serve /dashboard, fed from the monitor's Kafka topics."""

    otlp_receiver_port: int | None = None
    """Run an OTLP/gRPC trace receiver on this port and show what it receives at /traces
    (`infermesh run` turns it on, on 4317); unset: no receiver."""

    trace_store_max_traces: int = 500
    """Traces the receiver keeps (newest first out of memory last)."""

    log_json: bool = False
    """Write logs as JSON lines."""

    log_level: str = "INFO"
    """Root log level."""
