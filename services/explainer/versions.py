"""The explainer's model versions: each explanation uses the version its caller names
(the one its prediction came from), else the version serving unpinned requests, so labels,
calibration and weights always belong to one version. Versions load on first use.

What the inference service serves each version with (`served_variant` in responses) is
asked of it, never assumed from configuration: ModelMetadata's response headers name the
backend and variant it runs (services/inference/converters.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc

from services.explainer.core import Explainer, ExplainLimits
from services.explainer.gradients import IntegratedGradients
from services.explainer.scoring import OipProbabilities
from services.explainer.settings import ExplainerSettings
from services.inference.converters import BACKEND_METADATA_KEY, VARIANT_METADATA_KEY
from services.tokenizer.api import version_tokenizer
from shared.errors import ModelLoadFailed
from shared.grpc_client import channel
from shared.model_repository import ModelRepository
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

#: `served_variant` when the inference service cannot be asked or does not say.
UNKNOWN = "unknown"

#: How long an answer about what serves a version is reused: the inference service changes
#: backend or variant only by restarting, and a restarted one is asked again after this.
SERVED_TTL_SECONDS = 60.0

#: The longest a ModelMetadata call may take (less when the request has less time left).
SERVED_TIMEOUT_SECONDS = 2.0


def describe_served(headers: Sequence[tuple[str, str | bytes]]) -> str:
    """What ModelMetadata's headers say serves a version, as responses report it: the
    variant for ONNX Runtime ("int8", "fp32"), else backend and variant ("torch bf16");
    UNKNOWN from a server that does not say (a stock Triton)."""
    values = {key: value if isinstance(value, str) else value.decode() for key, value in headers}
    backend = values.get(BACKEND_METADATA_KEY, "")
    variant = values.get(VARIANT_METADATA_KEY, "")
    if not backend:
        return UNKNOWN
    if backend == "onnxruntime" and variant:
        return variant
    return f"{backend} {variant}".strip()


class ExplainerVersions:
    """Explainers by (model, version), at most `max_loaded_versions` in memory (least
    recently used goes first; a request already holding one finishes with it). A request
    naming no model gets the settings' `model_name`."""

    def __init__(self, settings: ExplainerSettings) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings.model_repository)
        self._channel = channel(settings.inference, tls=settings.tls)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._loaded: OrderedDict[tuple[str, str], Explainer] = OrderedDict()
        self._lock = asyncio.Lock()
        self._served: dict[tuple[str, str], tuple[str, float]] = {}
        """What serves each version, as the inference service said, and when it said it."""

    def default_version(self, model_name: str = "") -> str:
        """The configured version (default model), else the one the rollout rule serves,
        else the latest."""
        name = model_name or self.settings.model_name
        if self.settings.model_version and name == self.settings.model_name:
            return self.repository.resolve(name, self.settings.model_version)
        return self.repository.serving_version(name)

    async def get(self, version: str = "", model_name: str = "") -> tuple[str, Explainer]:
        """(the version, its explainer); ModelNotFound (naming the models there are) if the
        repository lacks it."""
        name = model_name or self.settings.model_name
        version = self.repository.resolve(name, version) if version else self.default_version(name)
        key = (name, version)
        async with self._lock:
            explainer = self._loaded.get(key)
            if explainer is None:
                explainer = await asyncio.to_thread(self._build, name, version)
                self._loaded[key] = explainer
                while len(self._loaded) > self.settings.max_loaded_versions:
                    evicted, _ = self._loaded.popitem(last=False)
                    logger.info("explainer dropped %s version %s", *evicted)
            self._loaded.move_to_end(key)
            return version, explainer

    async def served_variant(self, version: str, timeout: float = SERVED_TIMEOUT_SECONDS, model_name: str = "") -> str:
        """What the inference service serves `version` with (`describe_served`), asked at
        most every SERVED_TTL_SECONDS per version; UNKNOWN, and asked again next time, when
        the call fails."""
        name = model_name or self.settings.model_name
        now = time.monotonic()
        cached = self._served.get((name, version))
        if cached is not None and now - cached[1] < SERVED_TTL_SECONDS:
            return cached[0]
        request = pb.ModelMetadataRequest(name=name, version=version)
        try:
            call = self._stub.ModelMetadata(request, timeout=max(0.05, min(timeout, SERVED_TIMEOUT_SECONDS)))
            await call
            headers = await call.initial_metadata()
        except grpc.aio.AioRpcError as error:
            logger.warning("could not ask the inference service what serves version %s: %s", version, error.code())
            return UNKNOWN
        served = describe_served(tuple(headers or ()))
        self._served[(name, version)] = (served, now)
        return served

    def _build(self, name: str, version: str) -> Explainer:
        settings = self.settings
        config = self.repository.config(name, version)
        folder = self.repository.path(name, version)
        tokenizer = version_tokenizer(
            self.repository,
            name,
            version,
            settings.max_texts,
            settings.max_text_bytes,
            mask_pii=settings.mask_pii_kinds if settings.mask_pii else None,
        )
        gradients = IntegratedGradients(folder / "hf", pad_id=config.pad_token_id, threads=settings.torch_threads)
        if gradients.num_logits != config.num_logits:
            # Explaining a head needs its columns where config.json says they are.
            raise ModelLoadFailed(
                f"{name} version {version}: hf/ has {gradients.num_logits} logits but config.json's heads "
                f"{[h.name for h in config.heads]} have {config.num_logits} labels"
            )
        logger.info("explainer loaded %s version %s (heads %s)", name, version, [h.name for h in config.heads])
        return Explainer(
            tokenizer,
            OipProbabilities(self._stub, name, version, config.num_logits),
            gradients,
            config.heads,
            ExplainLimits(
                max_texts=settings.max_texts,
                max_chunks=settings.max_chunks,
                default_steps=settings.default_steps,
                max_steps=settings.max_steps,
                max_gradient_token_steps=settings.max_gradient_token_steps,
            ),
        )

    async def close(self) -> None:
        await self._channel.close()
