"""Settings every infermesh process shares; each service subclasses with its own prefix."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.tls import TlsSettings


class BaseServiceSettings(BaseSettings):
    """Common settings: where to listen, how to log, how long to drain on shutdown."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 in containers."""

    grpc_port: int = 0
    """Port where to listen for gRPC connections; 0 lets the OS pick one."""

    metrics_port: int = 0
    """Port of the Prometheus `/metrics` endpoint; 0 lets the OS pick one."""

    metrics_enabled: bool = True
    """Serve `/metrics` (the port is needed only then)."""

    log_json: bool = False
    """Write logs as JSON lines instead of plain text."""

    log_level: str = "INFO"
    """Root log level."""

    shutdown_grace_seconds: float = 5.0
    """How long in-flight calls may finish after SIGTERM before they are cancelled."""

    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message accepted or sent."""

    max_concurrent_rpcs: int = Field(default=256, gt=0)
    """Calls the gRPC server handles at once; past it a call is refused at once with
    RESOURCE_EXHAUSTED (429 through the gateway) naming the limit, so a flood of callers
    cannot hold unbounded memory (each call up to `max_message_bytes`) whatever a service's
    own queue admits (the inference batch queue counts sequences, the explainer's calls).
    Health checks are never refused, so probes do not fail because the server is busy."""

    tls: TlsSettings = Field(default_factory=TlsSettings)
    """Mutual TLS of the gRPC server and of its clients; read from INFERMESH_TLS_*, which
    every process shares (off when unset)."""
