"""A blocking face for the asyncio PipelineClient: the Kafka loop is synchronous
(kafka-python), so scoring runs on a private event loop in its own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from shared.pipeline import ClassifyResult, PipelineClient, PipelineTargets

T = TypeVar("T")


class BlockingPipeline:
    def __init__(self, targets: PipelineTargets, model_name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client(targets, model_name))

    @staticmethod
    async def _make_client(targets: PipelineTargets, model_name: str) -> PipelineClient:
        # Channels bind to the loop they are created on, so create them on ours.
        return PipelineClient(targets, model_name=model_name)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def classify(self, texts: Sequence[str], timeout_seconds: float) -> ClassifyResult:
        """Raises shared.errors types, as PipelineClient.classify does."""
        return self._call(self._client.classify(texts, timeout_seconds=timeout_seconds))

    def submit(self, texts: Sequence[str], timeout_seconds: float) -> Future[ClassifyResult]:
        """Starts scoring on the pipeline's loop; the future raises shared.errors types."""
        return asyncio.run_coroutine_threadsafe(
            self._client.classify(list(texts), timeout_seconds=timeout_seconds), self._loop
        )

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
