"""Composition root of the explainer."""

from __future__ import annotations

import logging

import grpc

from services.explainer.core import Explainer, ExplainLimits
from services.explainer.gradients import IntegratedGradients
from services.explainer.scoring import OipProbabilities
from services.explainer.servicer import ExplainerServicer
from services.explainer.settings import ExplainerSettings
from services.tokenizer.core import Tokenizer, TokenizerLimits
from shared.grpc_server import RunningServer, start_metrics, start_server, wait_for_termination_signal
from shared.model_repository import ModelRepository
from shared.pb import explainer_pb2 as pb
from shared.pb import explainer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ExplainerService"].full_name


async def start(settings: ExplainerSettings) -> tuple[RunningServer, OipProbabilities]:
    repository = ModelRepository(settings.model_repository)
    version = repository.resolve(settings.model_name, settings.model_version)
    config = repository.config(settings.model_name, version)
    folder = repository.path(settings.model_name, version)
    tokenizer = Tokenizer(
        folder / config.tokenizer,
        settings.model_name,
        TokenizerLimits(config.max_sequence_length, 32, settings.max_texts, settings.max_text_bytes),
    )
    probabilities = OipProbabilities(settings.inference, settings.model_name, version)
    explainer = Explainer(
        tokenizer,
        probabilities,
        IntegratedGradients(folder / "hf", config.temperature, threads=settings.torch_threads),
        config.labels,
        ExplainLimits(
            max_texts=settings.max_texts,
            max_chunks=settings.max_chunks,
            default_steps=settings.default_steps,
            max_steps=settings.max_steps,
        ),
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_ExplainerServiceServicer_to_server(
            ExplainerServicer(explainer, settings.model_name, version), server
        )

    running = await start_server(settings, register, [SERVICE_NAME])
    # Occlusion and every faithfulness figure need the inference service.
    await running.serve_while_healthy([settings.inference])
    logger.info("explainer serving %s v%s on %s:%d", settings.model_name, version, settings.host, running.port)
    return running, probabilities


async def serve(settings: ExplainerSettings) -> None:
    metrics = start_metrics(settings)
    running, probabilities = await start(settings)
    await wait_for_termination_signal()
    await running.stop(settings.shutdown_grace_seconds)
    await probabilities.close()
    if metrics is not None:
        metrics.stop()
