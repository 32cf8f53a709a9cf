"""W3C trace context in Kafka record headers: injected on produce, extracted on consume,
so a message's trace continues through every worker that handles it."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate


def inject_headers(context: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    """Headers carrying the given (default: current) trace context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [(key, value.encode()) for key, value in carrier.items()]


def extract_context(headers: Iterable[tuple[str, bytes]] | None) -> otel_context.Context:
    """The trace context a record's producer attached (an empty context if none)."""
    carrier = {key: value.decode("latin-1") for key, value in headers or () if isinstance(value, bytes)}
    return propagate.extract(carrier)
