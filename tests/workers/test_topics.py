"""Topics beside sentiment: the scoring stage's topic fields and its by-topic stream, topic
windows across tickers (items naming no ticker count), ticker windows' topic mix, and the
topic alert (pure code first, then through the real embedded broker and real services)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from shared.grpc_server import RunningServer
from shared.kafka import read_to_end
from shared.messages import (
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    TOPIC_ALERTS_TOPIC,
    TOPIC_SENTIMENT_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    ScoredItem,
    TopicAlert,
    TopicWindow,
    decode_internal,
    output_json_schemas,
)
from shared.pipeline import Classification, ClassifyResult, HeadClassification, PipelineTargets
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.consumer import topic_record
from workers.sentiment_monitor.core import (
    TopicAlertRule,
    TopicAlertSettings,
    TopicWindows,
    TumblingWindows,
    WindowSettings,
)
from workers.sentiment_monitor.runner import group_consumer
from workers.sentiment_monitor.scoring import BlockingPipeline
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.windowing import TOPICS, WindowStage

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
FED = "Fed | Central Banks"
LEGAL = "Legal | Regulation"


def item(item_id: str, minute: float, label: str, topic: str | None, tickers: Sequence[str] = ()) -> ScoredItem:
    negative = 0.9 if label == "negative" else 0.05
    probabilities = {"negative": negative, "neutral": 0.95 - negative, "positive": 0.05}
    return ScoredItem(
        id=item_id,
        item_id=item_id,
        ticker=None,
        published_at=T0 + timedelta(minutes=minute),
        source="test",
        headline=f"headline {item_id}",
        label=label,
        probabilities=probabilities,
        score=probabilities["positive"] - probabilities["negative"],
        model_name="m",
        model_version="1",
        topic=topic,
        topic_probabilities={topic: 0.8} if topic else {},
        tickers=list(tickers),
    )


def per_ticker(scored: ScoredItem) -> list[ScoredItem]:
    return [scored.model_copy(update={"id": f"{scored.item_id}:{t}", "ticker": t}) for t in scored.tickers]


# --- pure ------------------------------------------------------------------------------------


def test_topic_windows_count_items_without_a_ticker_once_each_with_their_ticker_mix() -> None:
    windows = TopicWindows(WindowSettings(size=timedelta(minutes=5), allowed_lateness=timedelta(minutes=1)))
    stream = [
        item("fed1", 0, "negative", FED),  # no ticker
        item("fed2", 1, "neutral", FED),
        item("both", 2, "negative", FED, ["JPM", "GS"]),
        item("both", 2, "negative", FED, ["JPM", "GS"]),  # redelivered: counted once
        item("jpm", 3, "neutral", FED, ["JPM"]),
        item("law", 3, "negative", LEGAL, ["TSLA"]),
        item("none", 3, "negative", None),  # no topic: not windowed here
    ]
    assert [windows.add(i, NOW) for i in stream] == [True] * 6 + [False]
    windows.add(item("later", 7, "neutral", FED), NOW)
    fed, legal = windows.close_due()
    assert (fed.id, fed.topic, fed.count, fed.share_negative) == (f"{FED}:{T0.isoformat()}", FED, 4, 0.5)
    assert fed.tickers == {"JPM": 2, "GS": 1} and fed.negative_tickers == {"GS": 1, "JPM": 1}
    assert fed.without_ticker == 2
    assert [(e.item_id, e.tickers) for e in fed.top_negative] == [("both", ["JPM", "GS"]), ("fed1", [])]
    assert (legal.topic, legal.count, legal.tickers) == (LEGAL, 1, {"TSLA": 1})


def test_ticker_windows_carry_their_topic_mix() -> None:
    windows = TumblingWindows(WindowSettings(allowed_lateness=timedelta(minutes=1)))
    for n, (label, topic) in enumerate(
        [("negative", LEGAL)] * 5 + [("negative", "Stock Movement"), ("neutral", "Earnings"), ("neutral", None)]
    ):
        for scored in per_ticker(item(f"t{n}", n * 0.5, label, topic, ["TSLA"])):
            windows.add(scored, NOW)
    windows.add(per_ticker(item("flush", 9, "neutral", None, ["TSLA"]))[0], NOW)
    (tsla,) = windows.close_due()
    assert tsla.topics == {LEGAL: 5, "Earnings": 1, "Stock Movement": 1}  # largest first
    assert tsla.negative_topics == {LEGAL: 5, "Stock Movement": 1}
    assert tsla.top_negative[0].tickers == []


def topic_window(index: int, negatives: int, count: int = 10, tickers: dict[str, int] | None = None) -> TopicWindow:
    """Window `index` of FED: `negatives` negative items, naming `tickers` (negative ones first)."""
    windows = TopicWindows()
    names = [t for t, n in (tickers or {}).items() for _ in range(n)]
    for n in range(count):
        label = "negative" if n < negatives else "neutral"
        windows.add(item(f"w{index}-{n}", index * 5 + n * 0.1, label, FED, names[n : n + 1]), NOW)
    windows.add(item("flush", index * 5 + 30, "neutral", FED), NOW)
    return windows.close_due()[0]


def test_a_topic_spike_against_its_own_baseline_raises_one_alert_with_evidence() -> None:
    rule = TopicAlertRule(TopicAlertSettings(min_items=8))
    raised = [rule.observe(topic_window(i, 8 if 8 <= i <= 10 else 1)) for i in range(20)]
    (alert,) = [a for a in raised if a is not None]
    assert alert.topic == FED and alert.window.window_start == T0 + timedelta(minutes=40)
    assert alert.id == alert.window.id and alert.baseline_share_negative == pytest.approx(0.1)
    assert alert.z_score >= 3 and alert.largest_ticker_share == 0.0
    assert len(alert.window.top_negative) == 3


def test_one_companys_storm_is_its_tickers_alert_not_its_topics() -> None:
    def calm_rule() -> TopicAlertRule:
        rule = TopicAlertRule(TopicAlertSettings(min_items=8, max_ticker_share=0.5))
        for index in range(5):
            assert rule.observe(topic_window(index, 1)) is None
        return rule

    assert calm_rule().observe(topic_window(5, 8, tickers={"TSLA": 6})) is None  # 6 of 8 negatives: TSLA's
    broad = calm_rule().observe(topic_window(5, 8, tickers={"TSLA": 4, "JPM": 2, "GS": 2}))  # half of them
    assert broad is not None and broad.largest_ticker_share == 0.5


def test_small_topic_windows_do_not_alert_and_restored_cooldowns_hold() -> None:
    small, rule = TopicAlertRule(TopicAlertSettings(min_items=8)), TopicAlertRule(TopicAlertSettings(min_items=8))
    for index in range(5):
        small.observe(topic_window(index, 0))
        rule.observe(topic_window(index, 0))
    assert small.observe(topic_window(5, 6, count=6)) is None  # too few items
    fired = rule.observe(topic_window(5, 9))
    assert fired is not None
    restarted = TopicAlertRule(TopicAlertSettings(min_items=8))
    for index in range(6):
        restarted.remember(topic_window(index, 0))
    restarted.remember_alert(fired)
    assert restarted.observe(topic_window(6, 9)) is None  # inside the cooldown


def test_the_topic_record_is_one_per_item_keyed_by_topic() -> None:
    scored = per_ticker(item("x", 0, "negative", FED, ["JPM", "GS"]))
    record = topic_record(scored[1])
    assert record is not None and (record.id, record.ticker, record.tickers) == ("x", None, ["JPM", "GS"])
    assert topic_record(item("y", 0, "negative", None)) is None


def test_older_records_without_topic_fields_still_decode_and_schemas_are_published() -> None:
    old = item("x", 0, "neutral", None).model_dump(mode="json")
    for field in ("topic", "topic_probabilities", "tickers"):
        del old[field]
    decoded = decode_internal(ScoredItem, json.dumps(old).encode())
    assert decoded.topic is None and decoded.tickers == []
    for topic, schema in output_json_schemas().items():
        with open(f"docs/schemas/{topic}.json", encoding="utf-8") as published:
            assert json.load(published) == schema, f"regenerate docs/schemas/{topic}.json (docs/monitoring.md)"
    assert {"topic", "topic_probabilities", "tickers"}.isdisjoint(output_json_schemas()[SENTIMENT_TOPIC]["required"])


# --- scoring: the topic head ------------------------------------------------------------------


class TwoHeadScorer:
    """Stands in for a two-headed version: "hike" is central-bank news, "probe" legal;
    "fall", "slide" or "probe" are negative."""

    def __init__(self, heads: bool = True) -> None:
        self.heads = heads

    def classify(self, texts: Sequence[str], timeout_seconds: float) -> ClassifyResult:
        results = []
        for text in texts:
            label = "negative" if any(w in text for w in ("fall", "slide", "probe")) else "neutral"
            probabilities = {"negative": 0.9 if label == "negative" else 0.05, "positive": 0.05}
            probabilities["neutral"] = 1 - probabilities["negative"] - probabilities["positive"]
            topic = FED if "hike" in text else LEGAL if "probe" in text else "Markets"
            heads = {
                "sentiment": HeadClassification(label, [label], probabilities, False, 0.0),
                "topic": HeadClassification(topic, [topic], {topic: 0.7, "Macro": 0.3}, False),
            }
            score = probabilities["positive"] - probabilities["negative"]
            results.append(
                Classification(
                    label, probabilities, False, 1, 8, 0, [label], score=score, heads=heads if self.heads else {}
                )
            )
        return ClassifyResult("m", "1", results)

    def submit(self, texts: Sequence[str], timeout_seconds: float) -> Future[ClassifyResult]:
        future: Future[ClassifyResult] = Future()
        future.set_result(self.classify(texts, timeout_seconds))
        return future


def news(item_id: str, minute: float, headline: str) -> bytes:
    published = (T0 + timedelta(minutes=minute)).isoformat()
    return json.dumps({"id": item_id, "published_at": published, "source": "test", "headline": headline}).encode()


def produce_news(kafka_config: dict[str, Any], values: list[bytes]) -> None:
    producer = KafkaProducer(**kafka_config, acks="all")
    for value in values:
        producer.send(NEWS_TOPIC, value=value, partition=0)
    producer.flush()
    producer.close()


async def score_all(kafka_config: dict[str, Any], scorer: Any, settings: MonitorSettings, expected: int) -> None:
    stage = scoring_stage(kafka_config, scorer, settings)
    consumer, producer = stage.consumer, stage.producer
    seen = 0
    try:
        for _ in range(60):
            seen += (await asyncio.to_thread(stage.run_once, 500)).records
            if seen >= expected:
                return
        raise AssertionError(f"scored {seen} of {expected}")
    finally:
        consumer.close(autocommit=False)
        producer.close()


def topic_stage(kafka_config: dict[str, Any], settings: MonitorSettings) -> WindowStage:
    consumer = group_consumer(kafka_config, settings.topics_group, settings.max_batch)
    producer = KafkaProducer(**kafka_config, acks="all", enable_idempotence=True)
    stage = WindowStage(consumer, producer, kafka_config, settings, clock=lambda: NOW, dimension=TOPICS)
    consumer.subscribe([TOPIC_SENTIMENT_TOPIC], listener=stage)
    return stage


async def run_until_idle(stage: WindowStage, expected: int) -> None:
    seen, idle = 0, 0
    while idle < 3:
        count = await asyncio.to_thread(stage.run_once, 500)
        seen += count
        idle = idle + 1 if count == 0 and seen >= expected else 0


def central_bank_news(first: int, last: int) -> list[bytes]:
    """Windows first..last: ten items each, naming no ticker; windows 8-10 hawkish
    (8 of 10 negative), the rest calm; plus Apple and Tesla news on other topics."""
    values = []
    for index in range(first, last + 1):
        for n in range(10):
            minute = index * 5 + n * 0.4
            hawkish = n < (8 if 8 <= index <= 10 else 1)
            values.append(
                news(f"fed{index}-{n}", minute, f"Fed hike talk {'makes stocks fall' if hawkish else 'holds'}")
            )
            values.append(news(f"aapl{index}-{n}", minute + 0.1, f"$AAPL {'probe' if n == 0 else 'steady'} news"))
    return values


async def test_central_bank_news_naming_no_ticker_raises_one_topic_alert_through_the_broker(
    kafka_config: dict[str, Any],
) -> None:
    settings = MonitorSettings(caught_up_check_seconds=0)
    values = central_bank_news(0, 19)
    produce_news(kafka_config, values)
    await score_all(kafka_config, TwoHeadScorer(), settings, len(values))
    # The scored stream carries the topic; the by-topic stream has one record per item, keyed by topic.
    scored = [ScoredItem.model_validate_json(r.value) for r in read_to_end(kafka_config, SENTIMENT_TOPIC, [0, 1])]
    fed = next(s for s in scored if s.item_id == "fed0-0")
    assert (fed.ticker, fed.topic, fed.topic_probabilities, fed.tickers) == (None, FED, {FED: 0.7, "Macro": 0.3}, [])
    aapl = next(s for s in scored if s.item_id == "aapl0-0")
    assert (aapl.ticker, aapl.topic, aapl.tickers) == ("AAPL", LEGAL, ["AAPL"])
    by_topic = read_to_end(kafka_config, TOPIC_SENTIMENT_TOPIC, [0, 1])
    assert len(by_topic) == len(values)
    assert all(r.key == ScoredItem.model_validate_json(r.value).topic.encode() for r in by_topic)  # type: ignore[union-attr]

    stage = topic_stage(kafka_config, settings)
    try:
        await run_until_idle(stage, len(values))
    finally:
        stage.consumer.close(autocommit=False)
        stage.producer.close()
    windows = [TopicWindow.model_validate_json(r.value) for r in read_to_end(kafka_config, TOPIC_WINDOWS_TOPIC, [0, 1])]
    alerts = [TopicAlert.model_validate_json(r.value) for r in read_to_end(kafka_config, TOPIC_ALERTS_TOPIC, [0, 1])]
    fed_windows = [w for w in windows if w.topic == FED]
    assert len(fed_windows) >= 18 and all(w.count == 10 and w.without_ticker == 10 for w in fed_windows)
    assert len({w.id for w in windows}) == len(windows)
    (alert,) = alerts
    assert alert.topic == FED and alert.window.window_start == T0 + timedelta(minutes=40)
    assert alert.window.share_negative == 0.8 and alert.largest_ticker_share == 0.0
    assert [e.item_id for e in alert.window.top_negative][0].startswith("fed8-")


async def test_without_heads_items_have_no_topic_and_nothing_goes_to_the_topic_stream(
    kafka_config: dict[str, Any],
) -> None:
    settings = MonitorSettings()
    values = [news("a", 0, "Fed hike talk makes stocks fall"), news("b", 0, "$AAPL probe news")]
    produce_news(kafka_config, values)
    await score_all(kafka_config, TwoHeadScorer(heads=False), settings, len(values))
    scored = [ScoredItem.model_validate_json(r.value) for r in read_to_end(kafka_config, SENTIMENT_TOPIC, [0, 1])]
    assert sorted((s.id, s.topic) for s in scored) == [("a", None), ("b:AAPL", None)]
    assert read_to_end(kafka_config, TOPIC_SENTIMENT_TOPIC, [0, 1]) == []


# --- the real services -----------------------------------------------------------------------


DEFAULT_VERSION = Path("models/finance-sentiment/1/config.json")


def default_version_has_topic_head() -> bool:
    """Whether the built default model has the monitor's topic head (read before any
    server starts, so the skip costs nothing)."""
    if not DEFAULT_VERSION.exists():
        return False
    config = json.loads(DEFAULT_VERSION.read_text(encoding="utf-8"))
    return any(head.get("name") == MonitorSettings().topic_head for head in config.get("extra_heads", []))


@pytest.mark.skipif(
    not default_version_has_topic_head(),
    reason=f"{DEFAULT_VERSION} has no `{MonitorSettings().topic_head}` head in extra_heads yet"
    " (the two-headed default model is not built): nothing to give items a topic",
)
async def test_the_default_model_gives_scored_items_their_topic(
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
) -> None:
    settings = MonitorSettings()
    targets = PipelineTargets(
        *(f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server))
    )
    pipeline = BlockingPipeline(targets, "finance-sentiment")
    values = [news("fed", 0, "Fed signals more rate hikes as inflation stays hot; markets slide")]
    try:
        produce_news(kafka_config, values)
        await score_all(kafka_config, pipeline, settings, len(values))
    finally:
        pipeline.close()
    (record,) = read_to_end(kafka_config, SENTIMENT_TOPIC, [0, 1])
    scored = ScoredItem.model_validate_json(record.value)
    assert scored.topic_probabilities and sum(scored.topic_probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert scored.topic in scored.topic_probabilities
    (by_topic,) = read_to_end(kafka_config, TOPIC_SENTIMENT_TOPIC, [0, 1])
    assert by_topic.key == scored.topic.encode()
