"""Builds every infermesh gRPC server the same way: error mapping, health, reflection,
message limits, graceful shutdown. Services only register their servicers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from shared.errors import ERROR_TYPE_METADATA_KEY, InfermeshError, Overloaded
from shared.grpc_client import channel
from shared.metrics import GRPC_DURATION, GRPC_IN_FLIGHT, GRPC_REQUESTS, MetricsServer
from shared.settings import BaseServiceSettings
from shared.tls import TlsSettings

logger = logging.getLogger(__name__)

INTERNAL_ERROR_DETAIL = "Internal server error"

#: What servicer methods receive; request/response types are fixed per method.
ServicerContext = grpc.aio.ServicerContext[Any, Any]

#: The health service name liveness probes ask: SERVING from start until the server stops,
#: whatever its model or downstreams say, so a failing check means the process itself no
#: longer answers. Readiness is "" (and each service's name): SERVING only while the
#: process can serve, which for the explainer includes its inference service. A liveness
#: probe on "" would restart every explainer (and reload torch) during an inference outage.
LIVENESS_SERVICE = "liveness"


#: Health checks are never refused for load: a probe that fails because the server is busy
#: would restart (liveness) or drain (readiness) a replica for doing its job.
_UNLIMITED_PREFIX = "/grpc.health.v1.Health/"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps `shared.errors` to their status codes; anything else is INTERNAL with a
    generic detail so no traceback or internal message reaches the caller. Counts every
    call by method and the status it ends with, and times it.

    With `max_concurrent_rpcs`, a call arriving while that many are being handled is
    refused at once with RESOURCE_EXHAUSTED (Overloaded), health checks excepted. gRPC's
    own `maximum_concurrent_rpcs` cannot do this for grpc.aio servers: there it stops
    accepting calls, which then wait unbounded in gRPC core until their deadline
    (`_ConcurrentRpcLimiter.check_before_request_call` in
    grpc/_cython/_cygrpc/aio/server.pyx.pxi), and health checks wait with them."""

    def __init__(self, max_concurrent_rpcs: int | None = None) -> None:
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.active = 0
        """Limited calls being handled now by this server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = cast(Callable[[Any, ServicerContext], Awaitable[Any]], handler.unary_unary)
        method = handler_call_details.method
        limit = None if method.startswith(_UNLIMITED_PREFIX) else self.max_concurrent_rpcs

        duration = GRPC_DURATION.labels(method)

        async def guarded(request: Any, context: ServicerContext) -> Any:
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            GRPC_IN_FLIGHT.inc()
            counted = False
            try:
                if limit is not None:
                    if self.active >= limit:
                        raise Overloaded(
                            f"the server is handling {self.active} calls; max is {limit} at once. Retry later"
                        )
                    self.active += 1
                    counted = True
                return await inner(request, context)
            except InfermeshError as error:
                code = error.grpc_code
                context.set_trailing_metadata(((ERROR_TYPE_METADATA_KEY, type(error).__name__),))
                await context.abort(error.grpc_code, error.detail)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                logger.exception("unhandled error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_DETAIL)
            finally:
                if counted:
                    self.active -= 1
                GRPC_IN_FLIGHT.dec()
                GRPC_REQUESTS.labels(method, code.name).inc()
                duration.observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class RunningServer:
    """A started server, the port it bound, its health servicer and the TLS settings it
    was started with (which its own health checks of downstreams use too)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    tls: TlsSettings | None = None
    _watcher: asyncio.Task[None] | None = None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def serve_while_healthy(self, downstreams: Sequence[str], interval_seconds: float = 2.0) -> None:
        """SERVING only while every downstream (host:port) reports SERVING: a service
        that cannot answer without them should not receive traffic. Checks now, then
        every `interval_seconds` until `stop`."""
        channels = [channel(target, tls=self.tls, traced=False) for target in downstreams]

        async def check() -> None:
            await self.set_serving(all(await asyncio.gather(*(_health_of(opened) for opened in channels))))

        async def watch() -> None:
            try:
                while True:
                    await asyncio.sleep(interval_seconds)
                    await check()
            finally:
                for opened in channels:
                    await opened.close()

        await check()
        self._watcher = asyncio.create_task(watch(), name="downstream-health")

    async def stop(self, grace: float) -> None:
        """Flips health to NOT_SERVING so balancers stop sending, then drains."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.set_serving(False)
        await self.server.stop(grace)


async def _health_of(opened: grpc.aio.Channel) -> bool:
    """Whether the server behind `opened` reports SERVING."""
    try:
        reply = await health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def start_server(
    settings: BaseServiceSettings,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
) -> RunningServer:
    """Starts a server on `settings.host:settings.grpc_port` (0 = any free port), health
    NOT_SERVING until the caller says otherwise (`LIVENESS_SERVICE` SERVING at once); with
    mutual TLS when `settings.tls` configures it (TlsMisconfigured, before anything is
    bound, if it is unusable). At most `settings.max_concurrent_rpcs` calls are handled at
    once (`StatusInterceptor`); past it a call gets RESOURCE_EXHAUSTED at once."""
    tls = settings.tls.load()
    server = grpc.aio.server(
        # Tracing outermost, so the status a caller sees is the status on the span.
        interceptors=[
            aio_server_interceptor(filter_=filters.negate(filters.health_check())),  # type: ignore[no-untyped-call]
            StatusInterceptor(settings.max_concurrent_rpcs),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients reconnect (and re-resolve DNS) every few minutes, so replicas added by
            # a scale-up get their share of calls from clients that were already running.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 30_000),
        ],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    port = (
        server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.server_credentials())
    )
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.grpc_port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, tuple(service_names), settings.tls)
    await running.set_serving(False)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return running


@contextlib.contextmanager
def exit_on_startup_error(service: str, metrics: MetricsServer | None) -> Iterator[None]:
    """A service that cannot start (a model or backend that cannot load, mutual TLS
    misconfigured) logs why in one line and exits with status 1: no traceback."""
    try:
        yield
    except InfermeshError as error:
        logger.error("%s cannot serve: %s", service, error.detail)
        if metrics is not None:
            metrics.stop()
        raise SystemExit(1) from None


def start_metrics(settings: BaseServiceSettings) -> MetricsServer | None:
    """The process's /metrics endpoint on `settings.metrics_port`, unless disabled."""
    if not settings.metrics_enabled:
        return None
    return MetricsServer(settings.host, settings.metrics_port)


async def wait_for_termination_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
