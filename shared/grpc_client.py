"""gRPC client channels with trace context propagation, retries and (when configured)
mutual TLS: the one way every infermesh process opens a channel to another service."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from shared.tls import TlsMaterial, TlsSettings, environment_tls

#: Load balancing over every address the target resolves to. A headless Kubernetes Service
#: (`dns:///tokenizer:50051`) resolves to each ready pod, so calls spread over the replicas
#: instead of all riding the first pod's long-lived HTTP/2 connection; a one-address target
#: (`127.0.0.1:50051`) behaves as with gRPC's default pick_first. Kept as a channel option,
#: not in the service config: a service config's loadBalancingConfig would beat a caller's
#: `grpc.lb_policy_name`.
LB_POLICY = ("grpc.lb_policy_name", "round_robin")

#: Every infermesh RPC is idempotent (Tokenize, ModelInfer, Postprocess, Explain, health,
#: model loads), so the channel may send a call again; gRPC's retry design (gRFC A6) is
#: the mechanism. Only UNAVAILABLE is retried: the server never started on the call (no
#: connection, a pod draining, a model loading). RESOURCE_EXHAUSTED is overload, which a
#: retry would amplify rather than shed, and DEADLINE_EXCEEDED has no time left. gRPC
#: draws each wait uniformly from [0, backoff] (full jitter), so callers that failed
#: together do not come back together, and every retry stays inside the call's deadline.
#: The token bucket (per target, shared by the process's channels) bounds what retries
#: add: each failed attempt takes a token, each success gives back tokenRatio, and at or
#: below half of maxTokens nothing is retried, so a server that keeps failing soon sees
#: one attempt per call, not maxAttempts. A call is not retried once a response has begun.
RETRY_SERVICE_CONFIG: dict[str, object] = {
    "methodConfig": [
        {
            "name": [{}],  # every method of every service
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

#: gRPC keeps a call's request for retries only up to this size (256 KiB by default, less
#: than one ModelInfer round); beyond it the call is sent once. 16 MiB matches the servers'
#: max_message_bytes, and the caller holds the request until the call ends anyway.
RETRY_BUFFER = ("grpc.per_rpc_retry_buffer_size", 16 * 1024 * 1024)

Options = Sequence[tuple[str, int | str]]


def channel(
    target: str, options: Options = (), *, tls: TlsSettings | None = None, traced: bool = True
) -> grpc.aio.Channel:
    """A channel whose calls are balanced round robin over the target's addresses (unless
    `options` pick a policy), retried on UNAVAILABLE as RETRY_SERVICE_CONFIG says, carry
    client spans and W3C trace context (unless `traced` is off: health probes every few
    seconds would fill the trace store), and use mutual TLS when `tls`, by default the
    INFERMESH_TLS_* environment, configures it. TlsMisconfigured if it is unusable."""
    material = environment_tls() if tls is None else tls.load()
    channel_options = _options(options, material)
    interceptors = aio_client_interceptors() if traced else None  # type: ignore[no-untyped-call]
    if material is None:
        return grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, material.channel_credentials(), options=channel_options, interceptors=interceptors
    )


def blocking_channel(target: str, options: Options = (), *, tls: TlsSettings | None = None) -> grpc.Channel:
    """`channel` for synchronous callers (the CLI waiting for its child processes); untraced."""
    material = environment_tls() if tls is None else tls.load()
    channel_options = _options(options, material)
    if material is None:
        return grpc.insecure_channel(target, options=channel_options)
    return grpc.secure_channel(target, material.channel_credentials(), options=channel_options)


def _options(options: Options, material: TlsMaterial | None) -> list[tuple[str, int | str]]:
    chosen = list(options)
    names = {name for name, _ in chosen}
    if LB_POLICY[0] not in names:
        chosen.append(LB_POLICY)
    if "grpc.service_config" not in names:
        chosen += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]
    if RETRY_BUFFER[0] not in names:
        chosen.append(RETRY_BUFFER)
    if material is not None:
        chosen += [option for option in material.channel_options() if option[0] not in names]
    return chosen
