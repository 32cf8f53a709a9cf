"""The explainer's model versions: each explanation uses the version its caller names
(the one its prediction came from), else the version serving unpinned requests, so labels,
calibration and weights always belong to one version. Versions load on first use."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from services.explainer.core import Explainer, ExplainLimits
from services.explainer.gradients import IntegratedGradients
from services.explainer.scoring import OipProbabilities
from services.explainer.settings import ExplainerSettings
from services.tokenizer.core import Tokenizer, TokenizerLimits
from services.tokenizer.pii import PiiMasker
from shared.grpc_client import channel
from shared.model_repository import ModelRepository
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class ExplainerVersions:
    """Explainers by version, at most `max_loaded_versions` in memory (least recently used
    goes first; a request already holding one finishes with it)."""

    def __init__(self, settings: ExplainerSettings) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings.model_repository)
        self._channel = channel(settings.inference, tls=settings.tls)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._loaded: OrderedDict[str, Explainer] = OrderedDict()
        self._lock = asyncio.Lock()

    def default_version(self) -> str:
        """The configured version, else the one the rollout rule serves, else the latest."""
        name = self.settings.model_name
        if self.settings.model_version:
            return self.repository.resolve(name, self.settings.model_version)
        rule = self.repository.rollout(name)
        return rule.serving if rule is not None else self.repository.resolve(name)

    async def get(self, version: str = "") -> tuple[str, Explainer]:
        """(the version, its explainer); ModelNotFound if the repository lacks it."""
        version = self.repository.resolve(self.settings.model_name, version) if version else self.default_version()
        async with self._lock:
            explainer = self._loaded.get(version)
            if explainer is None:
                explainer = await asyncio.to_thread(self._build, version)
                self._loaded[version] = explainer
                while len(self._loaded) > self.settings.max_loaded_versions:
                    evicted, _ = self._loaded.popitem(last=False)
                    logger.info("explainer dropped version %s", evicted)
            self._loaded.move_to_end(version)
            return version, explainer

    def _build(self, version: str) -> Explainer:
        settings = self.settings
        config = self.repository.config(settings.model_name, version)
        folder = self.repository.path(settings.model_name, version)
        tokenizer = Tokenizer(
            folder / config.tokenizer,
            settings.model_name,
            TokenizerLimits(config.max_sequence_length, 32, settings.max_texts, settings.max_text_bytes),
            masker=PiiMasker(settings.mask_pii_kinds) if settings.mask_pii else None,
        )
        logger.info("explainer loaded %s version %s", settings.model_name, version)
        return Explainer(
            tokenizer,
            OipProbabilities(self._stub, settings.model_name, version),
            IntegratedGradients(folder / "hf", config.temperature, threads=settings.torch_threads),
            config.labels,
            ExplainLimits(
                max_texts=settings.max_texts,
                max_chunks=settings.max_chunks,
                default_steps=settings.default_steps,
                max_steps=settings.max_steps,
                max_gradient_token_steps=settings.max_gradient_token_steps,
            ),
            served_variant=settings.served_variant or config.default_variant,
        )

    async def close(self) -> None:
        await self._channel.close()
