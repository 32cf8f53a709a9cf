"""Models as data everywhere (issue 17, item 2): one repository holding the built default
model and an imported tiny multi-label model with other labels; the tokenizer, the
post-processor, REST `/v1/classify` and `/v1/models`, and the gRPC Pipeline answer each
model with its own labels, unknown models get 404 / NOT_FOUND naming the models there are,
and the monitor's score comes from the version's `scores` mapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from shared.classification import response_fields, score, sentiment_scores
from shared.messages import NewsItem
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.pb import postprocess_pb2 as post_pb
from shared.pb import postprocess_pb2_grpc as post_grpc
from shared.pb import tokenizer_pb2 as tok_pb
from shared.pb import tokenizer_pb2_grpc as tok_grpc
from shared.pipeline import Classification, PipelineClient, PipelineTargets
from tests.conftest import MODEL, link_version
from tests.gateway.conftest import client_for, settings_for_targets
from tests.mesh import running_mesh
from tests.test_import import import_cli
from tests.tiny_checkpoints import FAMILIES, build_checkpoint
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import NewsScorer
from workers.sentiment_monitor.scoring import BlockingPipeline, MissingScoreMapping, check_score_mapping
from workers.sentiment_monitor.settings import MonitorSettings

SENTIMENT = {"negative": -1.0, "positive": 1.0}
TOPICS = ["earnings", "merger", "lawsuit"]
TINY = "topics"
TEXTS = ["Acme shares plunge after profit warning", "Globex to buy Initech; regulators sue"]


@pytest.fixture(scope="module")
def two_models(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built default model (with its sentiment score mapping) and an imported tiny BERT
    whose labels are topics (multi-label), so it has no score mapping."""
    root = tmp_path_factory.mktemp("two-models")
    link_version(root, built_model, "1", scores=SENTIMENT)
    bert = next(f for f in FAMILIES if f.name == "bert")
    checkpoint = build_checkpoint(
        bert, root.parent / "topics-checkpoint", labels=TOPICS, problem_type="multi_label_classification"
    )
    code, output = import_cli(str(checkpoint), "--model", TINY, "--repository", str(root))
    assert code == 0, output
    return root


@pytest_asyncio.fixture(scope="module")
async def targets(two_models: Path) -> AsyncIterator[PipelineTargets]:
    async with running_mesh(two_models) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def gateway(targets: PipelineTargets) -> AsyncIterator[httpx.AsyncClient]:
    addresses = [targets.tokenizer, targets.inference, targets.postprocessor, "127.0.0.1:1"]
    async for client in client_for(settings_for_targets(addresses, model_name=MODEL)):
        yield client


# The one function and the score, without servers.


def test_score_is_the_weighted_sum_of_probabilities() -> None:
    assert score({"negative": 0.7, "neutral": 0.2, "positive": 0.1}, SENTIMENT) == pytest.approx(-0.6)
    assert score({"a": 0.5, "b": 0.5}, {"a": 2.0, "b": 0.5}) == pytest.approx(1.25)
    assert score({"negative": 1.0}, {}) is None


def test_sentiment_labels_are_recognised_and_others_are_not() -> None:
    assert sentiment_scores(["negative", "neutral", "positive"]) == SENTIMENT
    assert sentiment_scores(["Bearish", "Bullish"]) == {"Bearish": -1.0, "Bullish": 1.0}
    assert sentiment_scores(TOPICS) == {}
    assert sentiment_scores(["LABEL_0", "LABEL_1"]) == {}


def test_response_fields_build_every_response_shape() -> None:
    result = Classification("merger", {"merger": 0.9, "lawsuit": 0.6}, False, 2, 7, 0, ["merger", "lawsuit"], 0.3)
    fields = response_fields(result)
    assert fields == {
        "label": "merger",
        "labels": ["merger", "lawsuit"],
        "probabilities": {"merger": 0.9, "lawsuit": 0.6},
        "abstained": False,
        "num_chunks": 2,
        "score": 0.3,
    }
    message = pipeline_pb.Classification(**fields, num_tokens=7)
    assert list(message.labels) == ["merger", "lawsuit"] and message.HasField("score")
    unscored = pipeline_pb.Classification(**response_fields(Classification("x", {}, True, 1, 1, 0)), num_tokens=1)
    assert not unscored.HasField("score")


# The services, per model.


async def test_tokenizer_answers_per_model(targets: PipelineTargets) -> None:
    async with grpc.aio.insecure_channel(targets.tokenizer) as channel:
        stub = tok_grpc.TokenizerServiceStub(channel)
        default = await stub.GetTokenizerInfo(tok_pb.GetTokenizerInfoRequest())
        tiny = await stub.GetTokenizerInfo(tok_pb.GetTokenizerInfoRequest(model_name=TINY))
        assert (default.model_name, default.model_version) == (MODEL, "1")
        assert (tiny.model_name, tiny.model_version) == (TINY, "1")
        assert tiny.vocab_size != default.vocab_size  # each model's own tokenizer
        ids = [
            list(
                (await stub.Tokenize(tok_pb.TokenizeRequest(texts=TEXTS[:1], model_name=name)))
                .results[0]
                .chunks[0]
                .input_ids
            )
            for name in (MODEL, TINY)
        ]
        assert ids[0] != ids[1]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Tokenize(tok_pb.TokenizeRequest(texts=TEXTS, model_name="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"models: {MODEL}, {TINY}" in (error.value.details() or "")


async def test_postprocessor_answers_per_model_and_lists_them(targets: PipelineTargets) -> None:
    async with grpc.aio.insecure_channel(targets.postprocessor) as channel:
        stub = post_grpc.PostprocessServiceStub(channel)
        default = await stub.Postprocess(post_pb.PostprocessRequest(logits=[2.0, 0.0, -1.0], num_labels=3))
        tiny = await stub.Postprocess(
            post_pb.PostprocessRequest(model_name=TINY, logits=[2.0, 0.0, -1.0], num_labels=3)
        )
        listed = await stub.ListModels(post_pb.ListModelsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Postprocess(post_pb.PostprocessRequest(model_name="nope", logits=[0.0], num_labels=1))
    assert default.model_name == MODEL and list(default.labels) == ["negative", "neutral", "positive"]
    probabilities = dict(zip(default.labels, default.results[0].probabilities, strict=True))
    assert default.results[0].score == pytest.approx(probabilities["positive"] - probabilities["negative"], abs=1e-6)
    assert tiny.model_name == TINY and list(tiny.labels) == TOPICS
    assert not tiny.results[0].HasField("score")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and TINY in (error.value.details() or "")
    assert listed.default_model == MODEL
    described = {m.name: m for m in listed.models}
    assert set(described) == {MODEL, TINY}
    assert described[TINY].activation == "sigmoid" and list(described[TINY].labels) == TOPICS
    assert dict(described[MODEL].scores) == SENTIMENT and not described[TINY].scores


# The gateway: REST and the gRPC Pipeline.


async def test_rest_classify_answers_each_model_with_its_labels(gateway: httpx.AsyncClient) -> None:
    answers = {}
    for name in (MODEL, TINY):
        response = await gateway.post("/v1/classify", json={"model": name, "texts": TEXTS})
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    assert answers[MODEL]["model_name"] == MODEL and answers[TINY]["model_name"] == TINY
    assert set(answers[MODEL]["results"][0]["probabilities"]) == {"negative", "neutral", "positive"}
    assert set(answers[TINY]["results"][0]["probabilities"]) == set(TOPICS)
    for result in answers[MODEL]["results"]:
        p = result["probabilities"]
        assert result["score"] == pytest.approx(p["positive"] - p["negative"], abs=1e-6)
    assert all(r["score"] is None for r in answers[TINY]["results"])
    assert all(set(r["labels"]) <= set(TOPICS) for r in answers[TINY]["results"])

    # /v1/sentiment is the default model, unchanged.
    sentiment = (await gateway.post("/v1/sentiment", json={"texts": TEXTS})).json()
    assert sentiment["model_name"] == MODEL
    assert [r["label"] for r in sentiment["results"]] == [r["label"] for r in answers[MODEL]["results"]]


async def test_rest_unknown_model_is_a_404_naming_the_models(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post("/v1/classify", json={"model": "nope", "texts": TEXTS})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert f"models: {MODEL}, {TINY}" in response.json()["detail"]
    assert (await gateway.post("/v1/classify", json={"model": "../etc", "texts": TEXTS})).status_code == 422


async def test_rest_models_lists_both(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["default_model"] == MODEL
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {MODEL, TINY}
    assert models[TINY] == {
        "name": TINY,
        "versions": ["1"],
        "serving_version": "1",
        "labels": TOPICS,
        "activation": "sigmoid",
        "languages": ["en"],
        "scores": {},
        # One head, under the name a version gets when its config names none.
        "heads": [{"name": "label", "labels": TOPICS, "activation": "sigmoid", "scores": {}}],
    }
    assert models[MODEL]["scores"] == SENTIMENT and models[MODEL]["activation"] == "softmax"
    paths = (await gateway.get("/openapi.json")).json()["paths"]
    assert "404" in paths["/v1/classify"]["post"]["responses"] and "/v1/models" in paths


async def test_grpc_pipeline_answers_each_model(gateway: httpx.AsyncClient) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.headers['x-test-grpc-port']}") as channel:
        stub = pipeline_grpc.PipelineStub(channel)
        default = await stub.Classify(pipeline_pb.ClassifyRequest(texts=TEXTS))
        tiny = await stub.Classify(pipeline_pb.ClassifyRequest(texts=TEXTS, model_name=TINY))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Classify(pipeline_pb.ClassifyRequest(texts=TEXTS, model_name="nope"))
    assert default.model_name == MODEL and all(r.HasField("score") for r in default.results)
    assert all(list(r.labels) == [r.label] for r in default.results if not r.abstained)
    assert tiny.model_name == TINY and set(tiny.results[0].probabilities) == set(TOPICS)
    assert not any(r.HasField("score") for r in tiny.results)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and TINY in (error.value.details() or "")


# The worker's score.


async def test_worker_score_comes_from_the_mapping_through_the_pipeline(targets: PipelineTargets) -> None:
    async with PipelineClient(targets, model_name=MODEL) as client:
        result = await client.classify(TEXTS)
        tiny = await client.classify(TEXTS, model_name=TINY)
    scorer = NewsScorer(None, None, None, TickerAttributor({}), MonitorSettings())  # type: ignore[arg-type]
    item = NewsItem(id="n1", published_at="2024-05-01T12:00:00Z", source="wire", headline=TEXTS[0])
    (scored,) = scorer._scored_items(item, (result, 0))
    probabilities = result.results[0].probabilities
    assert scored.score == pytest.approx(probabilities["positive"] - probabilities["negative"], abs=1e-6)
    with pytest.raises(MissingScoreMapping, match=TINY):
        scorer._scored_items(item, (tiny, 0))


async def test_worker_refuses_a_model_without_a_score_mapping(targets: PipelineTargets) -> None:
    # The worker's blocking face runs its own loop; the servers need this one free meanwhile.
    pipeline = await asyncio.to_thread(BlockingPipeline, targets, MODEL)
    try:
        assert await asyncio.to_thread(check_score_mapping, pipeline, MODEL) is None
        refusal = await asyncio.to_thread(check_score_mapping, pipeline, TINY)
        assert refusal is not None and TINY in refusal and "scores" in refusal
        missing = await asyncio.to_thread(check_score_mapping, pipeline, "nope")
        assert missing is not None and TINY in missing
    finally:
        await asyncio.to_thread(pipeline.close)
