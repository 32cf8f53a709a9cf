"""Builds the gateway's FastAPI app; the composition root is `create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from gateway import dashboard, observability, routes, traces, v2
from gateway.limits import BodySizeLimit
from gateway.observability import RequestMetrics
from gateway.pipeline_service import SERVICE_NAME as PIPELINE_SERVICE
from gateway.pipeline_service import PipelineServicer
from gateway.problems import install_problem_handlers
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


def create_app(settings: GatewaySettings, kafka: KafkaSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        targets = PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor)
        app.state.pipeline = PipelineClient(targets, model_name=settings.model_name)
        inference_channel = channel(settings.inference)
        app.state.inference = inference_grpc.GRPCInferenceServiceStub(inference_channel)
        explainer_channel = channel(settings.explainer)
        app.state.explainer = explainer_grpc.ExplainerServiceStub(explainer_channel)
        # Untraced: readiness probes every few seconds would fill the trace store.
        app.state.health_channels = {
            name: grpc.aio.insecure_channel(target)
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
                app.state.traces, settings.host, settings.otlp_receiver_port
            )
            app.state.otlp_receiver_port = receiver_port
            logger.info("OTLP trace receiver on %s:%d; traces at /traces", settings.host, receiver_port)
        servicer = PipelineServicer(app.state.pipeline, app.state.explainer, settings.explain_timeout_seconds)
        grpc_server = await start_server(
            BaseServiceSettings(host=settings.host, grpc_port=settings.grpc_port),
            lambda server: pipeline_grpc.add_PipelineServicer_to_server(servicer, server),
            [PIPELINE_SERVICE],
        )
        await grpc_server.set_serving(True)
        app.state.grpc_port = grpc_server.port
        logger.info("pipeline gRPC service on %s:%d", settings.host, grpc_server.port)
        if not settings.api_keys:
            logger.warning("no API keys configured: /v1 is open to anyone who can reach %s", settings.host)
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
    install_problem_handlers(app)
    app.include_router(routes.router)
    app.include_router(routes.pages)
    app.include_router(v2.router)
    app.include_router(observability.router)
    app.include_router(traces.router)
    if settings.dashboard:
        app.include_router(dashboard.router)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    # A server span per request, outside every other middleware (probes, scrapes and
    # the event stream excluded).
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics,dashboard/events,traces")
    return app
