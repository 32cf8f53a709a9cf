"""A trace viewer for the one-machine mesh: an OTLP/gRPC receiver (the standard
`opentelemetry.proto.collector.trace.v1.TraceService`) that keeps the most recent
traces in memory, and `/traces` pages that draw them.

`infermesh run` points every process's OTLP exporter here, so traces are viewable with
no extra set-up. It is a development aid, not a tracing backend: bounded, memory only,
gone on restart. Set OTEL_EXPORTER_OTLP_ENDPOINT to send traces to Jaeger, Tempo or
any OTLP collector instead (docs/monitoring.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus

from shared.errors import InfermeshError
from shared.grpc_server import StatusInterceptor

TRACES_PAGE = Path(__file__).parent / "static" / "traces.html"

router = APIRouter(include_in_schema=False)


class NotFound(InfermeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    title = "Not found"


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    attributes: dict[str, Any]
    links: list[dict[str, str]]
    events: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "duration_ms": (self.end_ns - self.start_ns) / 1e6,
            "status": self.status,
            "status_message": self.status_message,
            "attributes": self.attributes,
            "links": self.links,
            "events": self.events,
        }


@dataclass
class _Trace:
    spans: list[SpanRecord] = field(default_factory=list)


class TraceStore:
    """The newest `max_traces` traces, each capped at `max_spans_per_trace` spans.
    Thread-safe: the receiver and the HTTP handlers run on different threads."""

    def __init__(self, max_traces: int = 500, max_spans_per_trace: int = 2000) -> None:
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, spans: list[SpanRecord]) -> None:
        with self._lock:
            for span in spans:
                stored = self._traces.get(span.trace_id)
                if stored is None:
                    stored = self._traces[span.trace_id] = _Trace()
                    while len(self._traces) > self.max_traces:
                        self._traces.popitem(last=False)
                else:
                    self._traces.move_to_end(span.trace_id)
                if len(stored.spans) < self.max_spans_per_trace:
                    stored.spans.append(span)

    def summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: root span, services, span count, duration, errors."""
        with self._lock:
            traces = list(self._traces.items())[-limit:]
        summaries = []
        for trace_id, stored in reversed(traces):
            spans = stored.spans
            ids = {s.span_id for s in spans}
            roots = [s for s in spans if s.parent_span_id not in ids] or spans
            root = min(roots, key=lambda s: s.start_ns)
            start = min(s.start_ns for s in spans)
            end = max(s.end_ns for s in spans)
            summaries.append(
                {
                    "trace_id": trace_id,
                    "root": root.name,
                    "root_service": root.service,
                    "services": sorted({s.service for s in spans}),
                    "spans": len(spans),
                    "start_ns": start,
                    "duration_ms": (end - start) / 1e6,
                    "errors": sum(s.status == "ERROR" for s in spans),
                }
            )
        return summaries

    def spans(self, trace_id: str) -> list[SpanRecord] | None:
        with self._lock:
            stored = self._traces.get(trace_id)
            return sorted(stored.spans, key=lambda s: s.start_ns) if stored else None


def spans_from_otlp(request: otlp.ExportTraceServiceRequest) -> list[SpanRecord]:
    records = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", "unknown"))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service=service,
                        kind=OtlpSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=max(span.end_time_unix_nano, span.start_time_unix_nano),
                        status=OtlpStatus.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                        status_message=span.status.message,
                        attributes=_attributes(span.attributes),
                        links=[{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links],
                        events=[
                            {
                                "name": event.name,
                                "offset_ms": (event.time_unix_nano - span.start_time_unix_nano) / 1e6,
                                "attributes": _attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                    )
                )
    return records


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


class OtlpTraceReceiver(otlp_grpc.TraceServiceServicer):
    def __init__(self, store: TraceStore) -> None:
        self._store = store

    async def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> otlp.ExportTraceServiceResponse:
        self._store.add(spans_from_otlp(request))
        return otlp.ExportTraceServiceResponse()


async def start_receiver(
    store: TraceStore, host: str, port: int, max_concurrent_rpcs: int = 16
) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for OTLP without the tracing interceptor, or exporting would trace
    itself; bounded like every other server: at most `max_concurrent_rpcs` Export calls at
    once, past it RESOURCE_EXHAUSTED at once (`StatusInterceptor`)."""
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(max_concurrent_rpcs)],
        options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
    )
    otlp_grpc.add_TraceServiceServicer_to_server(OtlpTraceReceiver(store), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the OTLP receiver to {host}:{port}")
    await server.start()
    return server, bound


def _store(request: Request) -> TraceStore:
    store: TraceStore | None = getattr(request.app.state, "traces", None)
    if store is None:
        raise NotFound("this gateway runs no trace receiver (INFERMESH_GATEWAY_OTLP_RECEIVER_PORT is unset)")
    return store


@router.get("/traces", response_class=HTMLResponse)
async def traces_page() -> HTMLResponse:
    return HTMLResponse(TRACES_PAGE.read_text())


@router.get("/traces/api/traces")
async def recent_traces(request: Request, limit: int = 100) -> list[dict[str, Any]]:
    return _store(request).summaries(max(1, min(limit, 500)))


@router.get("/traces/api/traces/{trace_id}")
async def one_trace(request: Request, trace_id: str) -> list[dict[str, Any]]:
    spans = _store(request).spans(trace_id.lower())
    if spans is None:
        raise NotFound(f"no trace {trace_id!r} in the store (it keeps the newest {_store(request).max_traces})")
    return [span.to_json() for span in spans]
