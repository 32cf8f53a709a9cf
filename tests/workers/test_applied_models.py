"""The models the scoring stage applies beside the scoring model (`INFERMESH_WORKER_MODELS`,
`INFERMESH_WORKER_TOPIC_MODEL`), with a fake mesh: one call per model and batch, results in
the scored items' `classifications`, the topic from a separate topic model, and the
retry, isolation and dead-letter rules over the set of calls (only the calls that failed
are made again; only the scoring model's rejection dead-letters an item). The real
services and a tiny imported model are in test_models_kafka.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from kafka import KafkaProducer

from shared.errors import InvalidInput, ModelNotReady, Unavailable
from shared.kafka import read_to_end
from shared.messages import DLQ_TOPIC, NEWS_TOPIC, SENTIMENT_TOPIC, TOPIC_SENTIMENT_TOPIC, NewsItem, ScoredItem
from shared.pipeline import Classification, ClassifyResult, HeadClassification
from shared.routing import TextStatus
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import UNSUPPORTED_LANGUAGE_REASON, ItemResults, NewsScorer
from workers.sentiment_monitor.settings import MonitorSettings

SCORING, ESG, TOPICS, TAGS = "finance-sentiment", "finance-esg", "finance-topic", "finance-tags"
FED, MARKETS = "Fed | Central Banks", "Markets"


def classification(model: str, label: str, probabilities: dict[str, float], head: str, **extra: Any) -> Classification:
    heads = {head: HeadClassification(label, [label] if label != "abstain" else [], probabilities, label == "abstain")}
    return Classification(
        label,
        probabilities,
        label == "abstain",
        1,
        8,
        0,
        [label],
        model_name=model,
        model_version="3",
        heads=heads,
        **extra,
    )


def unsupported() -> Classification:
    return Classification("abstain", {}, True, 1, 8, 0, status=TextStatus.UNSUPPORTED_LANGUAGE, language="ja")


class FakeMesh:
    """Four models. The scoring one (no `model_name`): "fall" is negative, Japanese text
    unreadable, "BAD" rejects any batch it is in. `finance-esg`: "spill" is high risk, text
    with "Ω" unreadable, "REJECT" rejects any batch it is in. `finance-topic` (single head
    `label`): "hike" is central-bank news, "unsure" abstains, "Ω" unreadable.
    `finance-tags` (multi-label head `tags`, threshold 0.5): "Fed" and "rates" each tag the
    text. `failures[model]` calls of a model fail first as if the mesh were down;
    `errors[model]` fails every call of a model with that error."""

    def __init__(self, failures: dict[str, int] | None = None, errors: dict[str, Exception] | None = None) -> None:
        self.failures = dict(failures or {})
        self.errors = dict(errors or {})
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def submit(self, texts: Sequence[str], timeout_seconds: float, model_name: str = "") -> Future[ClassifyResult]:
        model = model_name or SCORING
        self.calls.append((model, tuple(texts)))
        future: Future[ClassifyResult] = Future()
        rejected = "BAD" if model == SCORING else "REJECT" if model == ESG else None
        if model in self.errors:
            future.set_exception(self.errors[model])
        elif self.failures.get(model, 0) > 0:
            self.failures[model] -= 1
            future.set_exception(Unavailable(f"{model} unreachable"))
        elif rejected is not None and any(rejected in text for text in texts):
            bad = next(index for index, text in enumerate(texts) if rejected in text)
            future.set_exception(InvalidInput(f"text {bad} has no tokens"))
        else:
            future.set_result(ClassifyResult(model, "3", [self._one(model, text) for text in texts]))
        return future

    @staticmethod
    def _one(model: str, text: str) -> Classification:
        if model == SCORING:
            if any("\u3040" <= char <= "\u30ff" for char in text):
                return unsupported()
            negative = 0.8 if "fall" in text else 0.1
            probabilities = {"negative": negative, "neutral": 0.9 - negative, "positive": 0.1}
            label = max(probabilities, key=lambda name: probabilities[name])
            return classification(model, label, probabilities, "sentiment", score=0.1 - negative)
        if "Ω" in text:
            return unsupported()
        if model == ESG:
            high = 0.7 if "spill" in text else 0.2
            return classification(model, "high" if high > 0.5 else "low", {"high": high, "low": 1 - high}, "risk")
        if model == TAGS:
            probabilities = {"fed": 0.9 if "Fed" in text else 0.1, "rates": 0.8 if "rates" in text else 0.2}
            labels = [name for name, p in probabilities.items() if p >= 0.5]
            top = max(probabilities, key=lambda name: probabilities[name]) if labels else "abstain"
            head = HeadClassification(top, labels, probabilities, not labels, score=0.5)
            return Classification(
                top,
                probabilities,
                not labels,
                1,
                8,
                0,
                labels,
                model_name=model,
                model_version="2",
                heads={"tags": head},
            )
        fed = 0.9 if "hike" in text else 0.3
        label = "abstain" if "unsure" in text else FED if fed > 0.5 else MARKETS
        return classification(model, label, {FED: fed, MARKETS: 1 - fed}, "label")


def settings(**changes: Any) -> MonitorSettings:
    return MonitorSettings(**({"models": [ESG], "topic_model": TOPICS, "topic_head": "label"} | changes))


def stage(mesh: FakeMesh, monitor: MonitorSettings, sleeps: list[float] | None = None) -> NewsScorer:
    """A scoring stage without Kafka, for its scoring steps."""
    naps = sleeps if sleeps is not None else []
    return NewsScorer(None, None, mesh, TickerAttributor.from_csv(), monitor, sleep=naps.append)


def item(item_id: str, headline: str) -> NewsItem:
    return NewsItem(id=item_id, published_at="2026-11-24T09:00:00Z", source="test", headline=headline)


def score(scorer: NewsScorer, items: list[NewsItem]) -> list[ItemResults | Exception]:
    texts = [i.text() for i in items]
    return list(scorer._score(items, scorer._submit(texts)))


def scored(scorer: NewsScorer, news: NewsItem, outcome: ItemResults | Exception) -> ScoredItem:
    assert isinstance(outcome, ItemResults), outcome
    return scorer._scored_items(news, outcome.scoring, outcome.applied, outcome.rejected)[0]


# --- settings ---------------------------------------------------------------------------------


def test_applied_models_come_from_the_environment_each_once_never_the_scoring_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MonitorSettings().applied_models() == []  # today's worker: the scoring model only
    assert MonitorSettings(models=[TOPICS], topic_model=TOPICS).applied_models() == [TOPICS]
    assert MonitorSettings(topic_model=SCORING).applied_models() == []
    monkeypatch.setenv("INFERMESH_WORKER_MODELS", json.dumps([ESG, SCORING, ESG, "finance-zh-esg"]))
    monkeypatch.setenv("INFERMESH_WORKER_TOPIC_MODEL", TOPICS)
    monitor = MonitorSettings()
    assert monitor.models == [ESG, SCORING, ESG, "finance-zh-esg"] and monitor.topic_model == TOPICS
    assert monitor.applied_models() == [ESG, "finance-zh-esg", TOPICS]


# --- scoring ----------------------------------------------------------------------------------


def test_one_call_per_model_and_batch_and_the_results_land_in_classifications() -> None:
    mesh = FakeMesh()
    scorer = stage(mesh, settings())
    items = [item("a", "Fed hike makes stocks fall"), item("b", "Oil spill at $XOM rig"), item("c", "unsure")]
    outcomes = score(scorer, items)
    texts = tuple(i.text() for i in items)
    assert sorted(mesh.calls) == sorted([(SCORING, texts), (ESG, texts), (TOPICS, texts)])

    a, b, c = (scored(scorer, news, outcome) for news, outcome in zip(items, outcomes, strict=True))
    # The scoring model's result is the record's own fields; the others are in classifications.
    assert (a.model_name, a.model_version, a.label) == (SCORING, "3", "negative") and a.score == pytest.approx(-0.7)
    assert set(a.classifications) == {ESG, TOPICS}
    esg = b.classifications[ESG]
    assert (esg.model_version, esg.status, esg.label, esg.score) == ("3", "ok", "high", None)
    assert esg.probabilities == {"high": 0.7, "low": pytest.approx(0.3)}
    assert esg.heads["risk"].label == "high" and esg.heads["risk"].probabilities == esg.probabilities
    # The topic comes from the topic model's `label` head, not from the scoring model.
    assert (a.topic, a.topic_probabilities) == (FED, {FED: 0.9, MARKETS: pytest.approx(0.1)})
    assert b.topic == MARKETS and b.ticker == "XOM"
    assert c.topic is None and c.topic_probabilities and c.classifications[TOPICS].label == "abstain"
    assert "sentiment" not in a.topic_probabilities


def test_without_a_topic_model_the_topic_is_the_scoring_models_and_classifications_stay_empty() -> None:
    news = item("a", "Fed hike")
    for topic_head, topic in [("label", None), ("sentiment", "neutral")]:
        mesh = FakeMesh()
        scorer = stage(mesh, MonitorSettings(topic_head=topic_head))
        (outcome,) = score(scorer, [news])
        assert mesh.calls == [(SCORING, (news.text(),))]
        record = scored(scorer, news, outcome)
        assert (record.topic, record.classifications) == (topic, {})


def test_a_text_a_listed_model_cannot_read_is_recorded_and_the_item_still_scored() -> None:
    scorer = stage(FakeMesh(), settings())
    news = item("a", "Ωmega Corp shares fall")
    record = scored(scorer, news, score(scorer, [news])[0])
    assert record.label == "negative" and record.topic is None and record.topic_probabilities == {}
    for model in (ESG, TOPICS):
        result = record.classifications[model]
        assert (result.status, result.label, result.probabilities, result.heads) == (
            "unsupported_language",
            None,
            {},
            {},
        )
        assert result.model_version == "3"


def test_a_transient_failure_retries_only_the_failed_call_with_back_off() -> None:
    mesh = FakeMesh(failures={ESG: 3})
    naps: list[float] = []
    scorer = stage(mesh, settings(retry_initial_seconds=0.25), naps)
    items = [item("a", "Fed hike"), item("b", "Oil spill")]
    outcomes = score(scorer, items)
    assert all(isinstance(outcome, ItemResults) for outcome in outcomes)
    texts = tuple(i.text() for i in items)
    # The first round (every model), then three retries of the listed model alone: the
    # scoring model is asked once; the first retry goes at once, as before, then back-off.
    assert sorted(mesh.calls) == sorted([(SCORING, texts), (TOPICS, texts)] + [(ESG, texts)] * 4)
    assert naps == [0.25, 0.5]
    record = scored(scorer, items[1], outcomes[1])
    assert record.classifications[ESG].label == "high" and record.label == "neutral" and record.topic == MARKETS
    assert list(record.classifications) == [ESG, TOPICS]  # the settings' order, whatever answered first


def test_a_transient_failure_of_several_models_retries_each_until_it_answers() -> None:
    mesh = FakeMesh(failures={SCORING: 1, TOPICS: 2})
    scorer = stage(mesh, settings())
    news = item("a", "Fed hike")
    (outcome,) = score(scorer, [news])
    asked = [model for model, _ in mesh.calls]
    assert (asked.count(SCORING), asked.count(ESG), asked.count(TOPICS)) == (2, 1, 3)
    assert scored(scorer, news, outcome).topic == FED


def test_a_retry_budget_spent_raises_naming_the_model_and_nothing_is_scored(caplog: pytest.LogCaptureFixture) -> None:
    mesh = FakeMesh(failures={TOPICS: 100})
    scorer = stage(mesh, settings(retry_initial_seconds=1.0, retry_budget_seconds=2.5))
    with caplog.at_level(logging.ERROR), pytest.raises(Unavailable) as raised:
        score(scorer, [item("a", "Fed hike")])
    assert [model for model, _ in mesh.calls].count(SCORING) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"model {TOPICS} still failing past the retry budget" in line and "uncommitted" in line
    assert any(TOPICS in note for note in raised.value.__notes__)  # and so the stage's last log line


def test_a_listed_model_that_is_not_ready_stops_the_stage_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    mesh = FakeMesh(errors={ESG: ModelNotReady("no version of the model is loaded")})
    scorer = stage(mesh, settings())
    with caplog.at_level(logging.ERROR), pytest.raises(ModelNotReady):
        score(scorer, [item("a", "Fed hike"), item("b", "Oil spill")])
    assert len(mesh.calls) == 3  # not retried: waiting would not help
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"model {ESG} failed (ModelNotReady: no version of the model is loaded)" in line


def test_an_item_that_spoils_the_scoring_models_batch_is_rejected_alone_and_the_rest_keep_every_model() -> None:
    mesh = FakeMesh(failures={TOPICS: 2})
    scorer = stage(mesh, settings())
    items = [item("a", "Fed hike"), item("bad", "BAD"), item("c", "Oil spill")]
    outcomes = score(scorer, items)
    assert isinstance(outcomes[1], InvalidInput)
    for news in (items[0], items[2]):
        outcome = outcomes[items.index(news)]
        assert isinstance(outcome, ItemResults) and outcome.index == 0 and not outcome.rejected
        assert set(outcome.results) == {"", ESG, TOPICS}
        assert all(result.results[0].model_name for result in outcome.results.values())
    assert scored(scorer, items[0], outcomes[0]).topic == FED
    assert scored(scorer, items[2], outcomes[2]).classifications[ESG].label == "high"
    # Only the scoring model gets each item alone; the others' batch answers are kept (the
    # topic model's transient failure retried for the batch).
    alone = {(model, texts) for model, texts in mesh.calls if len(texts) == 1}
    assert alone == {(SCORING, (i.text(),)) for i in items}
    texts = tuple(i.text() for i in items)
    assert [call for call in mesh.calls if len(call[1]) > 1] == [(SCORING, texts), (ESG, texts)] + [(TOPICS, texts)] * 3


def test_an_item_a_listed_model_rejects_is_recorded_rejected_and_still_scored() -> None:
    mesh = FakeMesh()
    scorer = stage(mesh, settings())
    items = [item("a", "Fed hike"), item("b", "Oil spill REJECT"), item("c", "Shares fall")]
    outcomes = score(scorer, items)
    assert all(isinstance(outcome, ItemResults) for outcome in outcomes)
    a, b, c = (scored(scorer, news, outcome) for news, outcome in zip(items, outcomes, strict=True))
    esg = b.classifications[ESG]
    assert (esg.status, esg.detail, esg.label, esg.labels, esg.heads) == (
        "rejected",
        "text 0 has no tokens",
        None,
        [],
        {},
    )
    assert (b.label, b.topic) == ("neutral", MARKETS)  # the scoring and topic models' answers stand
    assert a.classifications[ESG].status == c.classifications[ESG].status == "ok"
    assert c.label == "negative"
    # The scoring model answered the batch, once; only the listed model got each item alone.
    texts = tuple(i.text() for i in items)
    assert sorted(mesh.calls) == sorted(
        [(SCORING, texts), (ESG, texts), (TOPICS, texts)] + [(ESG, (i.text(),)) for i in items]
    )

    # An item alone in its batch: no isolation pass needed, the same outcome.
    (alone,) = score(scorer, [items[1]])
    record = scored(scorer, items[1], alone)
    assert record.classifications[ESG].status == "rejected" and record.label == "neutral"


def test_every_label_of_a_multi_label_model_is_carried() -> None:
    scorer = stage(FakeMesh(), settings(models=[TAGS]))
    items = [item("a", "Fed lifts rates"), item("b", "Fed hike"), item("c", "Oil spill")]
    a, b, c = (scored(scorer, news, outcome) for news, outcome in zip(items, score(scorer, items), strict=True))
    tags = a.classifications[TAGS]
    assert (tags.label, tags.labels, tags.abstained, tags.model_version) == ("fed", ["fed", "rates"], False, "2")
    head = tags.heads["tags"]
    assert (head.label, head.labels, head.abstained, head.score) == ("fed", ["fed", "rates"], False, 0.5)
    assert head.probabilities == {"fed": 0.9, "rates": 0.8}
    assert b.classifications[TAGS].labels == ["fed"]
    assert (c.classifications[TAGS].labels, c.classifications[TAGS].abstained) == ([], True)
    assert c.classifications[TAGS].heads["tags"].abstained
    # A single-label head's one label holds; it round-trips through the topic's JSON.
    topic = ScoredItem.model_validate_json(b.model_dump_json()).classifications[TOPICS]
    assert (topic.labels, topic.heads["label"].labels, topic.abstained) == ([FED], [FED], False)


# --- the stage, through the embedded broker ---------------------------------------------------


def news_value(item_id: str, headline: str) -> bytes:
    return json.dumps(
        {"id": item_id, "published_at": "2026-11-24T09:00:00Z", "source": "test", "headline": headline},
        ensure_ascii=False,
    ).encode()


async def test_the_stage_dead_letters_what_the_scoring_model_cannot_read_and_records_the_rest(
    kafka_config: dict[str, Any],
) -> None:
    values = {
        "fed": "Fed hike makes stocks fall",
        "spill": "Oil spill at $XOM rig",
        "omega": "Ωmega Corp shares fall",  # the listed models cannot read it: recorded
        "sony": "ソニー株が急落",  # the scoring model cannot read it: dead-lettered
        "bad": "BAD",  # spoils the batch: rejected alone
        "esg-bad": "Oil spill REJECT",  # a listed model rejects it alone: recorded, scored
    }
    producer = KafkaProducer(**kafka_config, acks="all")
    for item_id, headline in values.items():
        producer.send(NEWS_TOPIC, value=news_value(item_id, headline), partition=0)
    producer.flush()
    producer.close()
    monitor = settings()
    scorer = scoring_stage(kafka_config, FakeMesh(), monitor)
    consumer = scorer.consumer
    seen = scored_count = 0
    try:
        for _ in range(60):
            outcome = await asyncio.to_thread(scorer.run_once, 500)
            seen, scored_count = seen + outcome.records, scored_count + outcome.scored
            if seen >= len(values):
                break
    finally:
        consumer.close(autocommit=False)
        scorer.producer.close()
    assert (seen, scored_count) == (len(values), 4)

    records = [ScoredItem.model_validate_json(r.value) for r in read_to_end(kafka_config, SENTIMENT_TOPIC, [0, 1])]
    by_item = {record.item_id: record for record in records}
    dead = {
        json.loads(r.value)["id"]: dict(r.headers)["error-type"].decode()
        for r in read_to_end(kafka_config, DLQ_TOPIC, [0])
    }
    assert dead == {"sony": UNSUPPORTED_LANGUAGE_REASON, "bad": "rejected"}
    assert set(by_item) | set(dead) == set(values) and not set(by_item) & set(dead)
    assert by_item["omega"].classifications[ESG].status == "unsupported_language"
    assert by_item["spill"].classifications[ESG].label == "high" and by_item["spill"].ticker == "XOM"
    assert by_item["esg-bad"].classifications[ESG].status == "rejected" and by_item["esg-bad"].label == "neutral"
    assert {s.item_id: s.topic for s in records} == {"fed": FED, "spill": MARKETS, "omega": None, "esg-bad": MARKETS}
    by_topic = read_to_end(kafka_config, TOPIC_SENTIMENT_TOPIC, [0, 1])
    assert sorted((r.key, ScoredItem.model_validate_json(r.value).item_id) for r in by_topic) == [
        (FED.encode(), "fed"),
        (MARKETS.encode(), "esg-bad"),
        (MARKETS.encode(), "spill"),
    ]


def test_older_records_without_classifications_still_decode() -> None:
    record = ScoredItem.model_validate_json(
        json.dumps(
            {
                "id": "a",
                "item_id": "a",
                "ticker": None,
                "published_at": "2026-11-24T09:00:00Z",
                "source": "test",
                "headline": "h",
                "label": "neutral",
                "probabilities": {"neutral": 1.0},
                "score": 0.0,
                "model_name": SCORING,
                "model_version": "1",
            }
        )
    )
    assert record.classifications == {}
