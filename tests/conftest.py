"""Real servers on loopback ports picked by the OS, over the real model built by `make model`.

The repository fixture lays out two versions of the built model (links to the same ONNX
files; version 2 has another temperature) so version routing is observable.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infermesh.broker import EmbeddedBroker
from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.grpc_server import RunningServer
from shared.kafka import KafkaSettings, ensure_topics
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from shared.pb import postprocess_pb2_grpc as post_grpc
from shared.pb import tokenizer_pb2_grpc as tok_grpc
from shared.pipeline import PipelineClient, PipelineTargets
from workers.sentiment_monitor.topics import monitor_topics

MODEL = "finance-sentiment"

# Tests assert behaviour, not which backend a noisy machine measured fastest: every
# inference service a test starts (in process or as a child) serves the default backend.
# tests/services/test_autotune.py turns the measurement on where it is the subject.
os.environ.setdefault("INFERMESH_INFERENCE_AUTOTUNE", "false")

# One tracer provider for the whole test session (OpenTelemetry allows setting it once),
# exporting to memory so tests can assert the spans every hop produced.
SPANS = InMemorySpanExporter()
_provider = TracerProvider(resource=Resource.create({"service.name": "infermesh-tests"}))
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)
VERSION_2_TEMPERATURE = 2.5


@pytest.fixture(scope="session")
def built_model() -> Path:
    """Version folder of the model `make model` built."""
    root = Path(os.environ.get("INFERMESH_TEST_MODEL_REPOSITORY", "models"))
    folder = root / MODEL / "1"
    if not (folder / "config.json").is_file():
        pytest.fail(f"no built model at {folder}; run `make model` (make test does it)")
    return folder.resolve()


def link_version(root: Path, built_model: Path, version: str, **config_changes: object) -> Path:
    """`root/MODEL/version`: links to the built model's files, and its own config.json
    (with `config_changes`), so versions cost no disk and differ where a test needs."""
    folder = root / MODEL / version
    folder.mkdir(parents=True)
    for item in built_model.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((built_model / "config.json").read_text()) | {"version": version} | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def model_repository(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    link_version(root, built_model, "1")
    link_version(root, built_model, "2", temperature=VERSION_2_TEMPERATURE)
    return root


@pytest.fixture(scope="session")
def model_config(built_model: Path) -> dict[str, object]:
    config: dict[str, object] = json.loads((built_model / "config.json").read_text())
    return config


@pytest_asyncio.fixture(scope="session")
async def tokenizer_server(model_repository: Path) -> AsyncIterator[RunningServer]:
    settings = TokenizerSettings(grpc_port=0, model_repository=model_repository, max_texts=64, max_text_bytes=20_000)
    running = await start_tokenizer(settings)
    yield running
    await running.stop(0)


@pytest_asyncio.fixture(scope="session")
async def inference_server(model_repository: Path) -> AsyncIterator[RunningServer]:
    settings = InferenceSettings(
        grpc_port=0,
        model_repository=model_repository,
        versions_to_serve=2,
        max_queue_size=256,
        max_sequences_per_request=128,
    )
    running, core = await start_inference(settings)
    yield running
    await running.stop(0)
    await core.close()


@pytest_asyncio.fixture(scope="session")
async def explainer_server(model_repository: Path, inference_server: RunningServer) -> AsyncIterator[RunningServer]:
    settings = ExplainerSettings(
        grpc_port=0, model_repository=model_repository, inference=f"127.0.0.1:{inference_server.port}", max_texts=4
    )
    running, probabilities = await start_explainer(settings)
    yield running
    await running.stop(0)
    await probabilities.close()


@pytest_asyncio.fixture(scope="session")
async def postprocessor_server(model_repository: Path) -> AsyncIterator[RunningServer]:
    running = await start_postprocessor(PostprocessorSettings(grpc_port=0, model_repository=model_repository))
    yield running
    await running.stop(0)


@pytest_asyncio.fixture
async def servers(
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    explainer_server: RunningServer,
) -> list[RunningServer]:
    """Every service a gateway needs, in the order gateway settings take them."""
    return [tokenizer_server, inference_server, postprocessor_server, explainer_server]


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest_asyncio.fixture(scope="session")
async def tokenizer_stub(tokenizer_server: RunningServer) -> AsyncIterator[tok_grpc.TokenizerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(_target(tokenizer_server)) as channel:
        yield tok_grpc.TokenizerServiceStub(channel)


@pytest_asyncio.fixture(scope="session")
async def inference_stub(inference_server: RunningServer) -> AsyncIterator[infer_grpc.GRPCInferenceServiceAsyncStub]:
    async with grpc.aio.insecure_channel(_target(inference_server)) as channel:
        yield infer_grpc.GRPCInferenceServiceStub(channel)


@pytest_asyncio.fixture(scope="session")
async def postprocessor_stub(
    postprocessor_server: RunningServer,
) -> AsyncIterator[post_grpc.PostprocessServiceAsyncStub]:
    async with grpc.aio.insecure_channel(_target(postprocessor_server)) as channel:
        yield post_grpc.PostprocessServiceStub(channel)


@pytest.fixture(scope="session")
def inference_target(inference_server: RunningServer) -> str:
    return _target(inference_server)


@pytest_asyncio.fixture(scope="session")
async def pipeline(
    tokenizer_server: RunningServer, inference_server: RunningServer, postprocessor_server: RunningServer
) -> AsyncIterator[PipelineClient]:
    targets = PipelineTargets(
        tokenizer=_target(tokenizer_server),
        inference=_target(inference_server),
        postprocessor=_target(postprocessor_server),
    )
    async with PipelineClient(targets, model_name=MODEL, rows_per_infer_call=8) as client:
        yield client


def free_port() -> int:
    # Tansu takes a fixed port; the bind-close window is tiny on loopback.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh broker per test: memory only, so every test starts with empty topics."""
    with EmbeddedBroker(port=free_port()) as running:
        yield running


@pytest.fixture
def kafka_config(broker: EmbeddedBroker) -> dict[str, Any]:
    config = KafkaSettings(bootstrap_servers=broker.bootstrap_servers).client_config()
    ensure_topics(config, monitor_topics(partitions=2))
    return config
