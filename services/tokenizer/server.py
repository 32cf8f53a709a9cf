"""Composition root of the tokenizer service."""

from __future__ import annotations

import logging

import grpc

from services.tokenizer.languages import LanguageDetector
from services.tokenizer.models import TokenizerDefaults, TokenizerModels
from services.tokenizer.pii import PiiMasker
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.settings import TokenizerSettings
from shared.grpc_server import (
    RunningServer,
    exit_on_startup_error,
    start_metrics,
    start_server,
    wait_for_termination_signal,
)
from shared.model_repository import ModelRepository
from shared.pb import tokenizer_pb2 as pb
from shared.pb import tokenizer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def build_tokenizers(settings: TokenizerSettings) -> TokenizerModels:
    """Every model's tokenizers; the default model's is loaded now, so a broken default
    fails the start rather than the first request."""
    masker = PiiMasker(settings.mask_pii_kinds) if settings.mask_pii else None
    defaults = TokenizerDefaults(
        max_length=settings.max_length,
        default_stride=settings.stride,
        max_texts=settings.max_texts,
        max_text_bytes=settings.max_text_bytes,
    )
    models = TokenizerModels(
        ModelRepository(settings.model_repository),
        settings.model_name,
        defaults,
        masker=masker,
        default_version=settings.model_version,
        max_loaded=settings.max_loaded_models,
        detector=LanguageDetector(settings.language_candidates) if settings.detect_language else None,
    )
    models.get()
    return models


async def start(settings: TokenizerSettings) -> RunningServer:
    tokenizers = build_tokenizers(settings)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_TokenizerServiceServicer_to_server(TokenizerServicer(tokenizers), server)

    running = await start_server(settings, register, [SERVICE_NAME])
    await running.set_serving(True)
    masking = ", ".join(sorted(k.value for k in tokenizers.masker.kinds)) if tokenizers.masker else "off"
    logger.info("tokenizer serving on %s:%d (PII masking: %s)", settings.host, running.port, masking)
    return running


async def serve(settings: TokenizerSettings) -> None:
    metrics = start_metrics(settings)
    with exit_on_startup_error("tokenizer", metrics):
        running = await start(settings)
    await wait_for_termination_signal()
    await running.stop(settings.shutdown_grace_seconds)
    if metrics is not None:
        metrics.stop()
