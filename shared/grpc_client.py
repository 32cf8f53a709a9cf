"""gRPC client channels with trace context propagation, the one way every infermesh
process opens a channel to another service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

#: Load balancing over every address the target resolves to. A headless Kubernetes Service
#: (`dns:///tokenizer:50051`) resolves to each ready pod, so calls spread over the replicas
#: instead of all riding the first pod's long-lived HTTP/2 connection; a one-address target
#: (`127.0.0.1:50051`) behaves as with gRPC's default pick_first.
LB_POLICY = ("grpc.lb_policy_name", "round_robin")


def channel(target: str, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """An insecure channel (mesh-internal traffic) whose calls carry client spans and
    W3C trace context, so the callee's server span joins the caller's trace, and are
    balanced round robin over the target's addresses unless `options` pick a policy."""
    channel_options = list(options)
    if all(name != LB_POLICY[0] for name, _ in channel_options):
        channel_options.append(LB_POLICY)
    return grpc.aio.insecure_channel(target, options=channel_options, interceptors=aio_client_interceptors())  # type: ignore[no-untyped-call]
