"""The explainer explains any head of a multi-head version (issues 17 item 3 and 18 item 3):
a tiny real two-head version (`sentiment`, softmax; `topic`, sigmoid at temperature 1.5,
columns 3..6 of the one logits output), real inference service and explainer on loopback,
the gateway's REST `/v1/explain` and gRPC Pipeline in front. Each head's labels,
probabilities and attributions are checked against transformers on the same checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch
from playwright.async_api import Route
from scipy.special import expit, softmax
from transformers import AutoModelForSequenceClassification

from gateway.app import create_app
from services.explainer.scoring import OipProbabilities
from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.tokenizer.api import version_tokenizer
from shared import oip
from shared.model_repository import ModelConfig, ModelRepository
from shared.pb import explainer_pb2 as pb
from shared.pb import explainer_pb2_grpc as pb_grpc
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from tests.gateway.conftest import chromium, client_for, require_chromium, serving, settings_for_targets
from tests.tiny_checkpoints import TWO_HEAD_EXTRA, TWO_HEAD_PRIMARY, two_head_version

MODEL = "news"
TEXTS = ["Acme shares plunge after profit warning", "Regulators fine the lender over failures"]
SENTIMENT, SENTIMENT_LABELS = TWO_HEAD_PRIMARY
TOPIC, TOPIC_LABELS = TWO_HEAD_EXTRA
TOPIC_TEMPERATURE = 1.5


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-head")
    two_head_version(root, MODEL, tmp_path_factory.mktemp("two-head-scratch"))
    return root


@pytest.fixture(scope="module")
def config(repository: Path) -> ModelConfig:
    return ModelRepository(repository).config(MODEL, "1")


@pytest.fixture(scope="module")
def reference(repository: Path, config: ModelConfig) -> dict[str, npt.NDArray[np.float64]]:
    """Text -> transformers' logits (every head's columns) of the merged checkpoint, on the
    token ids the version's tokenizer gives it."""
    tokenizer = version_tokenizer(ModelRepository(repository), MODEL, "1", 8, 20_000)
    model = AutoModelForSequenceClassification.from_pretrained(repository / MODEL / "1" / "hf").eval()
    logits = {}
    for text, result in zip(TEXTS, tokenizer.tokenize(TEXTS), strict=True):
        (chunk,) = result.chunks
        with torch.no_grad():
            output = model(input_ids=torch.tensor([chunk.input_ids])).logits
        logits[text] = output[0].double().numpy()
    assert len(next(iter(logits.values()))) == config.num_logits == len(SENTIMENT_LABELS) + len(TOPIC_LABELS)
    return logits


@pytest_asyncio.fixture(scope="module")
async def explainer_target(repository: Path) -> AsyncIterator[str]:
    # fp32, so the served probabilities match transformers' to float precision.
    inference, core = await start_inference(InferenceSettings(grpc_port=0, model_repository=repository, variant="fp32"))
    explainer, versions = await start_explainer(
        ExplainerSettings(
            grpc_port=0, model_repository=repository, model_name=MODEL, inference=f"127.0.0.1:{inference.port}"
        )
    )
    try:
        yield f"127.0.0.1:{explainer.port}"
    finally:
        await explainer.stop(0)
        await versions.close()
        await inference.stop(0)
        await core.close()


@pytest_asyncio.fixture(scope="module")
async def explainer(explainer_target: str) -> AsyncIterator[pb_grpc.ExplainerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(explainer_target) as channel:
        yield pb_grpc.ExplainerServiceStub(channel)


def gateway_addresses(explainer_target: str) -> list[str]:
    # The explain routes need the explainer only.
    return ["127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1", explainer_target]


@pytest_asyncio.fixture(scope="module")
async def gateway(explainer_target: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(settings_for_targets(gateway_addresses(explainer_target), model_name=MODEL)):
        yield client


def topic_probabilities(logits: npt.NDArray[np.float64]) -> dict[str, float]:
    return dict(zip(TOPIC_LABELS, expit(logits[3:7] / TOPIC_TEMPERATURE).tolist(), strict=True))


def sentiment_probabilities(logits: npt.NDArray[np.float64], temperature: float) -> dict[str, float]:
    return dict(zip(SENTIMENT_LABELS, softmax(logits[:3] / temperature).tolist(), strict=True))


def assert_close(got: Any, expected: dict[str, float], tolerance: float) -> None:
    assert set(dict(got)) == set(expected)
    for label, value in expected.items():
        assert dict(got)[label] == pytest.approx(value, abs=tolerance), (label, dict(got), expected)


def assert_words(explanation: pb.Explanation, text: str) -> None:
    (chunk,) = explanation.chunks
    assert [w.text for w in chunk.words] == text.split()
    assert any(abs(w.attribution) > 0 for w in chunk.words)
    merged = [sum(t.attribution for t in chunk.tokens if t.word_index == i) for i in range(len(chunk.words))]
    np.testing.assert_allclose(merged, [w.attribution for w in chunk.words], atol=1e-5)


# --- over the explainer's gRPC API ----------------------------------------------------------


async def test_the_topic_head_is_explained_on_its_own_columns(
    explainer: pb_grpc.ExplainerServiceAsyncStub, reference: dict[str, npt.NDArray[np.float64]]
) -> None:
    reply = await explainer.Explain(
        pb.ExplainRequest(texts=TEXTS, method=pb.METHOD_INTEGRATED_GRADIENTS, steps=64, head=TOPIC), timeout=120
    )
    assert (reply.model_name, reply.head, reply.activation) == (MODEL, TOPIC, "sigmoid")
    for text, explanation in zip(TEXTS, reply.explanations, strict=True):
        expected = topic_probabilities(reference[text])
        # The served model (fp32 graph) and the gradients' weights (torch) both say transformers' figures.
        assert_close(explanation.probabilities, expected, 1e-4)
        assert_close(explanation.gradient_probabilities, expected, 1e-5)
        assert explanation.label == max(expected, key=lambda label: expected[label]) == explanation.target_label
        assert explanation.gradient_label == explanation.label and not explanation.gradients_disagree
        (chunk,) = explanation.chunks
        assert chunk.target_probability == pytest.approx(expected[explanation.label], abs=1e-4)
        assert chunk.gradient_target_probability == pytest.approx(expected[explanation.label], abs=1e-5)
        assert_words(explanation, text)
        # Completeness: the attributions add up to f(input) - f(baseline) of the sigmoid probability.
        assert chunk.completeness_gap < 0.05
        assert len(chunk.faithfulness) == 3


async def test_a_topic_label_is_explained_by_its_own_sigmoid_probability(
    explainer: pb_grpc.ExplainerServiceAsyncStub, reference: dict[str, npt.NDArray[np.float64]]
) -> None:
    text = TEXTS[1]
    expected = topic_probabilities(reference[text])
    least = min(expected, key=lambda label: expected[label])
    reply = await explainer.Explain(
        pb.ExplainRequest(texts=[text], method=pb.METHOD_OCCLUSION, head=TOPIC, target_label=least), timeout=60
    )
    (explanation,) = reply.explanations
    assert explanation.target_label == least and reply.head == TOPIC
    assert_close(explanation.probabilities, expected, 1e-4)
    (chunk,) = explanation.chunks
    assert chunk.target_probability == pytest.approx(expected[least], abs=1e-4)
    assert [w.text for w in chunk.words] == text.split()
    # Occlusion: a word's attribution is the drop of that label's probability without it.
    assert all(-1 <= w.attribution <= 1 for w in chunk.words)


@pytest.mark.parametrize("head", ["", SENTIMENT])
async def test_the_primary_head_is_the_softmax_head(
    explainer: pb_grpc.ExplainerServiceAsyncStub,
    reference: dict[str, npt.NDArray[np.float64]],
    config: ModelConfig,
    head: str,
) -> None:
    reply = await explainer.Explain(
        pb.ExplainRequest(texts=TEXTS, method=pb.METHOD_INTEGRATED_GRADIENTS, steps=32, head=head), timeout=120
    )
    assert (reply.head, reply.activation) == (SENTIMENT, "softmax")
    for text, explanation in zip(TEXTS, reply.explanations, strict=True):
        expected = sentiment_probabilities(reference[text], config.temperature)
        assert_close(explanation.probabilities, expected, 1e-4)
        assert_close(explanation.gradient_probabilities, expected, 1e-5)
        assert sum(explanation.probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert explanation.label == max(expected, key=lambda label: expected[label])
        assert_words(explanation, text)


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (pb.ExplainRequest(texts=[TEXTS[0]], head="mood"), ["'mood'", "'sentiment'", "'topic'"]),
        (pb.ExplainRequest(texts=[TEXTS[0]], head=TOPIC, target_label="positive"), ["'positive'", "'merger'"]),
        (pb.ExplainRequest(texts=[TEXTS[0]], target_label="merger"), ["'merger'", "'negative'"]),
        (pb.ExplainRequest(texts=[TEXTS[0]], head=SENTIMENT, target_label="lawsuit"), ["'lawsuit'", "'neutral'"]),
    ],
    ids=["unknown head", "a sentiment label for topic", "a topic label for the primary", "topic label for sentiment"],
)
async def test_an_unknown_head_or_another_heads_label_is_refused(
    explainer: pb_grpc.ExplainerServiceAsyncStub, request_: pb.ExplainRequest, named: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await explainer.Explain(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for part in named:
        assert part in (caught.value.details() or ""), caught.value.details()


# --- through the gateway: REST and the gRPC Pipeline ------------------------------------------


async def test_rest_explains_a_head_and_refuses_an_unknown_one(
    gateway: httpx.AsyncClient, reference: dict[str, npt.NDArray[np.float64]]
) -> None:
    text = TEXTS[0]
    reply = await gateway.post("/v1/explain", json={"text": text, "head": TOPIC, "steps": 32})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["model_name"], body["head"], body["activation"]) == (MODEL, TOPIC, "sigmoid")
    expected = topic_probabilities(reference[text])
    assert_close(body["probabilities"], expected, 1e-4)
    assert_close(body["gradient_probabilities"], expected, 1e-5)
    assert [w["text"] for w in body["chunks"][0]["words"]] == text.split()

    primary = await gateway.post("/v1/explain", json={"text": text, "method": "occlusion"})
    assert primary.status_code == 200, primary.text
    assert (primary.json()["head"], primary.json()["activation"]) == (SENTIMENT, "softmax")
    assert set(primary.json()["probabilities"]) == set(SENTIMENT_LABELS)

    unknown = await gateway.post("/v1/explain", json={"text": text, "head": "mood"})
    assert unknown.status_code == 422 and unknown.headers["content-type"] == "application/problem+json"
    assert "'sentiment'" in unknown.json()["detail"] and "'topic'" in unknown.json()["detail"]

    other = await gateway.post("/v1/explain", json={"text": text, "head": TOPIC, "target_label": "negative"})
    assert other.status_code == 400 and other.headers["content-type"] == "application/problem+json"
    assert "'negative'" in other.json()["detail"] and "'earnings'" in other.json()["detail"]


async def test_the_grpc_pipeline_explains_a_head_and_refuses_an_unknown_one(
    gateway: httpx.AsyncClient, reference: dict[str, npt.NDArray[np.float64]]
) -> None:
    text = TEXTS[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.headers['x-test-grpc-port']}") as channel:
        stub = pipeline_grpc.PipelineStub(channel)
        reply = await stub.Explain(
            pb.ExplainRequest(texts=[text], method=pb.METHOD_OCCLUSION, head=TOPIC, model_name=MODEL), timeout=60
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Explain(pb.ExplainRequest(texts=[text], head="mood"), timeout=30)
    assert reply.head == TOPIC and reply.activation == "sigmoid"
    assert_close(reply.explanations[0].probabilities, topic_probabilities(reference[text]), 1e-4)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "heads are ['sentiment', 'topic']" in (caught.value.details() or "")


# --- an inference service that answers each head under its own outputs -----------------------


class PerHeadOutputs:
    """A stand-in for the inference service's ModelInfer where `logits` holds the primary
    head's columns only and a further head's come as `<head>_logits`."""

    def __init__(self, logits: npt.NDArray[np.float32], config: ModelConfig) -> None:
        self.logits = logits
        self.heads = {head.output_name("logits"): head for head in config.heads}
        self.asked: list[str] = []

    async def ModelInfer(self, request: infer_pb.ModelInferRequest, timeout: float) -> infer_pb.ModelInferResponse:
        (name,) = [output.name for output in request.outputs]
        self.asked.append(name)
        head = self.heads[name]
        rows = np.tile(self.logits[head.start : head.stop], (int(request.inputs[0].shape[0]), 1))
        return infer_pb.ModelInferResponse(
            outputs=[infer_pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=list(rows.shape))],
            raw_output_contents=[oip.encode_raw(rows.astype(np.float32), "FP32")],
        )


async def test_a_further_heads_columns_come_from_its_own_output_where_logits_holds_the_primarys(
    config: ModelConfig,
) -> None:
    logits = np.array([2.0, -1.0, 0.5, 1.5, -3.0, 0.0, 4.5], dtype=np.float32)
    service = PerHeadOutputs(logits, config)
    scorer = OipProbabilities(cast("infer_grpc.GRPCInferenceServiceAsyncStub", service), MODEL, "1", config.num_logits)
    topic, sentiment = config.head_named(TOPIC), config.head_named("")
    for _ in range(2):
        probabilities = await scorer.probabilities([[2, 5, 3], [2, 3]], 5.0, topic)
        np.testing.assert_allclose(probabilities, np.tile(expit(logits[3:7] / TOPIC_TEMPERATURE), (2, 1)), rtol=1e-6)
    primary = await scorer.probabilities([[2, 5, 3]], 5.0, sentiment)
    np.testing.assert_allclose(primary[0], softmax(logits[:3] / config.temperature), rtol=1e-6)
    # Asked once under `logits`, then straight for `topic_logits`.
    assert service.asked == ["logits", "topic_logits", "topic_logits", "logits"]


# --- the explain page ------------------------------------------------------------------------


def models_listing(heads: bool) -> dict[str, Any]:
    """`GET /v1/models` for the two-head model, with `heads` or (an older gateway) without."""
    entry: dict[str, Any] = {
        "name": MODEL,
        "versions": ["1"],
        "serving_version": "1",
        "labels": SENTIMENT_LABELS,
        "activation": "softmax",
        "languages": ["en"],
        "scores": {},
    }
    if heads:
        entry["heads"] = [
            {"name": SENTIMENT, "labels": SENTIMENT_LABELS, "activation": "softmax"},
            {"name": TOPIC, "labels": TOPIC_LABELS, "activation": "sigmoid"},
        ]
    return {"default_model": MODEL, "models": [entry]}


@pytest.mark.parametrize("heads", [True, False], ids=["models list heads", "models list no heads"])
async def test_the_explain_page_offers_the_models_heads(
    explainer_target: str, reference: dict[str, npt.NDArray[np.float64]], heads: bool
) -> None:
    """The head selector is filled from `GET /v1/models` (answered here by the browser, so
    the page is tested whatever the gateway's listing holds) and explains the head chosen;
    a listing without `heads` leaves one head and no selector."""
    require_chromium()  # skips without chromium (fails in CI), as `needs_chromium` does
    text = TEXTS[0]
    app = create_app(settings_for_targets(gateway_addresses(explainer_target), model_name=MODEL))
    async with serving(app) as url, chromium() as browser:
        page = await browser.new_page()

        async def listing(route: Route) -> None:
            await route.fulfill(json=models_listing(heads))

        await page.route("**/v1/models", listing)
        await page.goto(f"{url}/explain")
        await page.fill("#input", text)
        if heads:
            await page.wait_for_selector("#head:not([hidden]) option[value=topic]", state="attached")
            assert await page.eval_on_selector_all("#head option", "os => os.map(o => o.value)") == [SENTIMENT, TOPIC]
            await page.select_option("#head", TOPIC)
        else:
            await page.wait_for_load_state("networkidle")
            assert await page.get_attribute("#head", "hidden") is not None
        await page.click("button[type=submit]")
        await page.wait_for_selector("#text span.word", timeout=30_000)
        label = await page.inner_text("#label")
        shown = await page.inner_text("#probabilities")
    expected = topic_probabilities(reference[text]) if heads else None
    if expected is not None:
        top = max(expected, key=lambda name: expected[name])
        assert label == f"{top} (explaining {top} of {TOPIC})"
        assert all(name in shown for name in TOPIC_LABELS) and "negative" not in shown
    else:
        assert label.split(" ")[0] in SENTIMENT_LABELS and all(name in shown for name in SENTIMENT_LABELS)
