"""Several heads from one pass (issue 17 item 3), as callers see them: a tiny two-head
version (`sentiment`, softmax, 3 labels with a score mapping; `topic`, sigmoid, 4 labels,
temperature 1.5) served by the real services on loopback. Its graph's one `logits` output
holds both heads' columns; every face answers each head with its own labels, activation
and temperature, and the numbers are transformers' own for the checkpoint. A second model
rolls out from a one-head version to a two-head one, and each answer carries the heads of
the version that gave it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from infermesh.cli import app
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.calibration import sigmoid, softmax
from shared.model_repository import ModelRepository, RolloutRule
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.pb import postprocess_pb2 as post_pb
from shared.pb import postprocess_pb2_grpc as post_grpc
from shared.pipeline import PipelineClient, PipelineTargets
from tests.gateway.conftest import client_for, settings_for_targets
from tests.tiny_checkpoints import TWO_HEAD_EXTRA, TWO_HEAD_PRIMARY, two_head_version

MODEL = "multi"
ROLLING = "rolling"
SENTIMENT, SENTIMENT_LABELS = TWO_HEAD_PRIMARY
TOPIC, TOPIC_LABELS = TWO_HEAD_EXTRA
TOPIC_TEMPERATURE = 1.5
#: English only: the gateway routes by language and the tiny model declares English.
TEXTS = [
    "Acme shares plunge after profit warning",
    "Revenue rose 12% to $4.1bn; the dividend is raised.",
    "Regulators fine Globex",
]
#: ONNX fp32 against transformers, calibrated probabilities (as in tests/test_import.py);
#: float32 on the wire.
TOLERANCE = 1e-4
EVERY_OUTPUT = [
    "logits",
    "probabilities",
    "label",
    f"{TOPIC}_logits",
    f"{TOPIC}_probabilities",
    f"{TOPIC}_label",
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heads-scratch")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, scratch: Path) -> Path:
    """`multi/1`: the two-head version. `rolling/1`: the same graph read as one head of all
    seven columns; `rolling/2`: the two heads; a canary rule sends half the unpinned
    requests to version 2."""
    root = tmp_path_factory.mktemp("heads")
    folder = two_head_version(root, MODEL, scratch)
    two_heads = json.loads((folder / "config.json").read_text())
    one_head = two_heads | {
        "head": "label",
        "labels": SENTIMENT_LABELS + TOPIC_LABELS,
        "activation": "softmax",
        "scores": {},
        "extra_heads": [],
    }
    for version, config in (("1", one_head), ("2", two_heads)):
        target = root / ROLLING / version
        target.mkdir(parents=True)
        for item in folder.iterdir():
            if item.name != "config.json":
                (target / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
        (target / "config.json").write_text(json.dumps(config | {"name": ROLLING, "version": version}))
    ModelRepository(root).write_rollout(ROLLING, RolloutRule(serving="1", candidate="2", canary_share=0.5))
    return root


@pytest.fixture(scope="module")
def checkpoint(repository: Path, scratch: Path) -> Path:
    """The transformers checkpoint `two_head_version` imported."""
    return scratch / f"{MODEL}-checkpoint"


@pytest.fixture(scope="module")
def primary_temperature(repository: Path) -> float:
    return ModelRepository(repository).config(MODEL).temperature


@pytest.fixture(scope="module")
def expected(checkpoint: Path, primary_temperature: float) -> dict[str, npt.NDArray[np.float64]]:
    """transformers' own logits for TEXTS (its tokenizer, its model), as each head's
    calibrated probabilities: softmax of the first 3 columns, sigmoid(columns 3-6 / 1.5)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    assert logits.shape == (len(TEXTS), 7)
    return {
        SENTIMENT: softmax(logits[:, :3], primary_temperature),
        TOPIC: sigmoid(logits[:, 3:7], TOPIC_TEMPERATURE),
        "logits": logits.astype(np.float64),
    }


@pytest_asyncio.fixture(scope="module")
async def targets(repository: Path) -> AsyncIterator[PipelineTargets]:
    tokenizer = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=repository, model_name=MODEL))
    # fp32: the numbers are compared with transformers'.
    inference, core = await start_inference(
        InferenceSettings(grpc_port=0, model_repository=repository, versions_to_serve=2, variant="fp32")
    )
    postprocessor = await start_postprocessor(
        PostprocessorSettings(grpc_port=0, model_repository=repository, model_name=MODEL)
    )
    try:
        yield PipelineTargets(
            tokenizer=f"127.0.0.1:{tokenizer.port}",
            inference=f"127.0.0.1:{inference.port}",
            postprocessor=f"127.0.0.1:{postprocessor.port}",
        )
    finally:
        for server in (tokenizer, inference, postprocessor):
            await server.stop(0)
        await core.close()


@pytest_asyncio.fixture(scope="module")
async def gateway(targets: PipelineTargets) -> AsyncIterator[httpx.AsyncClient]:
    addresses = [targets.tokenizer, targets.inference, targets.postprocessor, "127.0.0.1:1"]
    async for client in client_for(settings_for_targets(addresses, model_name=MODEL)):
        yield client


def _infer_request(repository: Path, model: str, outputs: list[str], version: str = "") -> infer_pb.ModelInferRequest:
    """TEXTS tokenized with the version's own tokenizer.json, right-padded with 0."""
    tokenizer = Tokenizer.from_file(str(repository / MODEL / "1" / "tokenizer.json"))
    encodings = tokenizer.encode_batch(TEXTS)
    length = max(len(e.ids) for e in encodings)
    ids = np.array([e.ids + [0] * (length - len(e.ids)) for e in encodings], dtype=np.int64)
    mask = np.array([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in encodings], dtype=np.int64)
    return infer_pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[
            infer_pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=list(ids.shape)),
            infer_pb.ModelInferRequest.InferInputTensor(
                name="attention_mask", datatype="INT64", shape=list(mask.shape)
            ),
        ],
        outputs=[infer_pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        raw_input_contents=[ids.tobytes(), mask.tobytes()],
    )


# The inference service (OIP v2).


async def test_metadata_lists_each_heads_outputs_primary_first(targets: PipelineTargets) -> None:
    async with grpc.aio.insecure_channel(targets.inference) as channel:
        stub = infer_grpc.GRPCInferenceServiceStub(channel)
        two = await stub.ModelMetadata(infer_pb.ModelMetadataRequest(name=MODEL))
        one = await stub.ModelMetadata(infer_pb.ModelMetadataRequest(name=ROLLING, version="1"))
    assert [(o.name, o.datatype, list(o.shape)) for o in two.outputs] == [
        ("logits", "FP32", [-1, 3]),
        ("probabilities", "FP32", [-1, 3]),
        ("label", "BYTES", [-1]),
        (f"{TOPIC}_logits", "FP32", [-1, 4]),
        (f"{TOPIC}_probabilities", "FP32", [-1, 4]),
        (f"{TOPIC}_label", "BYTES", [-1]),
    ]
    # A one-head version answers exactly as before: three outputs over all its labels.
    assert [(o.name, list(o.shape)) for o in one.outputs] == [
        ("logits", [-1, 7]),
        ("probabilities", [-1, 7]),
        ("label", [-1]),
    ]


TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tokenizers import Tokenizer

url, tokenizer_path, model, *texts = sys.argv[1:]
tokenizer = Tokenizer.from_file(tokenizer_path)
tokenizer.enable_padding()
encodings = tokenizer.encode_batch(texts)
ids = np.array([e.ids for e in encodings], dtype=np.int64)
mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
inputs = [
    triton.InferInput("input_ids", list(ids.shape), "INT64"),
    triton.InferInput("attention_mask", list(mask.shape), "INT64"),
]
inputs[0].set_data_from_numpy(ids)
inputs[1].set_data_from_numpy(mask)
client = triton.InferenceServerClient(url=url)
metadata = client.get_model_metadata(model, as_json=True)
asked = ["topic_probabilities", "probabilities", "topic_label", "topic_logits"]
picked = client.infer(model, inputs, outputs=[triton.InferRequestedOutput(n) for n in asked])
every = client.infer(model, inputs)
try:
    client.infer(model, inputs, outputs=[triton.InferRequestedOutput("sentiment_probabilities")])
    refused = None
except triton.InferenceServerException as error:
    refused = {"status": error.status(), "message": error.message()}
print(json.dumps({
    "metadata_outputs": [o["name"] for o in metadata["outputs"]],
    "picked": [o.name for o in picked.get_response().outputs],
    "topic_probabilities": picked.as_numpy("topic_probabilities").tolist(),
    "probabilities": picked.as_numpy("probabilities").tolist(),
    "topic_logits": picked.as_numpy("topic_logits").tolist(),
    "topic_label": [label.decode() for label in picked.as_numpy("topic_label")],
    "every": [o.name for o in every.get_response().outputs],
    "refused": refused,
}))
"""


async def test_a_stock_triton_client_gets_each_heads_probabilities(
    targets: PipelineTargets, repository: Path, expected: dict[str, npt.NDArray[np.float64]]
) -> None:
    # tritonclient registers the `inference.*` protobuf symbols too: its own process.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TRITON_SCRIPT,
        targets.inference,
        str(repository / MODEL / "1" / "tokenizer.json"),
        MODEL,
        *TEXTS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)

    assert seen["metadata_outputs"] == EVERY_OUTPUT
    assert seen["picked"] == ["topic_probabilities", "probabilities", "topic_label", "topic_logits"]
    assert seen["every"] == EVERY_OUTPUT  # no outputs asked for: every head's
    np.testing.assert_allclose(seen["topic_probabilities"], expected[TOPIC], atol=TOLERANCE)
    np.testing.assert_allclose(seen["probabilities"], expected[SENTIMENT], atol=TOLERANCE)
    np.testing.assert_allclose(seen["topic_logits"], expected["logits"][:, 3:7], atol=1e-3)
    assert seen["topic_label"] == [TOPIC_LABELS[i] for i in expected[TOPIC].argmax(axis=1)]
    refused = seen["refused"]
    assert refused is not None and refused["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "sentiment_probabilities" in refused["message"]
    assert all(name in refused["message"] for name in EVERY_OUTPUT)


async def test_an_unknown_output_is_invalid_argument_naming_the_valid_ones(
    targets: PipelineTargets, repository: Path
) -> None:
    async with grpc.aio.insecure_channel(targets.inference) as channel:
        stub = infer_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as two:
            await stub.ModelInfer(_infer_request(repository, MODEL, ["probabilities", "topic_scores"]))
        with pytest.raises(grpc.aio.AioRpcError) as one:
            await stub.ModelInfer(_infer_request(repository, ROLLING, ["topic_probabilities"], version="1"))
    assert two.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'topic_scores'" in (two.value.details() or "")
    assert "outputs are logits, probabilities, label, topic_logits, topic_probabilities, topic_label" in (
        two.value.details() or ""
    )
    # The version asked for decides: version 1 of the rolling model has no topic head.
    assert one.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs are logits, probabilities, label" in (one.value.details() or "")


# The post-processor.


async def test_postprocessor_answers_every_head_and_old_callers_primary_logits(
    targets: PipelineTargets, expected: dict[str, npt.NDArray[np.float64]]
) -> None:
    logits = expected["logits"]
    async with grpc.aio.insecure_channel(targets.postprocessor) as channel:
        stub = post_grpc.PostprocessServiceStub(channel)
        every = await stub.Postprocess(
            post_pb.PostprocessRequest(model_name=MODEL, logits=logits.ravel().tolist(), num_labels=7)
        )
        old = await stub.Postprocess(
            post_pb.PostprocessRequest(model_name=MODEL, logits=logits[:, :3].ravel().tolist(), num_labels=3)
        )
        strict = await stub.Postprocess(
            post_pb.PostprocessRequest(
                model_name=MODEL,
                logits=logits.ravel().tolist(),
                num_labels=7,
                thresholds=dict.fromkeys(SENTIMENT_LABELS, 1.0),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Postprocess(
                post_pb.PostprocessRequest(model_name=MODEL, logits=logits[:, :4].ravel().tolist(), num_labels=4)
            )
        listed = await stub.ListModels(post_pb.ListModelsRequest())

    for row, document in enumerate(every.results):
        assert [head.name for head in document.heads] == [SENTIMENT, TOPIC]
        sentiment, topic = document.heads
        np.testing.assert_allclose(
            [sentiment.probabilities[label] for label in SENTIMENT_LABELS], expected[SENTIMENT][row], atol=TOLERANCE
        )
        np.testing.assert_allclose(
            [topic.probabilities[label] for label in TOPIC_LABELS], expected[TOPIC][row], atol=TOLERANCE
        )
        # The top-level fields are the primary head's.
        assert document.label == sentiment.label and list(document.probabilities) == pytest.approx(
            [sentiment.probabilities[label] for label in SENTIMENT_LABELS]
        )
        assert sentiment.score == pytest.approx(
            sentiment.probabilities["positive"] - sentiment.probabilities["negative"], abs=1e-6
        )
        assert not topic.HasField("score")
        on = [label for label in TOPIC_LABELS if topic.probabilities[label] >= 0.5]
        assert sorted(topic.labels) == sorted(on) and topic.abstained == (not on)
    # An older caller's primary-only logits: the same primary answer, one head.
    for ours, theirs in zip(old.results, every.results, strict=True):
        assert [head.name for head in ours.heads] == [SENTIMENT]
        assert ours.label == theirs.label and list(ours.probabilities) == pytest.approx(list(theirs.probabilities))
    # The request's thresholds apply to the primary head only.
    for ours, theirs in zip(strict.results, every.results, strict=True):
        assert ours.abstained and ours.heads[0].abstained and ours.heads[0].label == "abstain"
        assert ours.heads[1] == theirs.heads[1]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "7" in (error.value.details() or "") and "3" in (error.value.details() or "")

    described = {m.name: m for m in listed.models}[MODEL]
    assert [(h.name, list(h.labels), h.activation) for h in described.heads] == [
        (SENTIMENT, SENTIMENT_LABELS, "softmax"),
        (TOPIC, TOPIC_LABELS, "sigmoid"),
    ]
    assert dict(described.heads[0].scores) == {"negative": -1.0, "positive": 1.0} and not described.heads[1].scores


# The gateway: REST and the gRPC Pipeline.


def _check_heads(heads: dict[str, Any], expected: dict[str, npt.NDArray[np.float64]], row: int) -> None:
    assert list(heads) == [SENTIMENT, TOPIC]
    sentiment, topic = heads[SENTIMENT], heads[TOPIC]
    np.testing.assert_allclose(
        [sentiment["probabilities"][label] for label in SENTIMENT_LABELS], expected[SENTIMENT][row], atol=TOLERANCE
    )
    np.testing.assert_allclose(
        [topic["probabilities"][label] for label in TOPIC_LABELS], expected[TOPIC][row], atol=TOLERANCE
    )
    assert sentiment["label"] == SENTIMENT_LABELS[int(expected[SENTIMENT][row].argmax())]
    assert sentiment["score"] == pytest.approx(
        sentiment["probabilities"]["positive"] - sentiment["probabilities"]["negative"], abs=1e-6
    )
    assert topic["score"] is None
    assert set(topic["labels"]) == {label for label in TOPIC_LABELS if topic["probabilities"][label] >= 0.5}


async def test_rest_classify_returns_every_head(
    gateway: httpx.AsyncClient, expected: dict[str, npt.NDArray[np.float64]]
) -> None:
    response = await gateway.post("/v1/classify", json={"model": MODEL, "texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    for row, result in enumerate(body["results"]):
        assert result["status"] == "ok"
        _check_heads(result["heads"], expected, row)
        assert result["label"] == result["heads"][SENTIMENT]["label"]
        assert result["probabilities"] == result["heads"][SENTIMENT]["probabilities"]
        assert result["score"] == result["heads"][SENTIMENT]["score"]
    # /v1/sentiment (the gateway's default model, here the two-head one) answers the same.
    sentiment = (await gateway.post("/v1/sentiment", json={"texts": TEXTS})).json()
    assert [r["heads"] for r in sentiment["results"]] == [r["heads"] for r in body["results"]]


async def test_rest_models_lists_each_models_heads(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert models[MODEL]["heads"] == [
        {
            "name": SENTIMENT,
            "labels": SENTIMENT_LABELS,
            "activation": "softmax",
            "scores": {"negative": -1.0, "positive": 1.0},
        },
        {"name": TOPIC, "labels": TOPIC_LABELS, "activation": "sigmoid", "scores": {}},
    ]
    # The rolling model's serving version (1) has one head.
    assert [h["name"] for h in models[ROLLING]["heads"]] == ["label"]
    schemas = (await gateway.get("/openapi.json")).json()["components"]["schemas"]
    assert "description" in schemas["SentimentResult"]["properties"]["heads"]
    assert "description" in schemas["ModelEntry"]["properties"]["heads"]


async def test_grpc_pipeline_returns_every_head(
    gateway: httpx.AsyncClient, expected: dict[str, npt.NDArray[np.float64]]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.headers['x-test-grpc-port']}") as channel:
        reply = await pipeline_grpc.PipelineStub(channel).Classify(
            pipeline_pb.ClassifyRequest(texts=TEXTS, model_name=MODEL)
        )
    for row, result in enumerate(reply.results):
        heads = {
            head.name: {
                "label": head.label,
                "labels": list(head.labels),
                "probabilities": dict(head.probabilities),
                "score": head.score if head.HasField("score") else None,
            }
            for head in result.heads
        }
        _check_heads(heads, expected, row)
        assert result.label == result.heads[0].label


# Across versions, and the CLI.


async def test_a_rollout_from_one_head_to_two_answers_each_version_with_its_heads(targets: PipelineTargets) -> None:
    async with PipelineClient(targets, model_name=ROLLING, rows_per_infer_call=2) as client:
        # One call at a time: concurrent calls share rounds, and a round is one version's.
        results = [await client.classify(TEXTS) for _ in range(16)]
        pinned = await client.classify(TEXTS, model_version="2")
        again = await client.classify(TEXTS, model_version="1")
    versions = {result.model_version for result in results}
    assert versions == {"1", "2"}, "the canary sends about half the unpinned calls to version 2 (1 in 32768 not)"
    for result in [*results, pinned, again]:
        for text in result.results:
            assert text.model_version == result.model_version
            if result.model_version == "1":
                assert list(text.heads) == ["label"]
                assert len(text.heads["label"].probabilities) == 7
            else:
                assert list(text.heads) == [SENTIMENT, TOPIC]
                assert text.heads[SENTIMENT].probabilities == text.probabilities
    assert pinned.model_version == "2" and again.model_version == "1"


async def test_the_cli_prints_every_head(targets: PipelineTargets) -> None:
    arguments = [
        "classify",
        *TEXTS[:2],
        "--model",
        MODEL,
        "--tokenizer",
        targets.tokenizer,
        "--inference",
        targets.inference,
        "--postprocessor",
        targets.postprocessor,
    ]
    # The CLI runs its own event loop: in a thread, so the servers' loop keeps serving.
    result = await asyncio.to_thread(CliRunner().invoke, app, arguments)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    for text in printed["results"]:
        assert list(text["heads"]) == [SENTIMENT, TOPIC]
        assert set(text["heads"][TOPIC]["probabilities"]) == set(TOPIC_LABELS)
        assert text["heads"][SENTIMENT]["label"] == text["label"]


# The wire: heads were added, nothing renumbered.


def test_heads_are_new_fields_and_old_clients_read_the_rest_unchanged() -> None:
    def numbers(message: Any) -> dict[str, int]:
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    assert numbers(post_pb.DocumentResult) == {
        "label": 1,
        "probabilities": 2,
        "abstained": 3,
        "num_chunks": 4,
        "deciding_chunk": 5,
        "labels": 6,
        "score": 7,
        "heads": 8,
    }
    assert numbers(post_pb.ModelDescription) == {
        "name": 1,
        "versions": 2,
        "serving_version": 3,
        "labels": 4,
        "activation": 5,
        "languages": 6,
        "scores": 7,
        "heads": 8,
    }
    classification = numbers(pipeline_pb.Classification)
    assert classification.pop("heads") == 14
    assert sorted(classification.values()) == list(range(1, 14))
