"""Several models over Kafka: the scoring stage, configured from its environment as
`python -m workers.sentiment_monitor` is (`INFERMESH_WORKER_MODELS`,
`INFERMESH_WORKER_TOPIC_MODEL`, `INFERMESH_WORKER_TOPIC_HEAD`), against the real services on
loopback and the embedded broker. The repository holds the built default model and a tiny
topic classifier (random weights, its own tokenizer) imported like any user checkpoint,
whose one head is therefore `label`.

Every English item is scored by the default model and classified by the tiny one, whose
probabilities in the scored record are transformers' own for that text, and whose top
label is the item's topic; Japanese news (no model routed) is dead-lettered. And a worker
told to apply a model the repository lacks refuses to start, naming it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kafka import KafkaProducer

from shared.kafka import read_to_end
from shared.messages import DLQ_TOPIC, NEWS_TOPIC, SENTIMENT_TOPIC, TOPIC_SENTIMENT_TOPIC, ScoredItem
from shared.pipeline import PipelineTargets
from tests.conftest import MODEL, link_version
from tests.mesh import running_mesh
from tests.test_import import import_cli, transformers_probabilities
from tests.tiny_checkpoints import FAMILIES, build_checkpoint
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.consumer import UNSUPPORTED_LANGUAGE_REASON
from workers.sentiment_monitor.scoring import BlockingPipeline, check_score_mapping
from workers.sentiment_monitor.settings import MonitorSettings

TOPIC_MODEL = "finance-topic"
TOPICS = ["earnings", "macro", "legal"]
ENGLISH = {
    "acme-warning": "Acme shares plunge after profit warning",
    "acme-dividend": "Acme beats estimates and raises its dividend",
    "bank-jobs": "Bank of Nowhere cuts 500 jobs as margins shrink",
    "central-bank": "The central bank holds rates steady, bonds rally",
    "revenue": "Quarterly revenue rose 12% to $4.1bn, ahead of forecasts",
    "fine": "Regulators fine the lender over money-laundering failures",
}
JAPANESE = {"nikkei": "東京株式市場で日経平均が反落した"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def repository(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[float]]]:
    """The built default model, and a tiny BERT imported as `finance-topic`; with
    transformers' probabilities for each English text (taken before the checkpoint goes)."""
    scratch = tmp_path_factory.mktemp("models-kafka")
    root = scratch / "models"
    link_version(root, built_model, "1")
    family = next(f for f in FAMILIES if f.name == "bert")
    checkpoint = build_checkpoint(family, scratch / "topic-checkpoint", labels=TOPICS, seed=7)
    code, output = import_cli(str(checkpoint), "--model", TOPIC_MODEL, "--repository", str(root))
    assert code == 0, output
    config = json.loads((root / TOPIC_MODEL / "1" / "config.json").read_text())
    assert config.get("head", "label") == "label" and config["labels"] == TOPICS
    texts = list(ENGLISH.values())
    probabilities, _ = transformers_probabilities(checkpoint, texts, temperature=float(config.get("temperature", 1.0)))
    shutil.rmtree(checkpoint)
    return root, {text: row.tolist() for text, row in zip(texts, probabilities, strict=True)}


@pytest_asyncio.fixture(scope="module")
async def mesh(repository: tuple[Path, dict[str, list[float]]]) -> AsyncIterator[PipelineTargets]:
    async with running_mesh(repository[0], variant="fp32") as targets:
        yield targets


def worker_environment(mesh: PipelineTargets, **extra: str) -> dict[str, str]:
    """The worker's settings as its Deployment would set them."""
    names = {"TOKENIZER": mesh.tokenizer, "INFERENCE": mesh.inference, "POSTPROCESSOR": mesh.postprocessor} | extra
    return {f"INFERMESH_WORKER_{name}": value for name, value in names.items()}


async def test_the_worker_applies_the_default_and_an_imported_model_with_the_topic_from_it(
    kafka_config: dict[str, Any],
    mesh: PipelineTargets,
    repository: tuple[Path, dict[str, list[float]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = repository[1]
    environment = worker_environment(
        mesh, MODELS=json.dumps([TOPIC_MODEL]), TOPIC_MODEL=TOPIC_MODEL, TOPIC_HEAD="label", MAX_BATCH="4"
    )
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = MonitorSettings()
    assert settings.model_name == MODEL and settings.applied_models() == [TOPIC_MODEL]
    items = ENGLISH | JAPANESE
    producer = KafkaProducer(**kafka_config, acks="all")
    for item_id, headline in items.items():
        news = {"id": item_id, "published_at": "2026-11-24T09:00:00Z", "source": "test", "headline": headline}
        producer.send(NEWS_TOPIC, key=item_id.encode(), value=json.dumps(news, ensure_ascii=False).encode())
    producer.flush()
    producer.close()

    # As __main__.py builds it.
    pipeline = await asyncio.to_thread(
        BlockingPipeline,
        PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor),
        settings.model_name,
        settings.language_routing(),
    )
    scorer = scoring_stage(kafka_config, pipeline, settings)
    consumer = scorer.consumer
    seen = scored = 0
    try:
        refusal = await asyncio.to_thread(
            check_score_mapping,
            pipeline,
            settings.model_name,
            models=settings.models,
            topic_model=settings.topic_model,
            topic_head=settings.topic_head,
        )
        assert refusal is None
        for _ in range(60):
            outcome = await asyncio.to_thread(scorer.run_once, 500)
            seen, scored = seen + outcome.records, scored + outcome.scored
            if seen >= len(items):
                break
    finally:
        consumer.close(autocommit=False)
        scorer.producer.close()
        await asyncio.to_thread(pipeline.close)
    assert (seen, scored) == (len(items), len(ENGLISH))

    records = [
        ScoredItem.model_validate_json(r.value)
        for r in await asyncio.to_thread(read_to_end, kafka_config, SENTIMENT_TOPIC, [0, 1])
    ]
    dead = await asyncio.to_thread(read_to_end, kafka_config, DLQ_TOPIC, [0])
    by_item = {record.item_id: record for record in records}
    dead_ids = {json.loads(r.value)["id"] for r in dead}
    assert set(by_item) | dead_ids == set(items) and not set(by_item) & dead_ids
    assert set(by_item) == set(ENGLISH) and dead_ids == set(JAPANESE)
    assert all(dict(r.headers)["error-type"] == UNSUPPORTED_LANGUAGE_REASON.encode() for r in dead)

    for item_id, record in by_item.items():
        text = ENGLISH[item_id]
        assert (record.model_name, record.model_version) == (MODEL, "1") and -1.0 <= record.score <= 1.0
        assert set(record.classifications) == {TOPIC_MODEL}
        tiny = record.classifications[TOPIC_MODEL]
        assert (tiny.model_version, tiny.status) == ("1", "ok"), tiny
        assert list(tiny.probabilities) == TOPICS
        assert [tiny.probabilities[label] for label in TOPICS] == pytest.approx(expected[text], abs=TOLERANCE), text
        assert tiny.label == TOPICS[max(range(len(TOPICS)), key=lambda i: expected[text][i])]
        assert tiny.heads["label"].probabilities == tiny.probabilities
        # The topic is the tiny model's, not the default model's own topic head.
        assert (record.topic, record.topic_probabilities) == (tiny.label, tiny.probabilities)
    by_topic = await asyncio.to_thread(read_to_end, kafka_config, TOPIC_SENTIMENT_TOPIC, [0, 1])
    assert sorted((r.key.decode(), ScoredItem.model_validate_json(r.value).item_id) for r in by_topic) == sorted(
        (record.topic or "", item_id) for item_id, record in by_item.items()
    )


async def test_the_worker_refuses_to_start_with_a_model_the_repository_lacks(
    kafka_config: dict[str, Any], mesh: PipelineTargets
) -> None:
    environment = os.environ | worker_environment(
        mesh, MODELS=json.dumps(["finance-esg"]), METRICS_ENABLED="false", STAGES=json.dumps(["score"])
    )
    environment["KAFKA_BOOTSTRAP_SERVERS"] = ",".join(kafka_config["bootstrap_servers"])
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.sentiment_monitor",
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(worker.communicate(), 60)
    assert worker.returncode == 1, output.decode()
    (line,) = [line for line in output.decode().splitlines() if "cannot score" in line]
    assert f"listed model 'finance-esg' is not in the model repository; models: {MODEL}, {TOPIC_MODEL}" in line


async def test_a_topic_model_without_the_topic_head_is_refused_naming_its_heads(mesh: PipelineTargets) -> None:
    pipeline = await asyncio.to_thread(BlockingPipeline, mesh, MODEL)
    try:
        refusal = await asyncio.to_thread(check_score_mapping, pipeline, MODEL, topic_model=TOPIC_MODEL)
        assert refusal is not None and f"topic model {TOPIC_MODEL!r}" in refusal and "its heads: label" in refusal
        refusal = await asyncio.to_thread(check_score_mapping, pipeline, MODEL, topic_model="finance-topics")
        assert refusal is not None and "topic model 'finance-topics' is not in the model repository" in refusal
        assert MODEL in refusal and TOPIC_MODEL in refusal
    finally:
        await asyncio.to_thread(pipeline.close)
