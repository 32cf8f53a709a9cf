"""The three services a classification passes through, started over a test's own model
repository on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.grpc_server import RunningServer
from shared.pipeline import PipelineTargets


@asynccontextmanager
async def running_mesh(repository: Path, variant: str = "") -> AsyncIterator[PipelineTargets]:
    """The tokenizer, inference and post-processor services over `repository`; `variant`
    pins the inference service's ONNX variant (fp32 for parity with transformers; empty:
    each version's default)."""
    tokenizer = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=repository))
    inference, core = await start_inference(
        InferenceSettings(grpc_port=0, model_repository=repository, variant=variant)
    )
    postprocessor = await start_postprocessor(PostprocessorSettings(grpc_port=0, model_repository=repository))
    servers: list[RunningServer] = [tokenizer, inference, postprocessor]
    try:
        yield PipelineTargets(*(f"127.0.0.1:{server.port}" for server in servers))
    finally:
        for server in servers:
            await server.stop(0)
        await core.close()
