"""Telemetry set-up shared by every process: tracing (OpenTelemetry SDK, W3C trace
context, OTLP/gRPC export when OTEL_EXPORTER_OTLP_ENDPOINT is set; the standard OTEL_*
variables such as OTEL_TRACES_SAMPLER are honoured) and logging (JSON lines or plain
text, with the trace and span ids of the active span). OTEL_SDK_DISABLED=true leaves
tracing off altogether. Prometheus metrics live in shared/metrics.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never includes request payloads."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Installs the process's tracer provider; call once, before servers and clients start.
    The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    resource = Resource.create({"service.name": service_name, "service.version": _version()})
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def _version() -> str:
    try:
        return version("infermesh")
    except PackageNotFoundError:
        return "unknown"


def configure_logging(json_lines: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kafka-python narrates every connection and rebalance at INFO.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
