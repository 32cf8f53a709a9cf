from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.apikeys import check_key_name, digest_of
from shared.errors import InputTooLarge
from shared.routing import RoutingSettings


class GatewaySettings(RoutingSettings):
    """Settings of the REST gateway (env prefix INFERMESH_GATEWAY_)."""

    # hide_input_in_errors: a refused api_keys value may be a plaintext key pasted by
    # mistake, and pydantic would otherwise repeat it in the startup error.
    model_config = SettingsConfigDict(env_prefix="INFERMESH_GATEWAY_", extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 in containers."""

    http_port: int = 8080
    """Port of the REST API and the pages."""

    grpc_port: int = 50050
    """Port of the `infermesh.pipeline.v1.Pipeline` gRPC service; 0 lets the OS pick one."""

    grpc_max_concurrent_rpcs: int = Field(default=256, gt=0)
    """Calls the Pipeline gRPC server handles at once; past it a call is refused at once with
    RESOURCE_EXHAUSTED naming the limit (health checks exempt), as every infermesh server."""

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
    """Texts per classification, REST /v1/sentiment and gRPC Classify alike (413 /
    INVALID_ARGUMENT beyond; `check_text_count`)."""

    request_timeout_seconds: float = 10.0
    """Deadline for one request's pipeline call (504 beyond)."""

    explain_timeout_seconds: float = 30.0
    """Deadline for one explanation (504 beyond)."""

    api_keys: dict[str, str] = {}
    """Accepted API keys by name, each as the SHA-256 hash of the key, never the key:
    `{"ci": "sha256:<64 hex>"}` (as JSON in INFERMESH_GATEWAY_API_KEYS; `infermesh hash-key`
    makes a key and its entry). Callers send the key in `Authorization: Bearer <key>` or
    `X-API-Key` on /v1 and the v2 infer routes; logs, spans and rate limits use the name.
    Plaintext or malformed entries stop the gateway at start. Empty: no auth (warned at start)."""

    key_rate_per_second: PositiveFloat | None = None
    """Requests per second each API key may make (token bucket, 429 with Retry-After beyond);
    unset: no per-key limit."""

    key_rate_burst: PositiveInt | None = None
    """Requests a key may make at once before `key_rate_per_second` paces it; unset: the rate
    rounded up."""

    ip_rate_per_second: PositiveFloat | None = None
    """Requests per second per client address, applied only when no API keys are configured;
    unset: no limit. The address is the TCP peer's, so behind a proxy all clients share one."""

    ip_rate_burst: PositiveInt | None = None
    """Burst of the per-address limit; unset: the rate rounded up."""

    ip_rate_max_clients: PositiveInt = 10_000
    """Client addresses the per-address limit tracks at once (least recently seen dropped
    first), so memory stays bounded."""

    cors_allow_origins: list[str] = []
    """Origins (`https://app.example.com`, no path) whose pages may call the API from a
    browser; empty: no CORS headers at all, so browsers keep other sites' pages out."""

    dashboard: bool = True
    """Serve /dashboard, fed from the monitor's Kafka topics."""

    otlp_receiver_port: int | None = None
    """Run an OTLP/gRPC trace receiver on this port and show what it receives at /traces
    (`infermesh run` turns it on, on 4317); unset: no receiver."""

    trace_store_max_traces: int = 500
    """Traces the receiver keeps (newest first out of memory last)."""

    otlp_receiver_max_concurrent_rpcs: int = Field(default=16, gt=0)
    """Export calls the OTLP receiver handles at once (each up to 16 MiB; every process
    exports one batch at a time); past it an exporter gets RESOURCE_EXHAUSTED at once, which
    OTLP exporters retry with backoff."""

    log_json: bool = False
    """Write logs as JSON lines."""

    log_level: str = "INFO"
    """Root log level."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_are_named_hashes(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            raise ValueError(
                'api_keys is a JSON object of key name to key hash, e.g. {"ci": "sha256:..."}:'
                " run `infermesh hash-key` for each key"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_hashes_are_valid(cls, value: dict[str, str]) -> dict[str, str]:
        names_by_digest: dict[bytes, str] = {}
        for name, entry in value.items():
            check_key_name(name)
            digest = digest_of(name, entry)
            if digest in names_by_digest:
                raise ValueError(f"API keys {names_by_digest[digest]!r} and {name!r} are the same key")
            names_by_digest[digest] = name
        return value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            # Browsers send `scheme://host[:port]`; anything more would silently never match.
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or origin != f"{parts.scheme}://{parts.netloc}"
            ):
                raise ValueError(f"CORS origin {origin!r} is not an origin: write scheme://host[:port], no path or '/'")
        return value


class DashboardSettings(BaseSettings):
    """How much the dashboard's Kafka feed reads and keeps (env prefix
    INFERMESH_GATEWAY_DASHBOARD_). Every gateway replica runs its own feed over every
    partition of five topics, so its start and its memory are bounded here, not by the
    topics' retention."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_GATEWAY_DASHBOARD_", extra="ignore")

    history_records: NonNegativeInt = 1000
    """Records per partition read back at start, on each followed topic: the feed starts at
    each partition's high watermark less this (never at the earliest offset), then follows
    new records. 0: new records only."""

    windows_per_ticker: PositiveInt = 96
    """Newest windows kept per ticker."""

    max_tickers: PositiveInt = 500
    """Tickers kept at once; past it the ticker whose newest window is oldest is dropped."""

    alerts: PositiveInt = 20
    """Newest alerts kept."""

    fetch_max_bytes: PositiveInt = 4 * 1024 * 1024
    """Largest fetch response the feed's consumer asks for (also its per-partition limit
    when smaller than 1 MiB): the buffer its poll may hold at once."""


def check_text_count(count: int, max_texts: int) -> None:
    """The one MAX_TEXTS check of every classification the gateway takes (REST and gRPC):
    InputTooLarge naming the limit past it (413 over REST, INVALID_ARGUMENT over gRPC)."""
    if count > max_texts:
        raise InputTooLarge(f"request has {count} texts; max is {max_texts}")
