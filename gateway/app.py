"""Builds the gateway's FastAPI app; the composition root is `create_app`."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from gateway import dashboard, observability, routes, traces, v2
from gateway.admission import Admission
from gateway.apikeys import ApiKeyRing
from gateway.headers import SecurityHeaders
from gateway.limits import BodySizeLimit
from gateway.observability import RequestMetrics
from gateway.pipeline_service import SERVICE_NAME as PIPELINE_SERVICE
from gateway.pipeline_service import PipelineServicer
from gateway.problems import install_problem_handlers
from gateway.ratelimit import TokenBuckets
from gateway.settings import GatewaySettings
from shared.grpc_client import channel
from shared.grpc_server import start_server
from shared.kafka import KafkaSettings
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pb import grpc_predict_v2_pb2_grpc as inference_grpc
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.pipeline import PipelineClient, PipelineTargets
from shared.settings import BaseServiceSettings
from workers.sentiment_monitor.settings import MonitorSettings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def _buckets(rate: float | None, burst: int | None, max_callers: int | None = None) -> TokenBuckets | None:
    if rate is None:
        return None
    return TokenBuckets(rate, burst if burst is not None else max(1, math.ceil(rate)), max_callers)


def server_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    """How uvicorn serves the gateway: no `server: uvicorn` header (it names the software
    to anyone probing for known flaws), no access log (ours, gateway.access, has the
    route template and the trace id)."""
    return uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, server_header=False, lifespan="on"
    )


def create_app(settings: GatewaySettings, kafka: KafkaSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        targets = PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor)
        app.state.pipeline = PipelineClient(
            targets, model_name=settings.model_name, routing=settings.language_routing()
        )
        inference_channel = channel(settings.inference)
        app.state.inference = inference_grpc.GRPCInferenceServiceStub(inference_channel)
        explainer_channel = channel(settings.explainer)
        app.state.explainer = explainer_grpc.ExplainerServiceStub(explainer_channel)
        # Untraced: readiness probes every few seconds would fill the trace store.
        app.state.health_channels = {
            name: channel(target, traced=False)
            for name, target in (
                ("tokenizer", settings.tokenizer),
                ("inference", settings.inference),
                ("postprocessor", settings.postprocessor),
                ("explainer", settings.explainer),
            )
        }
        feed = None
        if settings.dashboard:
            feed = dashboard.DashboardFeed((kafka or KafkaSettings()).client_config(), MonitorSettings().scorer_group)
            feed.start()
            app.state.dashboard = feed
        receiver = None
        if settings.otlp_receiver_port is not None:
            app.state.traces = traces.TraceStore(settings.trace_store_max_traces)
            receiver, receiver_port = await traces.start_receiver(
                app.state.traces,
                settings.host,
                settings.otlp_receiver_port,
                settings.otlp_receiver_max_concurrent_rpcs,
            )
            app.state.otlp_receiver_port = receiver_port
            logger.info("OTLP trace receiver on %s:%d; traces at /traces", settings.host, receiver_port)
        servicer = PipelineServicer(
            app.state.pipeline,
            app.state.explainer,
            app.state.admission,
            settings.request_timeout_seconds,
            settings.explain_timeout_seconds,
            settings.max_texts,
        )
        grpc_server = await start_server(
            BaseServiceSettings(
                host=settings.host, grpc_port=settings.grpc_port, max_concurrent_rpcs=settings.grpc_max_concurrent_rpcs
            ),
            lambda server: pipeline_grpc.add_PipelineServicer_to_server(servicer, server),
            [PIPELINE_SERVICE],
        )
        await grpc_server.set_serving(True)
        app.state.grpc_port = grpc_server.port
        logger.info("pipeline gRPC service on %s:%d", settings.host, grpc_server.port)
        if not settings.api_keys:
            logger.warning("no API keys configured: /v1 is open to anyone who can reach %s", settings.host)
        else:
            logger.info("API keys configured: %s", ", ".join(settings.api_keys))
        yield
        await grpc_server.stop(5)
        if receiver is not None:
            await receiver.stop(1)
        await app.state.pipeline.close()
        await explainer_channel.close()
        await inference_channel.close()
        for health_channel in app.state.health_channels.values():
            await health_channel.close()
        if feed is not None:
            feed.stop()

    app = FastAPI(
        title="infermesh gateway",
        version="0.1.0",
        summary="Finance sentiment over REST: classification and the live monitoring dashboard.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.admission = Admission(
        ApiKeyRing(settings.api_keys),
        _buckets(settings.key_rate_per_second, settings.key_rate_burst),
        _buckets(settings.ip_rate_per_second, settings.ip_rate_burst, settings.ip_rate_max_clients),
    )
    install_problem_handlers(app)
    app.include_router(routes.router)
    app.include_router(routes.pages)
    app.include_router(v2.router)
    app.include_router(observability.router)
    app.include_router(traces.router)
    if settings.dashboard:
        app.include_router(dashboard.router)
    # The pages' scripts and styles: files, so the pages' CSP needs no 'unsafe-inline'.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # The last added is the outermost: metrics see every status; security headers go on
    # every response, CORS refusals and preflights included; CORS headers go on errors
    # too, so a browser page can read why it was refused.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    docs_paths = frozenset(path for path in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if path)
    app.add_middleware(SecurityHeaders, docs_paths=docs_paths)
    app.add_middleware(RequestMetrics)
    # A server span per request, outside every other middleware (probes, scrapes and
    # the event stream excluded).
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics,dashboard/events,traces")
    return app
