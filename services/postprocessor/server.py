"""Composition root of the post-processor."""

from __future__ import annotations

import logging

import grpc

from services.postprocessor.core import Postprocessor
from services.postprocessor.servicer import PostprocessorServicer
from services.postprocessor.settings import PostprocessorSettings
from shared.errors import ModelLoadFailed
from shared.grpc_server import (
    RunningServer,
    exit_on_startup_error,
    start_metrics,
    start_server,
    wait_for_termination_signal,
)
from shared.model_repository import ModelRepository
from shared.pb import postprocess_pb2 as pb
from shared.pb import postprocess_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PostprocessService"].full_name


async def start(settings: PostprocessorSettings) -> RunningServer:
    postprocessor = Postprocessor(
        ModelRepository(settings.model_repository),
        settings.abstain_label,
        settings.max_rows,
        default_model=settings.model_name,
        scores=settings.scores,
    )
    repository = postprocessor.repository
    for name, mapping in settings.scores.items():
        if name not in repository.model_names():
            continue
        labels = repository.config(name, repository.serving_version(name)).labels
        unknown = sorted(set(mapping) - set(labels))
        if unknown:
            # A typo in the override would score 0 for that label without a word: refuse.
            raise ModelLoadFailed(
                f"INFERMESH_POSTPROCESSOR_SCORES for {name!r} names {unknown}; its labels are {labels}"
            )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_PostprocessServiceServicer_to_server(PostprocessorServicer(postprocessor), server)

    running = await start_server(settings, register, [SERVICE_NAME])
    await running.set_serving(True)
    logger.info("post-processor serving on %s:%d", settings.host, running.port)
    return running


async def serve(settings: PostprocessorSettings) -> None:
    metrics = start_metrics(settings)
    with exit_on_startup_error("post-processor", metrics):
        running = await start(settings)
    await wait_for_termination_signal()
    await running.stop(settings.shutdown_grace_seconds)
    if metrics is not None:
        metrics.stop()
