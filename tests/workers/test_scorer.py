"""The scoring stage against the real embedded broker and the real services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from opentelemetry import trace

from shared.errors import Unavailable
from shared.grpc_server import RunningServer
from shared.kafka_tracing import extract_context, inject_headers
from shared.messages import DLQ_TOPIC, NEWS_TOPIC, SENTIMENT_TOPIC, ScoredItem
from shared.pipeline import ClassifyResult, PipelineTargets
from tests.conftest import SPANS
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.consumer import NewsScorer
from workers.sentiment_monitor.scoring import BlockingPipeline
from workers.sentiment_monitor.settings import MonitorSettings

GROUP = "test-scorer"


def news(item_id: str, headline: str, **extra: Any) -> bytes:
    return json.dumps(
        {"id": item_id, "published_at": "2026-11-24T09:00:00Z", "source": "test", "headline": headline, **extra}
    ).encode()


@pytest.fixture
def pipeline(
    tokenizer_server: RunningServer, inference_server: RunningServer, postprocessor_server: RunningServer
) -> Iterator[BlockingPipeline]:
    targets = PipelineTargets(
        *(f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server))
    )
    blocking = BlockingPipeline(targets, "finance-sentiment")
    yield blocking
    blocking.close()


def make_scorer(kafka_config: dict[str, Any], scorer: Any, **settings: Any) -> NewsScorer:
    return scoring_stage(kafka_config, scorer, MonitorSettings(**settings), group=GROUP, sleep=lambda _: None)


def produce(kafka_config: dict[str, Any], values: Sequence[bytes | None]) -> None:
    producer = KafkaProducer(**kafka_config, acks="all")
    for index, value in enumerate(values):
        producer.send(NEWS_TOPIC, key=str(index).encode(), value=value)
    producer.flush()
    producer.close()


def read_all(kafka_config: dict[str, Any], topic: str, expected: int, timeout_ms: int = 20_000) -> list[Any]:
    consumer = KafkaConsumer(topic, **kafka_config, auto_offset_reset="earliest", consumer_timeout_ms=timeout_ms)
    records = []
    for record in consumer:
        records.append(record)
        if len(records) >= expected:
            break
    consumer.close()
    return records


async def drain(scorer: NewsScorer, expected_records: int, rounds: int = 60) -> int:
    seen = 0
    for _ in range(rounds):
        outcome = await asyncio.to_thread(scorer.run_once, 500)
        seen += outcome.records
        if seen >= expected_records:
            break
    return seen


async def test_every_item_is_scored_once_per_ticker_and_offsets_are_committed(
    kafka_config: dict[str, Any], pipeline: BlockingPipeline
) -> None:
    values = [
        news(f"n{i}", f"$AAPL shares {'plunge after profit warning' if i % 2 else 'soar on record profit'}")
        for i in range(30)
    ]
    values.append(news("multi", "Tesla and Nvidia shares tumble as chip export rules tighten", tickers=["AMD"]))
    values.append(news("n0", "$AAPL shares soar on record profit"))  # a duplicate id from the producer
    produce(kafka_config, values)
    scorer = make_scorer(kafka_config, pipeline, max_batch=8)
    try:
        assert await drain(scorer, len(values)) == len(values)
        committed = {p: scorer.consumer.committed(TopicPartition(NEWS_TOPIC, p)) for p in (0, 1)}
    finally:
        scorer.consumer.close(autocommit=False)
        scorer.producer.close()
    assert sum(offset or 0 for offset in committed.values()) == len(values)

    records = read_all(kafka_config, SENTIMENT_TOPIC, expected=30 + 3 + 1)
    scored = {item.id: item for item in (ScoredItem.model_validate_json(r.value) for r in records)}
    assert len(scored) == 30 + 3  # duplicates dropped by id; "multi" is about three tickers
    assert {scored[f"multi:{t}"].ticker for t in ("AMD", "NVDA", "TSLA")} == {"AMD", "NVDA", "TSLA"}
    assert scored["n1:AAPL"].label == "negative" and scored["n2:AAPL"].label == "positive"
    assert all(r.key == ScoredItem.model_validate_json(r.value).ticker.encode() for r in records)  # type: ignore[union-attr]


@pytest.mark.parametrize("max_batch", [1, 16])
async def test_poison_goes_to_the_dead_letter_topic_with_its_reason_and_good_items_flow(
    kafka_config: dict[str, Any], pipeline: BlockingPipeline, max_batch: int
) -> None:
    poison = {
        "invalid-utf8": b'{"id": "\xff"}',
        "not-json": b"breaking: markets up",
        "schema": json.dumps({"id": "x", "source": "s", "headline": "no timestamp"}).encode(),
        "too-large": news("big", "A" * 1000, body="word " * 300),
        "rejected": news("blank-after-strip", "\u200b"),
    }
    values: list[bytes | None] = [
        news("ok1", "$MSFT beats estimates"),
        *poison.values(),
        news("ok2", "$MSFT misses estimates"),
    ]
    produce(kafka_config, values)
    scorer = make_scorer(kafka_config, pipeline, max_record_bytes=1500, max_batch=max_batch)
    try:
        assert await drain(scorer, len(values)) == len(values)
    finally:
        scorer.consumer.close(autocommit=False)
        scorer.producer.close()
    dead = read_all(kafka_config, DLQ_TOPIC, expected=len(poison))
    by_reason = {dict(r.headers)["error-type"].decode(): r for r in dead}
    assert set(by_reason) == set(poison)
    for reason, record in by_reason.items():
        headers = dict(record.headers)
        assert record.value == poison[reason]  # the original bytes, untouched
        assert headers["source-topic"] == NEWS_TOPIC.encode() and headers["error-detail"]
        assert int(headers["source-offset"]) >= 0
    good = read_all(kafka_config, SENTIMENT_TOPIC, expected=2)
    assert sorted(ScoredItem.model_validate_json(r.value).item_id for r in good) == ["ok1", "ok2"]


class FlakyScorer:
    """The real pipeline behind a fault: the first calls fail as if the mesh were down."""

    def __init__(self, real: BlockingPipeline, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    def classify(self, texts: Sequence[str], timeout_seconds: float) -> ClassifyResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("inference service unreachable")
        return self.real.classify(texts, timeout_seconds)

    def submit(self, texts: Sequence[str], timeout_seconds: float) -> Future[ClassifyResult]:
        future: Future[ClassifyResult] = Future()
        try:
            future.set_result(self.classify(texts, timeout_seconds))
        except Unavailable as error:
            future.set_exception(error)
        return future


async def test_transient_failures_are_retried_not_dead_lettered(
    kafka_config: dict[str, Any], pipeline: BlockingPipeline
) -> None:
    produce(kafka_config, [news(f"t{i}", "$KO raises dividend") for i in range(5)])
    flaky = FlakyScorer(pipeline, failures=3)
    scorer = make_scorer(kafka_config, flaky)
    try:
        assert await drain(scorer, 5) == 5
    finally:
        scorer.consumer.close(autocommit=False)
        scorer.producer.close()
    assert flaky.calls > 3
    assert len(read_all(kafka_config, SENTIMENT_TOPIC, expected=5)) == 5
    assert read_all(kafka_config, DLQ_TOPIC, expected=1, timeout_ms=2000) == []


async def test_a_message_trace_continues_through_the_worker_into_the_services_and_its_outputs(
    kafka_config: dict[str, Any], pipeline: BlockingPipeline
) -> None:
    tracer = trace.get_tracer("test-producer")
    producer = KafkaProducer(**kafka_config, acks="all")
    with tracer.start_as_current_span("publish headline", kind=trace.SpanKind.PRODUCER) as span:
        producer_context = span.get_span_context()
        producer.send(NEWS_TOPIC, value=news("traced", "$AAPL shares plunge"), headers=inject_headers())
    producer.send(NEWS_TOPIC, value=news("untraced", "$AAPL shares soar"))
    producer.flush()
    producer.close()
    SPANS.clear()
    scorer = make_scorer(kafka_config, pipeline)
    try:
        assert await drain(scorer, 2) == 2
    finally:
        scorer.consumer.close(autocommit=False)
        scorer.producer.close()

    outputs = {ScoredItem.model_validate_json(r.value).item_id: r for r in read_all(kafka_config, SENTIMENT_TOPIC, 2)}
    carried = trace.get_current_span(extract_context(outputs["traced"].headers)).get_span_context()
    assert carried.trace_id == producer_context.trace_id
    spans = SPANS.get_finished_spans()
    item_span = next(
        s for s in spans if s.name == "score news item" and (s.attributes or {}).get("infermesh.item_id") == "traced"
    )
    assert item_span.parent is not None and item_span.parent.span_id == producer_context.span_id
    assert item_span.context is not None and carried.span_id == item_span.context.span_id
    # The shared scoring call continues the (first) traced message's trace into the services.
    batch_span = next(s for s in spans if s.name == "score news batch")
    assert batch_span.parent is not None and batch_span.parent.span_id == producer_context.span_id
    in_trace = {s.name for s in spans if s.context is not None and s.context.trace_id == producer_context.trace_id}
    assert {
        "classify round",
        "/infermesh.tokenizer.v1.TokenizerService/Tokenize",
        "/inference.GRPCInferenceService/ModelInfer",
        "model execute",
        "/infermesh.postprocess.v1.PostprocessService/Postprocess",
    } <= in_trace
    # The batch span lasts until its outputs are committed, so it covers its scoring round.
    scoring_round = next(s for s in spans if s.name == "classify round" and s.parent == batch_span.context)
    assert batch_span.end_time is not None and scoring_round.end_time is not None
    assert batch_span.end_time >= scoring_round.end_time
