"""The REST API in process (httpx over ASGI) against the real services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.apikeys import hash_api_key
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from tests.gateway.conftest import API_KEYS
from tests.reliability import Observed
from tests.services.test_inference import encode


async def test_sentiment_classifies_texts(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/v1/sentiment", json={"texts": ["Acme shares plunge after profit warning", "Acme beats estimates"]}
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["model_name"] == "finance-sentiment" and body["model_version"] == "2"
    assert [r["label"] for r in body["results"]] == ["negative", "positive"]


@pytest.mark.parametrize(
    ("content", "status", "detail"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"texts": "one string"}', 422, "texts"),
        (b'{"texts": []}', 422, "at least 1 item"),
        (b'{"texts": [1, 2]}', 422, "texts.0"),
        (b'{"texts": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', 413, "9 texts; max is 8"),
        (b'{"texts": ["' + b"x" * 5000 + b'"]}', 413, "max is 4096"),
        (b'{"texts": ["fine", "  "]}', 400, "text 1 is empty"),
        (b'{"texts": ["fine"], "model_version": "9"}', 404, "version '9'"),
        (b'{"texts": ["fine"], "thresholds": {"bullish": 0.5}}', 400, "unknown label 'bullish'"),
        (b'{"texts": ["fine", "\\ud800"]}', 400, "text 1 is not valid Unicode"),
    ],
    ids=[
        "not JSON",
        "texts not a list",
        "no texts",
        "texts not strings",
        "9 texts",
        "a 5000-byte body",
        "a blank text",
        "unknown model version",
        "threshold for an unknown label",
        "a lone surrogate",
    ],
)
@pytest.mark.reliability("Limits", "POST /v1/sentiment", "4xx problem+json naming what is wrong; never 5xx")
async def test_bad_requests_are_problem_json(
    client: httpx.AsyncClient, content: bytes, status: int, detail: str, observed: Observed
) -> None:
    reply = await client.post("/v1/sentiment", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["status"] == status and detail in problem["detail"]
    assert problem["instance"] == "/v1/sentiment" and len(problem["trace_id"]) == 32
    assert "Traceback" not in reply.text
    observed.record(f"{status}: {problem['detail']}")


@pytest.mark.reliability(
    "Security",
    "request without an API key, or with a wrong one",
    "401 problem+json with WWW-Authenticate; configured keys 200",
)
async def test_api_keys_are_required_when_configured(keyed_client: httpx.AsyncClient, observed: Observed) -> None:
    body = {"texts": ["Acme beats estimates"]}
    missing = await keyed_client.post("/v1/sentiment", json=body)
    assert missing.status_code == 401 and "API key is required" in missing.json()["detail"]
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = await keyed_client.post("/v1/sentiment", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "the API key is not valid"
    # The configuration holds hashes: offering a configured hash as the key gets nowhere.
    as_hash = await keyed_client.post("/v1/sentiment", json=body, headers={"X-API-Key": hash_api_key(API_KEYS["ci"])})
    assert as_hash.status_code == 401
    v2_missing = await keyed_client.post("/v2/models/finance-sentiment/infer", json={"inputs": []})
    assert v2_missing.status_code == 401
    for headers in ({"Authorization": f"Bearer {API_KEYS['ops']}"}, {"X-API-Key": API_KEYS["ci"]}):
        assert (await keyed_client.post("/v1/sentiment", json=body, headers=headers)).status_code == 200
    observed.record(
        f"no key {missing.status_code}, wrong key {wrong.status_code}, the hash as key {as_hash.status_code},"
        " v2 infer without key 401; both configured keys 200"
    )


async def test_openapi_declares_the_problem_responses(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    responses = document["paths"]["/v1/sentiment"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "422", "429", "503", "504"} <= set(responses)
    assert "application/problem+json" in responses["413"]["content"]


@pytest.mark.reliability(
    "Limits", "a chunked 10 kB body with no Content-Length (limit 4096 bytes)", "413 problem+json, body not buffered"
)
async def test_a_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, observed: Observed) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"texts": ["'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"]}'

    reply = await client.post("/v1/sentiment", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.headers["content-type"] == "application/problem+json"
    observed.record(f"{reply.status_code}: {reply.json()['detail']}")
    assert "max is 4096" in reply.json()["detail"]


async def test_explain_returns_words_tokens_and_faithfulness(client: httpx.AsyncClient) -> None:
    text = "Acme shares plunge after the company slashes its profit forecast"
    reply = await client.post("/v1/explain", json={"text": text, "method": "occlusion"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["label"] == body["target_label"] == "negative" and body["method"] == "occlusion"
    (chunk,) = body["chunks"]
    assert [w["text"] for w in chunk["words"]] == text.split()
    assert chunk["completeness_gap"] is None
    assert [f["top_percent"] for f in chunk["faithfulness"]] == pytest.approx([0.1, 0.2, 0.5])

    # A prediction from version 1 is explained by version 1 (its labels and calibration).
    pinned = await client.post("/v1/explain", json={"text": text, "method": "occlusion", "model_version": "1"})
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["model_version"] == "1" and body["model_version"] == "2"
    assert pinned.json()["probabilities"] != body["probabilities"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"text": ""}, 422, "text"),
        ({"text": "fine", "method": "shap"}, 422, "method"),
        ({"text": "fine", "steps": 1000}, 413, "steps is 1000; max is 256"),
        ({"text": "fine", "target_label": "bullish"}, 400, "'bullish'"),
        ({"text": "fine", "steps": 3173506351247841139097600}, 422, "steps"),
        ({"text": "fine", "model_version": "7"}, 404, "version '7' is not in the model repository"),
    ],
)
async def test_explain_bad_requests(
    client: httpx.AsyncClient, body: dict[str, object], status: int, detail: str
) -> None:
    reply = await client.post("/v1/explain", json=body)
    assert reply.status_code == status and detail in reply.json()["detail"]
    assert reply.headers["content-type"] == "application/problem+json"


async def test_kserve_v2_rest_maps_onto_the_inference_service(client: httpx.AsyncClient, built_model: Path) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/v2")).json()["name"] == "infermesh"
    metadata = (await client.get("/v2/models/finance-sentiment")).json()
    assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["name"] == "input_ids"
    assert (await client.get("/v2/models/finance-sentiment/versions/1/ready")).json()["ready"] is True

    ids, mask = encode(built_model, ["Shares of Acme plunge after profit warning"])
    body = {
        "id": "rest-1",
        "inputs": [
            {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
            {"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT64", "data": mask.ravel().tolist()},
        ],
        "outputs": [{"name": "label"}, {"name": "probabilities"}],
    }
    reply = await client.post("/v2/models/finance-sentiment/versions/1/infer", json=body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["id"] == "rest-1" and result["model_version"] == "1"
    label, probabilities = result["outputs"]
    assert label == {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["negative"]}
    assert probabilities["shape"] == [1, 3] and abs(sum(probabilities["data"]) - 1) < 1e-4


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        (
            "/v2/models/nope/infer",
            {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]},
            404,
            "'nope'",
        ),
        (
            "/v2/models/finance-sentiment/infer",
            {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]},
            400,
            "contents hold 2 elements",
        ),
        (
            "/v2/models/finance-sentiment/infer",
            {"inputs": [{"name": "input_ids", "shape": [1], "datatype": "INT64", "data": ["a"]}]},
            400,
            "does not fit datatype INT64",
        ),
        ("/v2/models/finance-sentiment/infer", {"inputs": []}, 422, "inputs"),
        (
            "/v2/models/finance-sentiment/infer",
            {"inputs": [{"name": "input_ids", "shape": [2**70], "datatype": "INT64", "data": [1]}]},
            400,
            "does not fit int64",
        ),
    ],
)
async def test_kserve_v2_rest_errors(
    client: httpx.AsyncClient, path: str, body: dict[str, object], status: int, detail: str
) -> None:
    reply = await client.post(path, json=body)
    assert reply.status_code == status and detail in reply.json()["detail"]
    assert reply.headers["content-type"] == "application/problem+json"
    missing = await client.get("/v2/models/finance-sentiment/versions/9")
    assert missing.status_code == 404


async def test_pipeline_grpc_service_classifies_and_explains(client: httpx.AsyncClient) -> None:
    port = client.headers["x-test-grpc-port"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pipeline_grpc.PipelineStub(channel)
        reply = await stub.Classify(pipeline_pb.ClassifyRequest(texts=["Acme shares plunge", "Acme beats estimates"]))
        assert [r.label for r in reply.results] == ["negative", "positive"] and reply.model_version == "2"
        explained = await stub.Explain(
            explainer_pb.ExplainRequest(texts=["Acme shares plunge"], method=explainer_pb.METHOD_OCCLUSION), timeout=60
        )
        assert explained.explanations[0].label == "negative"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pipeline_pb.ClassifyRequest(texts=["ok", ""]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text 1 is empty" in (
            caught.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pipeline_pb.ClassifyRequest(texts=["ok"], model_name="other"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
