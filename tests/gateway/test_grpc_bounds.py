"""The gateway's own gRPC servers are bounded like every other infermesh server, with
limits from the gateway's settings: the Pipeline service and the OTLP trace receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from gateway import traces
from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.grpc_server import start_server
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.settings import BaseServiceSettings
from tests.gateway.conftest import settings_for_targets


class Hang(grpc.GenericRpcHandler):
    """A downstream service that takes every call and answers none until `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0

    async def _hold(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.arrived += 1
        await self.release.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "released")
        return b""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return grpc.unary_unary_rpc_method_handler(self._hold)


async def until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


@asynccontextmanager
async def gateway(settings: GatewaySettings) -> AsyncIterator[Any]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app.state


def test_the_gateways_grpc_limits_are_settings() -> None:
    settings = GatewaySettings()
    assert settings.grpc_max_concurrent_rpcs == 256 and settings.otlp_receiver_max_concurrent_rpcs == 16


async def test_the_pipeline_service_refuses_calls_beyond_its_configured_limit() -> None:
    hang = Hang()
    downstream = await start_server(BaseServiceSettings(grpc_port=0), lambda s: s.add_generic_rpc_handlers((hang,)), [])
    target = f"127.0.0.1:{downstream.port}"
    try:
        async with (
            gateway(settings_for_targets([target] * 4, grpc_max_concurrent_rpcs=1)) as state,
            grpc.aio.insecure_channel(f"127.0.0.1:{state.grpc_port}") as channel,
        ):
            stub = pipeline_grpc.PipelineStub(channel)
            held = asyncio.ensure_future(stub.Classify(pipeline_pb.ClassifyRequest(texts=["Acme slides"]), timeout=30))
            await until(lambda: hang.arrived == 1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Classify(pipeline_pb.ClassifyRequest(texts=["Acme rises"]), timeout=10)
            hang.release.set()
            await asyncio.gather(held, return_exceptions=True)
    finally:
        await downstream.stop(0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max is 1 at once" in (caught.value.details() or "")


async def test_the_otlp_receiver_refuses_exports_beyond_its_configured_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()
    arrived = 0

    async def slow_export(
        self: traces.OtlpTraceReceiver, request: otlp.ExportTraceServiceRequest, context: Any
    ) -> otlp.ExportTraceServiceResponse:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return otlp.ExportTraceServiceResponse()

    monkeypatch.setattr(traces.OtlpTraceReceiver, "Export", slow_export)
    settings = settings_for_targets(["127.0.0.1:1"] * 4, otlp_receiver_port=0, otlp_receiver_max_concurrent_rpcs=2)
    async with (
        gateway(settings) as state,
        grpc.aio.insecure_channel(f"127.0.0.1:{state.otlp_receiver_port}") as channel,
    ):
        stub = otlp_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
        held = [asyncio.ensure_future(stub.Export(otlp.ExportTraceServiceRequest(), timeout=30)) for _ in range(2)]
        await until(lambda: arrived == 2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Export(otlp.ExportTraceServiceRequest(), timeout=10)
        release.set()
        answers = await asyncio.gather(*held)
        after = await stub.Export(otlp.ExportTraceServiceRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max is 2 at once" in (caught.value.details() or "")
    assert len(answers) == 2 and isinstance(after, otlp.ExportTraceServiceResponse)
