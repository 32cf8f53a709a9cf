"""What operators see of the gateway: request metrics and access logs, `/metrics`,
`/healthz` (the process is alive) and `/readyz` (the classification path is up)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from fastapi import APIRouter, Request, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import HTTP_DURATION, HTTP_REQUESTS

access_log = logging.getLogger("gateway.access")

router = APIRouter(include_in_schema=False)

#: Services a classification needs; the explainer only serves /v1/explain, so it is
#: reported by /readyz but does not make the gateway unready.
REQUIRED = ("tokenizer", "inference", "postprocessor")
HEALTH_TIMEOUT_SECONDS = 1.0


class RequestMetrics:
    """Counts and times every request by route template (never the raw path, which
    would make one series per URL) and writes one access-log line for it, inside the
    request's span so the line carries its trace id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_DURATION.labels(method, template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                access_log.info("%s %s %d %.1f ms", method, template, status, elapsed * 1000, extra={"status": status})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, response: Response) -> dict[str, object]:
    """200 when every service a classification needs reports SERVING, else 503."""
    channels: dict[str, grpc.aio.Channel] = request.app.state.health_channels
    statuses = await asyncio.gather(*(_health(channel) for channel in channels.values()))
    services = dict(zip(channels, statuses, strict=True))
    ready = all(services[name] == "SERVING" for name in REQUIRED if name in services)
    response.status_code = 200 if ready else 503
    return {"status": "ready" if ready else "not ready", "services": services}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _health(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
