"""A blocking face for the asyncio PipelineClient: the Kafka loop is synchronous
(kafka-python), so scoring runs on a private event loop in its own thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from shared.errors import InfermeshError
from shared.pipeline import ClassifyResult, ModelInfo, PipelineClient, PipelineTargets
from shared.routing import LanguageRouting

T = TypeVar("T")

logger = logging.getLogger(__name__)


class MissingScoreMapping(RuntimeError):
    """The model's version has no label -> score mapping, so the monitor has no score."""


def no_score_message(model_name: str, model_version: str = "") -> str:
    which = f"{model_name!r} version {model_version}" if model_version else repr(model_name)
    return (
        f"model {which} has no score mapping (`scores` in its config.json: label -> weight, e.g."
        ' {"negative": -1, "positive": 1}); add one there, or set INFERMESH_POSTPROCESSOR_SCORES='
        f"'{{\"{model_name}\": {{...}}}}' for the post-processor"
    )


class BlockingPipeline:
    def __init__(self, targets: PipelineTargets, model_name: str, routing: LanguageRouting | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client(targets, model_name, routing))

    @staticmethod
    async def _make_client(
        targets: PipelineTargets, model_name: str, routing: LanguageRouting | None
    ) -> PipelineClient:
        # Channels bind to the loop they are created on, so create them on ours.
        return PipelineClient(targets, model_name=model_name, routing=routing)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def classify(self, texts: Sequence[str], timeout_seconds: float, model_name: str = "") -> ClassifyResult:
        """Raises shared.errors types, as PipelineClient.classify does. `model_name` empty:
        the scoring model, routed by language; named: that model for every text."""
        return self._call(self._client.classify(texts, timeout_seconds=timeout_seconds, model_name=model_name))

    def submit(self, texts: Sequence[str], timeout_seconds: float, model_name: str = "") -> Future[ClassifyResult]:
        """Starts scoring on the pipeline's loop (calls submitted together run concurrently
        there); the future raises shared.errors types. `model_name` as for `classify`."""
        return asyncio.run_coroutine_threadsafe(
            self._client.classify(list(texts), timeout_seconds=timeout_seconds, model_name=model_name), self._loop
        )

    def models(self, timeout_seconds: float) -> list[ModelInfo]:
        """The models in the repository, as the post-processor lists them."""
        return self._call(self._client.models(timeout_seconds=timeout_seconds))

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def check_score_mapping(
    pipeline: BlockingPipeline,
    model_name: str,
    timeout_seconds: float = 5.0,
    *,
    models: Sequence[str] = (),
    topic_model: str = "",
    topic_head: str = "topic",
) -> str | None:
    """Why the worker must not start scoring `model_name` (its serving version has no score
    mapping, or the repository lacks it), applying `models` (one is not in the repository)
    or taking topics from `topic_model`'s `topic_head` (not in the repository, or its
    serving version has no such head), or None. A mesh that cannot be asked yet is no
    reason: the scoring stage stops on the first result without a score anyway."""
    try:
        listed = pipeline.models(timeout_seconds)
    except InfermeshError as error:
        logger.warning("could not ask the post-processor for %r's score mapping (%s)", model_name, error.detail)
        return None
    named = {model.name: model for model in listed}
    there = ", ".join(sorted(named)) or "none"
    wanted = [("model", model_name), *(("listed model", m) for m in models)]
    if topic_model:
        wanted.append(("topic model", topic_model))
    for role, name in wanted:
        if name not in named:
            return f"{role} {name!r} is not in the model repository; models: {there}"
    model = named[model_name]
    if not model.scores:
        return no_score_message(model.name, model.serving_version)
    if topic_model:
        heads = [head.name for head in named[topic_model].heads]
        if topic_head not in heads:
            return (
                f"topic model {topic_model!r} version {named[topic_model].serving_version} has no head"
                f" {topic_head!r} (INFERMESH_WORKER_TOPIC_HEAD); its heads: {', '.join(heads) or 'none'}"
            )
    return None
