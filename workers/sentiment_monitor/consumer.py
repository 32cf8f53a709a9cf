"""The scoring stage: `finance.news.v1` in, `finance.sentiment.v1` (and dead letters) out,
and `finance.sentiment.topics.v1` when the topic model's version has a topic head.

At least once: poll up to `max_batch` records, dead-letter the poison, score the rest
through the mesh (one call per applied model: the scoring model, routed by language, and
each of `MonitorSettings.applied_models()` by name, concurrently), produce one ScoredItem
per (item, ticker), and one per item with a topic keyed by its topic (the topic windows'
repartition), wait for the broker to acknowledge every output, and only then commit the
offsets. Transient failures of the mesh are retried with back-off (only the calls that
failed; the answers already in are kept) and nothing is committed meanwhile; a crash
re-delivers the batch, and the deterministic output ids let consumers drop the duplicates.

A model that rejects a batch (InvalidInput, InputTooLarge) gets each of its texts alone;
an item the scoring model rejects alone is dead-lettered, one another model rejects alone
is recorded as `rejected` in its `classifications` and still scored. A model that stays
unavailable past the retry budget, or fails otherwise (ModelNotReady, ModelLoadFailed,
...), stops the stage with its batch uncommitted, whichever model it is; the log names it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from opentelemetry import trace

from shared.errors import DeadlineExceeded, InfermeshError, InputTooLarge, InvalidInput, Overloaded, Unavailable
from shared.kafka import observe_lag
from shared.kafka_tracing import extract_context, inject_headers
from shared.messages import (
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    TOPIC_SENTIMENT_TOPIC,
    HeadResult,
    ModelClassification,
    NewsItem,
    PoisonRecord,
    ScoredItem,
    decode_news,
)
from shared.metrics import KAFKA_CONSUMED, KAFKA_PRODUCED, WORKER_BATCH_DURATION, WORKER_DEAD_LETTERED, WORKER_RETRIES
from shared.pipeline import Classification, ClassifyResult
from shared.routing import TextStatus
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.scoring import MissingScoreMapping, no_score_message
from workers.sentiment_monitor.settings import MonitorSettings

logger = logging.getLogger(__name__)

TRANSIENT = (Unavailable, Overloaded, DeadlineExceeded)
REJECTIONS = (InvalidInput, InputTooLarge)
Rejection: TypeAlias = InvalidInput | InputTooLarge
"""A call's error that is its texts' fault: never retried."""
_tracer = trace.get_tracer(__name__)

TEST_PAUSE_BEFORE_COMMIT_ENV = "INFERMESH_TEST_PAUSE_BEFORE_COMMIT"
# Test hook, not a feature: set to a path, the first batch whose outputs are acked writes its
# records there and blocks before committing, for tests/faults/test_worker_faults.py to SIGKILL.
_test_pause_before_commit = os.environ.get(TEST_PAUSE_BEFORE_COMMIT_ENV)


class Scorer(Protocol):
    def submit(self, texts: Sequence[str], timeout_seconds: float, model_name: str = "") -> Future[ClassifyResult]:
        """Starts scoring with `model_name` (empty: the scoring model, routed by language;
        the stage then passes no `model_name`) and returns at once; the future raises
        shared.errors types."""
        ...


SCORING = ""
"""The key of the scoring model's result among a batch's results (the call that names no
model); the other keys are the applied models' names."""


@dataclass(frozen=True)
class ItemResults:
    """One item's results from every model applied to it: each model's result for the
    batch (or for the item alone, when it was scored alone) and the item's index into it."""

    results: Mapping[str, ClassifyResult]
    """By model, `SCORING` for the scoring model."""
    index: int
    rejected: Mapping[str, Rejection] = field(default_factory=dict)
    """By model, the applied models (never the scoring model) that rejected the item's text
    alone: recorded as `rejected`, and the item is still scored."""

    @property
    def scoring(self) -> tuple[ClassifyResult, int]:
        """The scoring model's result and the item's index into it."""
        return self.results[SCORING], self.index

    @property
    def applied(self) -> dict[str, tuple[ClassifyResult, int]]:
        """The other models' results, by name."""
        return {model: (result, self.index) for model, result in self.results.items() if model != SCORING}


@dataclass
class _Batch:
    """A polled batch on its way from poll to commit."""

    records: list[Any]
    started: float = field(default_factory=time.perf_counter)
    good: list[tuple[Any, NewsItem]] = field(default_factory=list)
    traced: list[trace.SpanContext] = field(default_factory=list)
    """The producer span of each record that carried a trace context."""
    acks: list[Any] = field(default_factory=list)
    """Broker acknowledgements to wait for before committing."""
    scoring: dict[str, Future[ClassifyResult]] = field(default_factory=dict)
    """Each applied model's call, by model (`SCORING` for the scoring model)."""
    span: trace.Span = trace.INVALID_SPAN
    """"score news batch", from the scoring call until the commit."""


@dataclass(frozen=True)
class BatchOutcome:
    records: int
    scored: int
    dead_lettered: int


#: The DLQ `error-type` of an item no served model can read (shared.routing).
UNSUPPORTED_LANGUAGE_REASON = "unsupported-language"


def unsupported_detail(classification: Classification) -> str:
    """The DLQ `error-detail` of an unsupported-language item: what was detected and why."""
    return (
        f"detected language {classification.language or 'und'} ({classification.language_confidence:.2f});"
        f" {classification.unknown_token_share:.0%} unknown tokens; no served model reads it"
        " (INFERMESH_WORKER_LANGUAGE_ROUTES routes a language to a model)"
    )


def dead_letter_headers(record: Any, reason: str, detail: str) -> list[tuple[str, bytes]]:
    return [
        ("error-type", reason.encode()),
        ("error-detail", detail.encode()),
        ("source-topic", record.topic.encode()),
        ("source-partition", str(record.partition).encode()),
        ("source-offset", str(record.offset).encode()),
    ]


class NewsScorer:
    """Owns one consumer (group member) and one producer; `run` until `stop()`."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        scorer: Scorer,
        attributor: TickerAttributor,
        settings: MonitorSettings,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.scorer = scorer
        self.attributor = attributor
        self.settings = settings
        self.applied_models = settings.applied_models()
        """Called by name beside the scoring model, for every batch."""
        self._sleep = sleep
        self._stopping = threading.Event()
        self.assigned_partitions = 0
        """Partitions the group gave this stage, as of its last poll (for readiness)."""

    def stop(self) -> None:
        """Ask the loop to finish its current batch, commit and return."""
        self._stopping.set()

    def run(self) -> None:
        """Overlaps batches: batch N+1 is polled and sent for scoring before batch N's
        outputs are flushed and its offsets committed, so the mesh is not idle during
        Kafka round trips. Offsets are still committed in order, each after its outputs."""
        self.consumer.subscribe([NEWS_TOPIC])
        pending: _Batch | None = None
        while not self._stopping.is_set():
            # With a batch in flight, take only what has already arrived: a lone message's
            # outputs must not wait out a full poll for company.
            batch = self._start(timeout_ms=20 if pending is not None else 500)
            if pending is not None:
                self._finish(pending)
            pending = batch
        if pending is not None:
            self._finish(pending)

    def run_once(self, timeout_ms: int = 500) -> BatchOutcome:
        """One batch from poll to commit."""
        batch = self._start(timeout_ms)
        return self._finish(batch) if batch is not None else BatchOutcome(0, 0, 0)

    def _start(self, timeout_ms: int = 500) -> _Batch | None:
        """Polls, dead-letters the poison, and sends the rest for scoring (not awaited)."""
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.max_batch)
        records = [record for batch in polled.values() for record in batch]
        self.assigned_partitions = observe_lag(self.consumer)
        if not records:
            return None
        KAFKA_CONSUMED.labels(NEWS_TOPIC).inc(len(records))
        batch = _Batch(records)
        for record in records:
            producer_span = trace.get_current_span(extract_context(record.headers)).get_span_context()
            if producer_span.is_valid:
                batch.traced.append(producer_span)
            try:
                batch.good.append((record, decode_news(record.value, self.settings.max_record_bytes)))
            except PoisonRecord as poison:
                batch.acks.append(self._dead_letter(record, poison.reason, poison.detail))
        if batch.good:
            texts = [item.text() for _, item in batch.good]
            # The scoring call is shared by the batch: its span continues the first traced
            # message's trace (so a lone message's trace reaches the services) and links the rest.
            first = trace.set_span_in_context(trace.NonRecordingSpan(batch.traced[0])) if batch.traced else None
            batch.span = _tracer.start_span(
                "score news batch",
                context=first,
                kind=trace.SpanKind.CONSUMER,
                links=[trace.Link(producer) for producer in batch.traced[1:]],
                attributes={"messaging.batch.message_count": len(records)},
            )
            with trace.use_span(batch.span, end_on_exit=False):
                batch.scoring = self._submit(texts)
        return batch

    def _finish(self, batch: _Batch) -> BatchOutcome:
        """Waits for the scores, produces the outputs, waits for their acks, commits."""
        with trace.use_span(batch.span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
            return self._score_and_commit(batch)

    def _score_and_commit(self, batch: _Batch) -> BatchOutcome:
        scored = 0
        outcomes = self._score([item for _, item in batch.good], batch.scoring)
        for (record, item), outcome in zip(batch.good, outcomes, strict=True):
            if isinstance(outcome, InfermeshError):
                batch.acks.append(self._dead_letter(record, "rejected", outcome.detail))
                continue
            result, index = outcome.scoring
            classification = result.results[index]
            if classification.status is TextStatus.UNSUPPORTED_LANGUAGE:
                # No served model reads it: a label would be a guess, so it waits on the DLQ
                # (committed, not lost) for a model in its language to be routed.
                batch.acks.append(
                    self._dead_letter(record, UNSUPPORTED_LANGUAGE_REASON, unsupported_detail(classification))
                )
                continue
            # Each message's own trace continues here and onward in its outputs' headers.
            with _tracer.start_as_current_span(
                "score news item",
                context=extract_context(record.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.destination.name": record.topic, "infermesh.item_id": item.id},
            ):
                headers = inject_headers()
                for model, rejection in outcome.rejected.items():
                    logger.warning(
                        "model %s rejected %s[%d]@%d (%s); recorded as rejected, the item still scored",
                        model,
                        record.topic,
                        record.partition,
                        record.offset,
                        rejection.detail,
                    )
                scored_items = self._scored_items(item, outcome.scoring, outcome.applied, outcome.rejected)
                for scored_item in scored_items:
                    KAFKA_PRODUCED.labels(SENTIMENT_TOPIC).inc()
                    batch.acks.append(
                        self.producer.send(
                            SENTIMENT_TOPIC,
                            key=scored_item.ticker.encode() if scored_item.ticker else None,
                            value=scored_item.model_dump_json().encode(),
                            headers=headers,
                        )
                    )
                by_topic = topic_record(scored_items[0])
                if by_topic is not None and by_topic.topic is not None:
                    KAFKA_PRODUCED.labels(TOPIC_SENTIMENT_TOPIC).inc()
                    batch.acks.append(
                        self.producer.send(
                            TOPIC_SENTIMENT_TOPIC,
                            key=by_topic.topic.encode(),
                            value=by_topic.model_dump_json().encode(),
                            headers=headers,
                        )
                    )
            scored += 1
        self.producer.flush()
        for ack in batch.acks:
            ack.get(timeout=30)  # raises if the broker refused an output: nothing is committed
        if _test_pause_before_commit:
            _pause_for_test(_test_pause_before_commit, batch)
        self._commit(batch.records)
        WORKER_BATCH_DURATION.labels("score").observe(time.perf_counter() - batch.started)
        return BatchOutcome(len(batch.records), scored, len(batch.records) - scored)

    def _dead_letter(self, record: Any, reason: str, detail: str) -> Any:
        logger.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        WORKER_DEAD_LETTERED.labels(reason).inc()
        KAFKA_PRODUCED.labels(DLQ_TOPIC).inc()
        return self.producer.send(
            DLQ_TOPIC, key=record.key, value=record.value or b"", headers=dead_letter_headers(record, reason, detail)
        )

    def _submit(self, texts: list[str], models: Iterable[str] | None = None) -> dict[str, Future[ClassifyResult]]:
        """Starts one call per model (they run concurrently); returns at once. `models`: by
        default every applied model, `SCORING` (the scoring model, routed by language) first."""
        timeout = self.settings.score_timeout_seconds
        calls: dict[str, Future[ClassifyResult]] = {}
        for model in [SCORING, *self.applied_models] if models is None else models:
            if model == SCORING:
                calls[model] = self.scorer.submit(texts, timeout)
            else:
                calls[model] = self.scorer.submit(texts, timeout, model_name=model)
        return calls

    def _score(
        self, items: list[NewsItem], submitted: Mapping[str, Future[ClassifyResult]]
    ) -> list[ItemResults | InfermeshError]:
        """Per item, its results or the error that rejects it alone (the scoring model's)."""
        if not items or not submitted:
            return []
        texts = [item.text() for item in items]
        answers = self._classify(texts, made=submitted)
        rejecting = [model for model, answer in answers.items() if isinstance(answer, REJECTIONS)]
        if len(items) == 1 or not rejecting:
            return [_item_outcome(answers, index) for index in range(len(items))]
        # One item spoils a model's batch: that model gets each text alone, so only the bad
        # one is rejected; the other models' answers for the batch are kept.
        outcomes: list[ItemResults | InfermeshError] = []
        for index, text in enumerate(texts):
            alone = self._classify([text], models=rejecting)
            mine: dict[str, ClassifyResult | Rejection] = {}
            for model, answer in answers.items():
                if model in alone:
                    mine[model] = alone[model]
                elif isinstance(answer, ClassifyResult):
                    mine[model] = ClassifyResult(answer.model_name, answer.model_version, [answer.results[index]])
            outcomes.append(_item_outcome(mine, 0))
        return outcomes

    def _classify(
        self,
        texts: list[str],
        models: Iterable[str] | None = None,
        made: Mapping[str, Future[ClassifyResult]] | None = None,
    ) -> dict[str, ClassifyResult | Rejection]:
        """Each model's answer for `texts`: its result, or its rejection (InvalidInput,
        InputTooLarge: the texts' fault, not retried). `made`: calls already made (the
        batch's first round, started before the previous batch was committed: one that
        failed transiently is made again at once); else a call per model of `models`
        (`_submit`'s default: every applied model).

        The one place of retries: a call that fails transiently (Unavailable, Overloaded,
        DeadlineExceeded) is made again, alone, with back-off, while the answers already in
        are kept, until `retry_budget_seconds` after the first failure. A model still failing
        then, or failing otherwise (ModelNotReady, ModelLoadFailed, ...), raises its error,
        logged with the model's name: the stage stops with its batch uncommitted, whichever
        model it is."""
        calls = dict(made) if made is not None else self._submit(texts, models)
        order = list(calls)
        again_at_once = made is not None
        answers: dict[str, ClassifyResult | Rejection] = {}
        delay = self.settings.retry_initial_seconds
        deadline: float | None = None
        while True:
            wait(calls.values())  # none is left running behind a retry
            failed: dict[str, InfermeshError] = {}
            for model, call in calls.items():
                try:
                    answers[model] = call.result()
                except REJECTIONS as error:
                    answers[model] = error
                except TRANSIENT as error:
                    failed[model] = error
                except Exception as error:
                    self._giving_up({model: error}, "failed")
                    raise
            if not failed:
                return {model: answers[model] for model in order}
            if deadline is None:
                deadline = time.monotonic() + self.settings.retry_budget_seconds
            if again_at_once:
                again_at_once = False
            else:
                if time.monotonic() + delay > deadline:
                    raise self._giving_up(failed, "still failing past the retry budget")
                logger.warning(
                    "%s failed (%s); retrying %s in %.1f s",
                    ", ".join(self._named(model) for model in failed),
                    "; ".join(f"{type(error).__name__}: {error.detail}" for error in failed.values()),
                    "it" if len(failed) == 1 else "them",
                    delay,
                )
                WORKER_RETRIES.inc()
                self._sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)
            calls = self._submit(texts, failed)

    def _named(self, model: str) -> str:
        """The model as the log names it."""
        return f"scoring model {self.settings.model_name}" if model == SCORING else f"model {model}"

    def _giving_up(self, failed: Mapping[str, Exception], why: str) -> Exception:
        """The first model's error, logged and noted with the models that failed, for the
        stage to stop on."""
        line = "; ".join(
            f"{self._named(model)} {why} ({type(error).__name__}:"
            f" {error.detail if isinstance(error, InfermeshError) else error})"
            for model, error in failed.items()
        )
        line += "; stopping the stage with its batch uncommitted"
        logger.error("%s", line)
        error = next(iter(failed.values()))
        error.add_note(line)
        return error

    def _scored_items(
        self,
        item: NewsItem,
        outcome: tuple[ClassifyResult, int],
        applied: Mapping[str, tuple[ClassifyResult, int]] | None = None,
        rejected: Mapping[str, Rejection] | None = None,
    ) -> list[ScoredItem]:
        """The item's records: `outcome` is the scoring model's result (and the item's index
        into it), `applied` the other applied models', by name, and `rejected` the other
        models that rejected the item's text."""
        result, index = outcome
        classification = result.results[index]
        probabilities = classification.probabilities
        if classification.score is None:
            # Not the record's fault: no record of this model can be scored, so stop
            # (uncommitted) rather than dead-letter the whole stream.
            raise MissingScoreMapping(
                no_score_message(
                    classification.model_name or result.model_name, classification.model_version or result.model_version
                )
            )
        applied, rejected = applied or {}, rejected or {}
        topic_source: Classification | None = classification
        topic_model = self.settings.topic_model
        if topic_model and topic_model != self.settings.model_name:
            topic_result = applied.get(topic_model)
            topic_source = topic_result[0].results[topic_result[1]] if topic_result else None
        topic, topic_probabilities = None, {}
        head = topic_source.heads.get(self.settings.topic_head) if topic_source is not None else None
        if head is not None:
            topic = None if head.abstained else head.label
            topic_probabilities = dict(head.probabilities)
        tickers = self.attributor.tickers(item)
        base = {
            "item_id": item.id,
            "published_at": item.published_at,
            "source": item.source,
            "headline": item.headline,
            "label": classification.label,
            "probabilities": probabilities,
            "score": classification.score,
            "model_name": classification.model_name or result.model_name,
            "model_version": classification.model_version or result.model_version,
            "topic": topic,
            "topic_probabilities": topic_probabilities,
            "tickers": tickers,
            "classifications": {
                **{model: model_classification(*answer) for model, answer in applied.items()},
                **{model: rejected_classification(error) for model, error in rejected.items()},
            },
        }
        if not tickers:
            return [ScoredItem(id=item.id, ticker=None, **base)]
        return [ScoredItem(id=f"{item.id}:{ticker}", ticker=ticker, **base) for ticker in tickers]

    def _commit(self, records: list[Any]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in records:
            partition = TopicPartition(record.topic, record.partition)
            offsets[partition] = OffsetAndMetadata(record.offset + 1, "", -1)
        self.consumer.commit(offsets)


def _item_outcome(answers: Mapping[str, ClassifyResult | Rejection], index: int) -> ItemResults | InfermeshError:
    """One item's outcome from every model's answer (the item's at `index`): the scoring
    model's rejection rejects the item; another model's is recorded beside the results."""
    scoring = answers[SCORING]
    if isinstance(scoring, REJECTIONS):
        return scoring
    results = {model: answer for model, answer in answers.items() if isinstance(answer, ClassifyResult)}
    rejected = {model: answer for model, answer in answers.items() if isinstance(answer, REJECTIONS)}
    return ItemResults(results, index, rejected)


def model_classification(result: ClassifyResult, index: int) -> ModelClassification:
    """An applied model's answer for one item, as scored items carry it."""
    classification = result.results[index]
    version = classification.model_version or result.model_version
    if classification.status is not TextStatus.OK:
        return ModelClassification(model_version=version, status=classification.status.value)
    return ModelClassification(
        model_version=version,
        status=classification.status.value,
        label=classification.label,
        labels=list(classification.labels),
        abstained=classification.abstained,
        probabilities=dict(classification.probabilities),
        score=classification.score,
        heads={
            name: HeadResult(
                label=head.label,
                labels=list(head.labels),
                abstained=head.abstained,
                probabilities=dict(head.probabilities),
                score=head.score,
            )
            for name, head in classification.heads.items()
        },
    )


def rejected_classification(error: Rejection) -> ModelClassification:
    """An applied model's answer for an item whose text it rejected alone."""
    return ModelClassification(status="rejected", detail=error.detail)


def topic_record(scored: ScoredItem) -> ScoredItem | None:
    """The item's record on `finance.sentiment.topics.v1` (one per item, whatever its
    tickers; id the item id, no `ticker`), or None when it has no topic."""
    if scored.topic is None:
        return None
    return scored.model_copy(update={"id": scored.item_id, "ticker": None})


def _pause_for_test(marker: str, batch: _Batch) -> None:
    records = [{"partition": r.partition, "offset": r.offset, "item_id": item.id} for r, item in batch.good]
    Path(f"{marker}.tmp").write_text(json.dumps(records))
    os.replace(f"{marker}.tmp", marker)  # the test never reads it half written
    threading.Event().wait()
