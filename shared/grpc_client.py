"""gRPC client channels with trace context propagation, the one way every infermesh
process opens a channel to another service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors


def channel(target: str, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """An insecure channel (mesh-internal traffic) whose calls carry client spans and
    W3C trace context, so the callee's server span joins the caller's trace."""
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=aio_client_interceptors())  # type: ignore[no-untyped-call]
