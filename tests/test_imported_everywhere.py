"""Imported tiny checkpoints of every tokenizer family, served everywhere (issue 17 item 4).

One repository holds five imports of tiny random checkpoints built here (no hub,
tests/tiny_checkpoints.py): a BERT (WordPiece), a RoBERTa (byte-level BPE), an XLM-R-like
model (SentencePiece-style Unigram) read CJK and mixed text, a multi-label (sigmoid)
RoBERTa and a two-head XLM-R-like version (softmax `sentiment`, sigmoid `topic`). The
real tokenizer, inference (fp32), post-processor and explainer run once on loopback with
the gateway in front. For each model, every head's calibrated probabilities
(activation(logits / T)) from REST `/v1/classify`, the gRPC Pipeline, a stock
tritonclient, `/v1/explain` and the sentiment worker's scored records on Kafka equal
transformers' own on the same checkpoint, and explain's word attributions slice back to
the text's words whatever the tokenizer family.

tests/test_import.py covers each family's ONNX graph and tokenizer offsets in-process;
tests/test_heads.py and tests/test_explain_heads.py the two-head BERT version's faces.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch
from kafka import KafkaConsumer, KafkaProducer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.calibration import sigmoid, softmax
from shared.messages import NEWS_TOPIC, SENTIMENT_TOPIC, ScoredItem
from shared.model_repository import Head, ModelRepository
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from shared.pipeline import PipelineTargets
from tests.gateway.conftest import client_for, settings_for_targets
from tests.test_import import import_cli
from tests.tiny_checkpoints import FAMILIES, build_checkpoint, two_head_version
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.scoring import BlockingPipeline, check_score_mapping
from workers.sentiment_monitor.settings import MonitorSettings

#: ONNX fp32 against transformers, calibrated probabilities, float32 on the wire.
TOLERANCE = 1e-4

ENGLISH = [
    "Acme shares plunge after profit warning",
    "Revenue rose 12% to $4.1bn; the dividend is raised.",
    "Regulators fine Globex",
]
#: Japanese, Chinese (a full-width comma, which NFKC rewrites), and mixed scripts.
CJK_AND_MIXED = [
    "東京株式市場で日経平均が反落した",
    "央行宣布降息，股市上涨",
    "Acme の株式市場が反落した",
    "中国の銀行 cuts 500 jobs",
]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
EVENT_LABELS = ["earnings", "merger", "layoffs", "dividend"]
EVENT_SCORES = {"earnings": 1.0, "layoffs": -1.0}


@dataclass(frozen=True)
class Case:
    model: str
    family: str
    """The tests/tiny_checkpoints.py family the checkpoint is built from."""
    kind: str
    """softmax, multi-label or two-head."""
    texts: list[str]
    languages: str = "en"


CASES = [
    Case("bert", "bert", "softmax", ENGLISH),
    Case("roberta", "roberta", "softmax", ENGLISH),
    Case("xlmr", "xlm-roberta", "softmax", [ENGLISH[0], *CJK_AND_MIXED], languages="en,ja,zh"),
    Case("events", "roberta", "multi-label", ENGLISH),
    Case("multi", "xlm-roberta", "two-head", ENGLISH),
]
IDS = [f"{c.model}-{c.family}-{c.kind}" for c in CASES]


def _logits(checkpoint: Path, texts: list[str]) -> npt.NDArray[np.float64]:
    """transformers' own logits: its tokenizer (padding the batch), its model."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return np.asarray(logits.double().numpy(), dtype=np.float64)


def _labelled_data(checkpoint: Path, case: Case, folder: Path) -> Path:
    """A labelled check CSV, so import fits a temperature (T != 1 is what is compared): the
    model's own top label on two rows in three, another on the third (multi-label: two
    label sets)."""
    texts = [f"{text} {index}" for index, text in enumerate(case.texts * 6)]
    top = _logits(checkpoint, texts).argmax(axis=1)
    path = folder / f"{case.model}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for index, (text, label) in enumerate(zip(texts, top, strict=True)):
            if case.kind == "multi-label":
                writer.writerow([text, "earnings|dividend" if index % 3 else "merger"])
            else:
                writer.writerow([text, SENTIMENT_LABELS[(int(label) + (index % 3 == 0)) % 3]])
    return path


@dataclass(frozen=True)
class Imported:
    case: Case
    checkpoint: Path
    heads: list[Head]
    expected: dict[str, dict[str, list[float]]]
    """Text -> head name -> transformers' calibrated probabilities in the head's label order."""

    def head(self, name: str = "") -> Head:
        return next(h for h in self.heads if h.name == name or (not name and h.primary))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imported-everywhere")


@pytest.fixture(scope="module")
def imported(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Imported]:
    """Every case's checkpoint built and imported into one repository, with transformers'
    probabilities per head for its texts."""
    scratch = tmp_path_factory.mktemp("imported-everywhere-scratch")
    families = {f.name: f for f in FAMILIES}
    out = {}
    for case in CASES:
        if case.kind == "two-head":
            two_head_version(repository, case.model, scratch, family_name=case.family)
            checkpoint = scratch / f"{case.model}-checkpoint"
        else:
            multi = case.kind == "multi-label"
            checkpoint = build_checkpoint(
                families[case.family],
                scratch / case.model,
                labels=EVENT_LABELS if multi else SENTIMENT_LABELS,
                problem_type="multi_label_classification" if multi else None,
            )
            data = _labelled_data(checkpoint, case, scratch)
            code, output = import_cli(
                str(checkpoint),
                "--model",
                case.model,
                "--repository",
                str(repository),
                "--data",
                str(data),
                "--languages",
                case.languages,
            )
            assert code == 0, output
        config = ModelRepository(repository).config(case.model)
        heads = config.heads
        if case.kind != "two-head":
            assert config.temperature != 1.0, "a fitted temperature, so logits / T is what is compared"
        assert [h.activation for h in heads] == {
            "softmax": ["softmax"],
            "multi-label": ["sigmoid"],
            "two-head": ["softmax", "sigmoid"],
        }[case.kind]
        logits = _logits(checkpoint, case.texts)
        assert logits.shape == (len(case.texts), config.num_logits)
        expected: dict[str, dict[str, list[float]]] = {text: {} for text in case.texts}
        for head in heads:
            activate = softmax if head.activation == "softmax" else sigmoid
            probabilities = activate(logits[:, head.start : head.stop], head.temperature)
            for text, row in zip(case.texts, probabilities, strict=True):
                expected[text][head.name] = row.tolist()
        out[case.model] = Imported(case, checkpoint, heads, expected)
    return out


@pytest_asyncio.fixture(scope="module")
async def targets(repository: Path, imported: dict[str, Imported]) -> AsyncIterator[tuple[PipelineTargets, str]]:
    """The real services on loopback over the one repository (fp32: the numbers are
    compared with transformers'); returns the pipeline's targets and the explainer's."""
    tokenizer = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=repository, model_name="bert"))
    inference, core = await start_inference(InferenceSettings(grpc_port=0, model_repository=repository, variant="fp32"))
    postprocessor = await start_postprocessor(
        PostprocessorSettings(
            grpc_port=0, model_repository=repository, model_name="bert", scores={"events": EVENT_SCORES}
        )
    )
    explainer, versions = await start_explainer(
        ExplainerSettings(
            grpc_port=0,
            model_repository=repository,
            model_name="bert",
            inference=f"127.0.0.1:{inference.port}",
            max_loaded_versions=len(CASES),
        )
    )
    try:
        yield (
            PipelineTargets(
                tokenizer=f"127.0.0.1:{tokenizer.port}",
                inference=f"127.0.0.1:{inference.port}",
                postprocessor=f"127.0.0.1:{postprocessor.port}",
            ),
            f"127.0.0.1:{explainer.port}",
        )
    finally:
        await explainer.stop(0)
        await versions.close()
        for server in (tokenizer, inference, postprocessor):
            await server.stop(0)
        await core.close()


@pytest_asyncio.fixture(scope="module")
async def gateway(targets: tuple[PipelineTargets, str]) -> AsyncIterator[httpx.AsyncClient]:
    pipeline, explainer = targets
    addresses = [pipeline.tokenizer, pipeline.inference, pipeline.postprocessor, explainer]
    async for client in client_for(settings_for_targets(addresses, model_name="bert")):
        yield client


def assert_heads(imported: Imported, text: str, heads: dict[str, dict[str, float]]) -> None:
    """Every head's probabilities, by label, equal transformers' for `text`."""
    assert list(heads) == [h.name for h in imported.heads]
    for head in imported.heads:
        got = heads[head.name]
        assert set(got) == set(head.labels), (head.name, got)
        np.testing.assert_allclose(
            [got[label] for label in head.labels],
            imported.expected[text][head.name],
            atol=TOLERANCE,
            err_msg=f"{imported.case.model} head {head.name!r}: {text!r}",
        )


# --- REST /v1/classify and the gRPC Pipeline ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_rest_classify_gives_transformers_probabilities(
    case: Case, gateway: httpx.AsyncClient, imported: dict[str, Imported]
) -> None:
    model = imported[case.model]
    response = await gateway.post("/v1/classify", json={"model": case.model, "texts": case.texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == case.model
    for text, result in zip(case.texts, body["results"], strict=True):
        assert result["status"] == "ok", (text, result)
        assert result["model_name"] == case.model
        assert_heads(model, text, {name: head["probabilities"] for name, head in result["heads"].items()})
        # The top-level answer is the primary head's.
        assert result["probabilities"] == result["heads"][model.head().name]["probabilities"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_grpc_pipeline_gives_transformers_probabilities(
    case: Case, gateway: httpx.AsyncClient, imported: dict[str, Imported]
) -> None:
    model = imported[case.model]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.headers['x-test-grpc-port']}") as channel:
        reply = await pipeline_grpc.PipelineStub(channel).Classify(
            pipeline_pb.ClassifyRequest(texts=case.texts, model_name=case.model), timeout=60
        )
    for text, result in zip(case.texts, reply.results, strict=True):
        assert result.status == pipeline_pb.RESULT_STATUS_OK, (text, result)
        assert_heads(model, text, {head.name: dict(head.probabilities) for head in result.heads})
        assert dict(result.probabilities) == dict(result.heads[0].probabilities)


# --- a stock tritonclient, in its own process ----------------------------------------------------

#: tritonclient registers the `inference.*` protobuf symbols too, so it cannot share a
#: process with our generated code (tests/services/triton_client_check.py).
TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tokenizers import Tokenizer

url, spec = sys.argv[1], json.loads(sys.argv[2])
client = triton.InferenceServerClient(url=url)
seen = {}
for model, (tokenizer_path, texts, outputs) in spec.items():
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
    result = client.infer(model, inputs, outputs=[triton.InferRequestedOutput(n) for n in outputs])
    seen[model] = {
        "ready": client.is_model_ready(model),
        "outputs": {n: result.as_numpy(n).tolist() for n in outputs},
    }
print(json.dumps(seen))
"""


@pytest_asyncio.fixture(scope="module")
async def triton_seen(
    targets: tuple[PipelineTargets, str], repository: Path, imported: dict[str, Imported]
) -> dict[str, Any]:
    """What a stock tritonclient got for every model: each head's `probabilities` output."""
    spec = {
        case.model: [
            str(repository / case.model / "1" / "tokenizer.json"),
            case.texts,
            [h.output_name("probabilities") for h in imported[case.model].heads],
        ]
        for case in CASES
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TRITON_SCRIPT,
        targets[0].inference,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    return dict(json.loads(stdout))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_stock_triton_client_gets_transformers_probabilities(
    case: Case, triton_seen: dict[str, Any], imported: dict[str, Imported]
) -> None:
    model = imported[case.model]
    seen = triton_seen[case.model]
    assert seen["ready"]
    assert list(seen["outputs"]) == [h.output_name("probabilities") for h in model.heads]
    for head in model.heads:
        rows = seen["outputs"][head.output_name("probabilities")]
        for text, row in zip(case.texts, rows, strict=True):
            np.testing.assert_allclose(
                row, model.expected[text][head.name], atol=TOLERANCE, err_msg=f"{head.name}: {text}"
            )


# --- /v1/explain: the served and the gradients' probabilities, and words that slice back ----------


def assert_words_slice_back(text: str, chunk: dict[str, Any]) -> None:
    """The explanation's words are the text's words, or pieces of them (a pre-tokenizer
    splits "12%" in two, CJK characters apart): each one's offsets slice the text to it,
    with no space (no leading "Ġ"/"▁" space for BPE or SentencePiece), in order, together
    covering every visible character, none crossing a space."""
    words = chunk["words"]
    assert words, text
    for word in words:
        piece = text[word["start"] : word["end"]]
        assert piece == word["text"] and piece and not any(c.isspace() for c in piece), (text, word)
    spans = [(w["start"], w["end"]) for w in words]
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), spans
    covered = {i for start, end in spans for i in range(start, end)}
    assert covered == {i for i, c in enumerate(text) if not c.isspace()}, (text, spans)
    for match in re.finditer(r"\S+", text):
        inside = [(s, e) for s, e in spans if match.start() <= s < match.end()]
        assert inside and inside[0][0] == match.start() and inside[-1][1] == match.end(), (match.group(), spans)
    for token in chunk["tokens"]:
        if token["word_index"] >= 0:
            assert token["text"] == text[token["start"] : token["end"]] == token["text"].strip(), (text, token)
    merged = [sum(t["attribution"] for t in chunk["tokens"] if t["word_index"] == i) for i in range(len(words))]
    np.testing.assert_allclose(merged, [w["attribution"] for w in words], atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_explain_gives_transformers_probabilities_and_words(
    case: Case, gateway: httpx.AsyncClient, imported: dict[str, Imported]
) -> None:
    model = imported[case.model]
    for head in model.heads:
        for text in case.texts:
            request = {"text": text, "model": case.model, "head": head.name, "steps": 8}
            response = await gateway.post("/v1/explain", json=request)
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["model_name"], body["head"], body["activation"]) == (case.model, head.name, head.activation)
            assert body["served_variant"] == "fp32"
            expected = dict(zip(head.labels, model.expected[text][head.name], strict=True))
            for field in ("probabilities", "gradient_probabilities"):
                got = body[field]
                assert set(got) == set(head.labels), (field, got)
                np.testing.assert_allclose(
                    [got[label] for label in head.labels],
                    list(expected.values()),
                    atol=TOLERANCE,
                    err_msg=f"{case.model} {head.name} {field}: {text!r}",
                )
            assert body["label"] == max(expected, key=lambda label: expected[label])
            (chunk,) = body["chunks"]
            assert chunk["target_probability"] == pytest.approx(expected[body["target_label"]], abs=TOLERANCE)
            assert_words_slice_back(text, chunk)


# --- Kafka: the monitor worker pointed at the model by its settings --------------------------------


def _scored_records(kafka_config: dict[str, Any], item_ids: set[str], timeout_s: float = 30.0) -> list[ScoredItem]:
    consumer = KafkaConsumer(SENTIMENT_TOPIC, **kafka_config, auto_offset_reset="earliest", consumer_timeout_ms=2000)
    records: list[ScoredItem] = []
    deadline = time.monotonic() + timeout_s
    try:
        while {r.item_id for r in records} < item_ids and time.monotonic() < deadline:
            records.extend(ScoredItem.model_validate_json(record.value) for record in consumer)
    finally:
        consumer.close()
    return records


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_the_worker_scores_news_with_transformers_probabilities(
    case: Case, kafka_config: dict[str, Any], targets: tuple[PipelineTargets, str], imported: dict[str, Imported]
) -> None:
    model = imported[case.model]
    pipeline_targets = targets[0]
    # What INFERMESH_WORKER_MODEL_NAME=<model> and the service addresses give the worker.
    settings = MonitorSettings(
        model_name=case.model,
        tokenizer=pipeline_targets.tokenizer,
        inference=pipeline_targets.inference,
        postprocessor=pipeline_targets.postprocessor,
        max_batch=16,
    )
    # As workers/sentiment_monitor/__main__.py builds its scoring stage from its settings.
    pipeline = BlockingPipeline(
        PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor),
        settings.model_name,
        settings.language_routing(),
    )
    try:
        assert await asyncio.to_thread(check_score_mapping, pipeline, settings.model_name) is None
        items = {f"{case.model}-{index}": text for index, text in enumerate(case.texts)}
        producer = KafkaProducer(**kafka_config, acks="all")
        for item_id, text in items.items():
            news = {"id": item_id, "published_at": "2026-11-24T09:00:00Z", "source": "test", "headline": text}
            producer.send(NEWS_TOPIC, key=item_id.encode(), value=json.dumps(news).encode())
        producer.flush()
        producer.close()
        scorer = scoring_stage(
            kafka_config, pipeline, settings, group=f"test-imported-{case.model}", sleep=lambda _: None
        )
        try:
            seen = 0
            for _ in range(60):
                seen += (await asyncio.to_thread(scorer.run_once, 500)).records
                if seen >= len(items):
                    break
            assert seen == len(items)
        finally:
            scorer.consumer.close(autocommit=False)
            scorer.producer.close()
    finally:
        await asyncio.to_thread(pipeline.close)

    records = await asyncio.to_thread(_scored_records, kafka_config, set(items))
    by_item = {record.item_id: record for record in records}
    assert set(by_item) == set(items), "every item scored (none dead-lettered)"
    primary = model.head()
    scores = primary.scores or EVENT_SCORES
    for item_id, text in items.items():
        record = by_item[item_id]
        assert (record.model_name, record.model_version) == (case.model, "1")
        np.testing.assert_allclose(
            [record.probabilities[label] for label in primary.labels],
            model.expected[text][primary.name],
            atol=TOLERANCE,
            err_msg=f"{case.model}: {text!r}",
        )
        assert record.score == pytest.approx(
            sum(record.probabilities[label] * weight for label, weight in scores.items()), abs=1e-5
        )
        if case.kind == "two-head":
            topic = model.head(settings.topic_head)
            np.testing.assert_allclose(
                [record.topic_probabilities[label] for label in topic.labels],
                model.expected[text][topic.name],
                atol=TOLERANCE,
                err_msg=f"{case.model} topic: {text!r}",
            )
        else:
            assert record.topic is None and record.topic_probabilities == {}
