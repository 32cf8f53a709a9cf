"""Composition root of the explainer."""

from __future__ import annotations

import logging

import grpc

from services.explainer.admission import ExplainAdmission
from services.explainer.servicer import ExplainerServicer
from services.explainer.settings import ExplainerSettings
from services.explainer.versions import ExplainerVersions
from shared.grpc_server import (
    RunningServer,
    exit_on_startup_error,
    start_metrics,
    start_server,
    wait_for_termination_signal,
)
from shared.metrics import EXPLAINER_QUEUE_DEPTH, EXPLAINER_REJECTED, EXPLAINER_RUNNING
from shared.pb import explainer_pb2 as pb
from shared.pb import explainer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ExplainerService"].full_name


async def start(settings: ExplainerSettings) -> tuple[RunningServer, ExplainerVersions]:
    versions = ExplainerVersions(settings)
    default, _ = await versions.get()  # fail at start, not at the first request, if it cannot load
    admission = ExplainAdmission(
        settings.max_running_requests,
        settings.max_queued_requests,
        queue_depth=EXPLAINER_QUEUE_DEPTH,
        running=EXPLAINER_RUNNING,
        rejected=EXPLAINER_REJECTED,
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_ExplainerServiceServicer_to_server(ExplainerServicer(versions, admission), server)

    running = await start_server(settings, register, [SERVICE_NAME])
    # Occlusion and every faithfulness figure need the inference service.
    await running.serve_while_healthy([settings.inference])
    logger.info(
        "explainer serving %s (v%s by default) on %s:%d", settings.model_name, default, settings.host, running.port
    )
    return running, versions


async def serve(settings: ExplainerSettings) -> None:
    metrics = start_metrics(settings)
    with exit_on_startup_error("explainer", metrics):
        running, versions = await start(settings)
    await wait_for_termination_signal()
    await running.stop(settings.shutdown_grace_seconds)
    await versions.close()
    if metrics is not None:
        metrics.stop()
