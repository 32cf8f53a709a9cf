"""The windowing stage against the real embedded broker: windows, one alert per episode,
no duplicate alert or window after a restart, quiet partitions, an upstream stall longer
than the idle time, hostile stamps, unreadable records on the stage's own topics, and a
bounded read-back on assignment."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared.kafka import read_to_end
from shared.kafka_tracing import extract_context, inject_headers
from shared.metrics import MetricsServer
from shared.pipeline import Classification, ClassifyResult
from tests.conftest import SPANS, free_port
from tests.workers.stages import scoring_stage
from workers.sentiment_monitor.core import window_id
from workers.sentiment_monitor.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    WindowAggregate,
)
from workers.sentiment_monitor.runner import group_consumer
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.windowing import PipelineCaughtUp, WindowStage, restore_reader

from .test_monitor_core import scored

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def episode_items(first: int, last: int) -> list[Any]:
    """Windows first..last for ACME (windows 8-10 mostly negative) and a steady STDY."""
    items = []
    for index in range(first, last + 1):
        for n in range(10):
            minute = index * 5 + n * 0.4
            acme_negative = n < (8 if 8 <= index <= 10 else 1)
            items.append(scored(f"a{index}-{n}", "ACME", minute, "negative" if acme_negative else "neutral"))
            items.append(scored(f"s{index}-{n}", "STDY", minute + 0.1, "negative" if n < 1 else "neutral"))
    return items


def produce(kafka_config: dict[str, Any], items: list[Any]) -> None:
    producer = KafkaProducer(**kafka_config, acks="all")
    for item in items:
        producer.send(SENTIMENT_TOPIC, key=item.ticker.encode(), value=item.model_dump_json().encode())
    producer.flush()
    producer.close()


class Clock:
    """The stage's wall clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def stage(
    kafka_config: dict[str, Any],
    settings: MonitorSettings | None = None,
    clock: Callable[[], datetime] = lambda: T0 + timedelta(days=1),
) -> WindowStage:
    consumer = group_consumer(kafka_config, "test-windows", (settings or MonitorSettings()).max_batch)
    producer = KafkaProducer(**kafka_config, acks="all", enable_idempotence=True)
    window_stage = WindowStage(consumer, producer, kafka_config, settings or MonitorSettings(), clock=clock)
    consumer.subscribe([SENTIMENT_TOPIC], listener=window_stage)
    return window_stage


async def run_until_idle(window_stage: WindowStage, expected: int) -> None:
    seen, idle = 0, 0
    while idle < 3:
        count = await asyncio.to_thread(window_stage.run_once, 500)
        seen += count
        idle = idle + 1 if count == 0 and seen >= expected else 0


async def until_assigned(window_stage: WindowStage, partitions: int = 2) -> None:
    for _ in range(60):
        await asyncio.to_thread(window_stage.run_once, 500)
        if len(window_stage.states) == partitions:
            return
    raise AssertionError(f"the stage got {sorted(window_stage.states)} of {partitions} partitions")


def close(window_stage: WindowStage) -> None:
    window_stage.consumer.close(autocommit=False)
    window_stage.producer.close()


def outputs(kafka_config: dict[str, Any]) -> tuple[list[WindowAggregate], list[Alert]]:
    windows = [WindowAggregate.model_validate_json(r.value) for r in read_to_end(kafka_config, WINDOWS_TOPIC, [0, 1])]
    alerts = [Alert.model_validate_json(r.value) for r in read_to_end(kafka_config, ALERTS_TOPIC, [0, 1])]
    return windows, alerts


async def test_a_scripted_episode_raises_one_alert_with_evidence(kafka_config: dict[str, Any]) -> None:
    items = episode_items(0, 19)
    produce(kafka_config, items)
    window_stage = stage(kafka_config)
    try:
        await run_until_idle(window_stage, len(items))
    finally:
        close(window_stage)
    windows, alerts = outputs(kafka_config)
    assert len({w.id for w in windows}) == len(windows) == 2 * 19  # the last window of each is still open
    assert all(w.count == 10 for w in windows)
    (alert,) = alerts
    assert alert.ticker == "ACME" and alert.window.window_start == T0 + timedelta(minutes=40)
    assert alert.window.share_negative == 0.8 and alert.baseline_share_negative == 0.1
    assert len(alert.window.top_negative) == 3 and alert.window.top_negative[0].item_id.startswith("a8-")


async def test_a_restarted_stage_neither_loses_windows_nor_repeats_the_alert(kafka_config: dict[str, Any]) -> None:
    first_part, second_part = episode_items(0, 9), episode_items(10, 19)
    produce(kafka_config, first_part)
    window_stage = stage(kafka_config)
    try:
        await run_until_idle(window_stage, len(first_part))
        assert window_stage.alerts_raised == 1  # window 8
    finally:
        close(window_stage)  # as a crash would: uncommitted open windows stay in the topic

    produce(kafka_config, second_part)
    replacement = stage(kafka_config)
    try:
        await run_until_idle(replacement, len(second_part))
        assert replacement.alerts_raised == 0  # windows 9 and 10 are in the restored cooldown
    finally:
        close(replacement)
    windows, alerts = outputs(kafka_config)
    assert len(alerts) == 1
    ids = [w.id for w in windows]
    assert len(ids) == len(set(ids)) == 2 * 19  # nothing lost, nothing emitted twice
    assert all(w.count == 10 for w in windows)


async def test_windows_and_alerts_carry_the_trace_of_their_window_span(kafka_config: dict[str, Any]) -> None:
    tracer = trace.get_tracer("test-scorer")
    items = episode_items(0, 9)
    producer = KafkaProducer(**kafka_config, acks="all")
    item_spans: dict[tuple[str | None, int], set[int]] = {}  # (ticker, window number): item spans
    for item in items:
        with tracer.start_as_current_span("score news item") as span:
            window_number = int(item.item_id[1:].split("-")[0])
            item_spans.setdefault((item.ticker, window_number), set()).add(span.get_span_context().span_id)
            producer.send(
                SENTIMENT_TOPIC,
                key=item.ticker.encode(),
                value=item.model_dump_json().encode(),
                headers=inject_headers(),
            )
    producer.flush()
    producer.close()
    closed_before = REGISTRY.get_sample_value("infermesh_worker_windows_closed_total") or 0
    alerts_before = REGISTRY.get_sample_value("infermesh_worker_alerts_total") or 0
    SPANS.clear()
    window_stage = stage(kafka_config)
    try:
        await run_until_idle(window_stage, len(items))
    finally:
        close(window_stage)

    window_spans = {s.context.span_id: s for s in SPANS.get_finished_spans() if s.name == "close window" and s.context}
    window_records = read_to_end(kafka_config, WINDOWS_TOPIC, [0, 1])
    assert len(window_records) == len(window_spans) == 2 * 9
    for record in window_records:
        carried = trace.get_current_span(extract_context(record.headers)).get_span_context()
        window_span = window_spans[carried.span_id]
        window = WindowAggregate.model_validate_json(record.value)
        assert (window_span.attributes or {})["infermesh.ticker"] == window.ticker
        # The window's span links the traces of the items counted in it.
        window_number = int((window.window_start - T0) / timedelta(minutes=5))
        assert {link.context.span_id for link in window_span.links} == item_spans[(window.ticker, window_number)]
    (alert_record,) = read_to_end(kafka_config, ALERTS_TOPIC, [0, 1])
    alert_span = trace.get_current_span(extract_context(alert_record.headers)).get_span_context()
    emitted = next(s for s in SPANS.get_finished_spans() if s.name == "emit alert")
    assert emitted.context is not None and emitted.context.span_id == alert_span.span_id
    assert emitted.parent is not None and emitted.parent.span_id in window_spans

    assert REGISTRY.get_sample_value("infermesh_worker_windows_closed_total") == closed_before + 2 * 9
    assert REGISTRY.get_sample_value("infermesh_worker_alerts_total") == alerts_before + 1
    lag = REGISTRY.get_sample_value(
        "infermesh_kafka_consumer_lag_records", {"group": "test-windows", "topic": SENTIMENT_TOPIC, "partition": "0"}
    )
    assert lag == 0, [
        s for m in REGISTRY.collect() if m.name == "infermesh_kafka_consumer_lag_records" for s in m.samples
    ]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_quiet_partition_closes_its_last_window_and_alerts_without_new_records(
    kafka_config: dict[str, Any],
) -> None:
    items = episode_items(0, 8)  # ACME's spike is window 8, the last: nothing comes after it
    produce(kafka_config, items)
    clock = Clock(T0 + timedelta(minutes=44))  # live: the last items (43.6, 43.7 min) just arrived
    idle_before = sample("infermesh_worker_idle_closed_windows_total")
    window_stage = stage(kafka_config, clock=clock)
    try:
        await run_until_idle(window_stage, len(items))
        assert (window_stage.windows_closed, window_stage.alerts_raised) == (2 * 8, 0)
        clock.now += timedelta(seconds=30)  # quiet, but not for a minute yet
        await asyncio.to_thread(window_stage.run_once, 100)
        assert window_stage.windows_closed == 2 * 8
        # No record arrives. The watermark goes on with the clock from 43.7 min and passes
        # 45 min + 1 min of lateness at 46.3 min: window 8 closes on the next poll by then.
        clock.now = T0 + timedelta(minutes=46, seconds=30)
        await asyncio.to_thread(window_stage.run_once, 100)
        assert (window_stage.windows_closed, window_stage.alerts_raised) == (2 * 9, 1)
    finally:
        close(window_stage)
    windows, alerts = outputs(kafka_config)
    assert sorted(w.window_start for w in windows if w.ticker == "ACME")[-1] == T0 + timedelta(minutes=40)
    (alert,) = alerts
    assert alert.ticker == "ACME" and alert.window.window_start == T0 + timedelta(minutes=40)
    assert sample("infermesh_worker_idle_closed_windows_total") == idle_before + 2

    # An item for the idle-closed window reaches the next owner: the window comes back as
    # emitted from the read-back, so the item is left out, and counted.
    produce(kafka_config, [scored("after", "ACME", 44.5)])
    emitted_before = sample("infermesh_worker_dropped_items_total", reason="emitted")
    replacement = stage(kafka_config, clock=clock)
    try:
        await run_until_idle(replacement, 1)
    finally:
        close(replacement)
    assert sample("infermesh_worker_dropped_items_total", reason="emitted") == emitted_before + 1


def news_record(item_id: str, ticker: str, minute: float, label: str) -> bytes:
    published = (T0 + timedelta(minutes=minute)).isoformat()
    headline = f"{ticker} shares {'fall' if label == 'negative' else 'hold'} ({item_id})"
    return json.dumps(
        {"id": item_id, "published_at": published, "source": "test", "headline": headline, "tickers": [ticker]}
    ).encode()


class KeywordScorer:
    """Stands in for the mesh: "fall" is negative, anything else neutral."""

    def classify(self, texts: Sequence[str], timeout_seconds: float) -> ClassifyResult:
        results = []
        for text in texts:
            label = "negative" if " fall " in text else "neutral"
            probabilities = {"negative": 0.9 if label == "negative" else 0.05, "neutral": 0.05, "positive": 0.05}
            probabilities["neutral"] = 1 - probabilities["negative"] - probabilities["positive"]
            score = probabilities["positive"] - probabilities["negative"]
            results.append(Classification(label, probabilities, False, 1, 8, 0, [label], score=score))
        return ClassifyResult("m", "1", results)

    def submit(self, texts: Sequence[str], timeout_seconds: float, model_name: str = "") -> Future[ClassifyResult]:
        future: Future[ClassifyResult] = Future()
        future.set_result(self.classify(texts, timeout_seconds))
        return future


async def score_all(kafka_config: dict[str, Any], settings: MonitorSettings, expected: int) -> None:
    """Runs the scoring stage (the real one, in its real group) until `expected` news
    records are scored and committed, then stops it."""
    scorer = scoring_stage(kafka_config, KeywordScorer(), settings)
    consumer, producer = scorer.consumer, scorer.producer
    seen = 0
    try:
        for _ in range(60):
            seen += (await asyncio.to_thread(scorer.run_once, 500)).records
            if seen >= expected:
                return
        raise AssertionError(f"scored {seen} of {expected} news records")
    finally:
        consumer.close(autocommit=False)
        producer.close()


def produce_news(kafka_config: dict[str, Any], items: list[tuple[str, str, float, str]]) -> None:
    # One news partition: the scorer then emits the backlog in publication order (across
    # partitions it emits one partition's backlog after another's; not what this tests).
    producer = KafkaProducer(**kafka_config, acks="all")
    for item in items:
        producer.send(NEWS_TOPIC, key=item[0].encode(), value=news_record(*item), partition=0)
    producer.flush()
    producer.close()


async def test_a_scoring_stall_longer_than_the_idle_time_drops_nothing_of_its_backlog(
    kafka_config: dict[str, Any],
) -> None:
    settings = MonitorSettings(caught_up_check_seconds=0)  # default windows, lateness and idle time
    live = [
        (f"{t}-live{n}", t, n * 0.2, "negative" if n < 2 else "neutral") for n in range(10) for t in ("ACME", "STDY")
    ]
    # Inference is down from 09:02 to 09:12: news keeps arriving and waits, unscored.
    backlog = [
        (f"{t}-b{n}", t, 2 + n / 6, "negative" if n % 5 == 0 else "neutral")
        for n in range(60)
        for t in ("ACME", "STDY")
    ]
    clock = Clock(T0 + timedelta(minutes=2))
    drops = {reason: sample("infermesh_worker_dropped_items_total", reason=reason) for reason in ("late", "emitted")}
    produce_news(kafka_config, live)
    await score_all(kafka_config, settings, len(live))
    window_stage = stage(kafka_config, settings, clock=clock)
    try:
        await run_until_idle(window_stage, len(live))
        produce_news(kafka_config, backlog)
        # Ten minutes without a scored item: far past the idle time, but the scoring group
        # has not committed the news, so no window may close by the clock.
        for minute in (4, 8, 12):
            clock.now = T0 + timedelta(minutes=minute)
            for _ in range(3):
                await asyncio.to_thread(window_stage.run_once, 100)
        assert window_stage.windows_closed == 0
        # Inference is back: the backlog is scored and windowed, none of it late.
        await score_all(kafka_config, settings, len(backlog))
        await run_until_idle(window_stage, len(backlog))
        assert window_stage.windows_closed == 2 * 2
        # Caught up and quiet: the last windows close by the clock.
        clock.now = T0 + timedelta(minutes=17)
        await asyncio.to_thread(window_stage.run_once, 100)
        assert window_stage.windows_closed == 2 * 3
    finally:
        close(window_stage)
    for reason, before in drops.items():
        assert sample("infermesh_worker_dropped_items_total", reason=reason) == before, reason
    windows, _ = outputs(kafka_config)
    expected: dict[tuple[str, datetime], int] = {}
    for _item_id, ticker, published, _label in [*live, *backlog]:
        key = (ticker, T0 + timedelta(minutes=5 * int(published // 5)))
        expected[key] = expected.get(key, 0) + 1
    assert {(w.ticker, w.window_start): w.count for w in windows} == expected


async def test_the_pipeline_is_caught_up_only_when_everything_published_is_scored_and_read(
    kafka_config: dict[str, Any],
) -> None:
    check = PipelineCaughtUp(kafka_config, "test-scorer")
    assert check({0: 0, 1: 0}) == {0, 1}  # nothing anywhere: a quiet pipeline
    produce_news(kafka_config, [(f"n{n}", "ACME", n, "neutral") for n in range(3)])
    assert check({0: 0, 1: 0}) == set()  # news that no scorer has committed
    scorer_group = KafkaConsumer(**kafka_config, group_id="test-scorer", enable_auto_commit=False)
    try:
        scorer_group.commit({TopicPartition(NEWS_TOPIC, 0): OffsetAndMetadata(2, "", -1)})
        assert check({0: 0, 1: 0}) == set()  # one still unscored
        scorer_group.commit({TopicPartition(NEWS_TOPIC, 0): OffsetAndMetadata(3, "", -1)})
        assert check({0: 0, 1: 0}) == {0, 1}
    finally:
        scorer_group.close(autocommit=False)
    produce(kafka_config, [scored("x", "ACME", 1)])
    (partition,) = {r.partition for r in read_to_end(kafka_config, SENTIMENT_TOPIC, [0, 1])}
    assert check({0: 0, 1: 0}) == {0, 1} - {partition}  # a scored item this stage has not read
    assert check({0: 0, 1: 0} | {partition: 1}) == {0, 1}
    nowhere = [f"127.0.0.1:{free_port()}"]
    unreachable = PipelineCaughtUp({**kafka_config, "bootstrap_servers": nowhere}, "g", timeout_seconds=1)
    assert unreachable({0: 0, 1: 0}) == set()  # doubt is "not caught up"


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_stamp_half_an_hour_ahead_is_dropped_and_counted_and_real_items_are_not_late(
    kafka_config: dict[str, Any],
) -> None:
    now = T0 + timedelta(minutes=44)
    items = episode_items(0, 8)
    bogus = scored("bogus", "ACME", 44 + 30)  # inside the old one-hour bound
    late = scored("late", "ACME", 1)  # window 0, long closed
    produce(kafka_config, [*items[:80], bogus, *items[80:], late])  # after window 3
    future_key = ("infermesh_worker_dropped_items_total", (("reason", "future"),))
    late_key = ("infermesh_worker_dropped_items_total", (("reason", "late"),))
    server = MetricsServer("127.0.0.1", 0)
    window_stage = stage(kafka_config, clock=lambda: now)
    try:
        before = scrape(server)
        await run_until_idle(window_stage, len(items) + 2)
        after = scrape(server)
    finally:
        close(window_stage)
        server.stop()
    windows, _ = outputs(kafka_config)
    # Every real window but the still-open last ones is complete: nothing was dropped as late.
    assert sorted((w.ticker, w.window_start, w.count) for w in windows) == [
        (ticker, T0 + timedelta(minutes=5 * index), 10) for ticker in ("ACME", "STDY") for index in range(8)
    ]
    assert after[future_key] == before[future_key] + 1
    assert after[late_key] == before[late_key] + 1  # the one really late item


class Refused:
    """The acknowledgement of a send the broker refused."""

    def get(self, timeout: float | None = None) -> None:
        raise KafkaTimeoutError("refused")


class RefusingDeadLetters:
    """A producer whose dead letters the broker refuses (until `refuse` is cleared)."""

    def __init__(self, real: KafkaProducer) -> None:
        self.real = real
        self.refuse = True

    def send(self, topic: str, **options: Any) -> Any:
        if topic == DLQ_TOPIC and self.refuse:
            return Refused()
        return self.real.send(topic, **options)

    def flush(self, timeout: float | None = None) -> None:
        self.real.flush(timeout)

    def close(self) -> None:
        self.real.close()


def dead_letters(kafka_config: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {name: value.decode() for name, value in record.headers} for record in read_to_end(kafka_config, DLQ_TOPIC, [0])
    ]


async def test_unreadable_records_on_internal_topics_are_dead_lettered_and_the_stage_keeps_running(
    kafka_config: dict[str, Any],
) -> None:
    good = episode_items(0, 4)
    acme_window = {
        "id": "ACME:x", "ticker": "ACME", "window_start": "9999-12-31T23:55:00Z", "window_end": "9999-12-31T23:59:59Z",
        "count": 1, "mean_score": 0.0, "share_negative": 1.0, "top_negative": [],
    }  # fmt: skip
    overflowing_alert = {
        "id": "ACME:x", "ticker": "ACME", "window": acme_window, "baseline_share_negative": 0.1,
        "baseline_stddev": 0.05, "baseline_windows": 3, "z_score": 9.0,
    }  # fmt: skip
    producer = KafkaProducer(**kafka_config, acks="all")
    producer.send(WINDOWS_TOPIC, key=b"ACME", value=b"\x00 not a window", partition=0)
    producer.send(WINDOWS_TOPIC, key=b"ACME", value=json.dumps(acme_window | {"window_end": "x"}).encode(), partition=1)
    producer.send(ALERTS_TOPIC, key=b"ACME", value=json.dumps(overflowing_alert).encode(), partition=0)  # + cooldown
    producer.send(SENTIMENT_TOPIC, key=b"ACME", value=b"{truncated", partition=1)
    producer.flush()
    producer.close()
    produce(kafka_config, good)
    counted_before = {t: sample("infermesh_worker_internal_dead_lettered_records_total", topic=t) for t in (
        SENTIMENT_TOPIC, WINDOWS_TOPIC, ALERTS_TOPIC)}  # fmt: skip
    window_stage = stage(kafka_config)
    try:
        await run_until_idle(window_stage, len(good) + 1)
        assert window_stage.windows_closed == 2 * 4  # it kept going
        # A rebalance reads the same poison again; this process does not dead-letter it twice.
        window_stage.on_partitions_revoked([TopicPartition(SENTIMENT_TOPIC, n) for n in (0, 1)])
        window_stage.on_partitions_assigned([TopicPartition(SENTIMENT_TOPIC, n) for n in (0, 1)])
    finally:
        close(window_stage)
    letters = sorted(dead_letters(kafka_config), key=lambda h: (h["source-topic"], h["source-partition"]))
    assert [(h["source-topic"], h["source-partition"], h["error-type"]) for h in letters] == [
        (ALERTS_TOPIC, "0", "schema"),
        (SENTIMENT_TOPIC, "1", "not-json"),
        (WINDOWS_TOPIC, "0", "not-json"),
        (WINDOWS_TOPIC, "1", "schema"),
    ]
    assert all(h["error-detail"] and h["source-offset"] == "0" for h in letters)
    for topic, count in ((SENTIMENT_TOPIC, 1), (WINDOWS_TOPIC, 2), (ALERTS_TOPIC, 1)):
        assert (
            sample("infermesh_worker_internal_dead_lettered_records_total", topic=topic)
            == counted_before[topic] + count
        )


async def test_a_dead_letter_sent_on_assignment_counts_only_once_the_broker_has_it(
    kafka_config: dict[str, Any],
) -> None:
    producer = KafkaProducer(**kafka_config, acks="all")
    producer.send(WINDOWS_TOPIC, key=b"ACME", value=b"\x00 not a window", partition=0).get(timeout=10)
    producer.close()
    window_stage = stage(kafka_config)
    refusing = RefusingDeadLetters(window_stage.producer)
    window_stage.producer = refusing
    partitions = [TopicPartition(SENTIMENT_TOPIC, n) for n in (0, 1)]
    try:
        with pytest.raises(KafkaTimeoutError):
            window_stage.on_partitions_assigned(partitions)
        # Not remembered as sent: the next assignment dead-letters it again, and now it lands.
        refusing.refuse = False
        window_stage.on_partitions_assigned(partitions)
    finally:
        close(window_stage)
    assert [(h["source-topic"], h["error-type"]) for h in dead_letters(kafka_config)] == [(WINDOWS_TOPIC, "not-json")]


def test_the_read_back_resets_to_the_earliest_offset_like_the_group() -> None:
    # A committed offset the log no longer holds: the group's consumer re-reads from the log
    # start, so the read-back must find that record's time, not fall back to the lookback.
    reader = restore_reader({"bootstrap_servers": [f"127.0.0.1:{free_port()}"], "api_version": (3, 0)}, "g")
    try:
        assert reader.config["auto_offset_reset"] == "earliest"
    finally:
        reader.close(autocommit=False)


def old_window(ticker: str, index: int) -> bytes:
    start = T0 + timedelta(minutes=5 * index)
    window = WindowAggregate(
        id=window_id(ticker, start), ticker=ticker, window_start=start, window_end=start + timedelta(minutes=5),
        count=10, mean_score=0.0, share_negative=0.1, top_negative=[],
    )  # fmt: skip
    return window.model_dump_json().encode()


def produce_windows(kafka_config: dict[str, Any], stamped: list[tuple[bytes, datetime]]) -> None:
    producer = KafkaProducer(**kafka_config, acks="all", linger_ms=20)
    for value, at in stamped:
        producer.send(WINDOWS_TOPIC, key=b"X", value=value, partition=0, timestamp_ms=int(at.timestamp() * 1000))
    producer.flush()
    producer.close()


async def test_a_rebalance_reads_back_the_lookback_not_the_whole_retention(kafka_config: dict[str, Any]) -> None:
    wall = datetime.now(UTC)
    two_days_ago = [(old_window("OLD", index), wall - timedelta(days=2)) for index in range(2000)]
    last_hour = [(old_window("ACME", index), wall - timedelta(minutes=30)) for index in range(12)]
    produce_windows(kafka_config, [*two_days_ago, *last_hour])
    window_stage = stage(kafka_config, MonitorSettings(restore_lookback_hours=6), clock=lambda: datetime.now(UTC))
    try:
        await until_assigned(window_stage)
        emitted = window_stage.states[0].emitted
    finally:
        close(window_stage)
    assert {window_id("ACME", T0 + timedelta(minutes=5 * index)) for index in range(12)} <= emitted.keys()
    assert sum(key.startswith("OLD:") for key in emitted) <= 1000  # a step or two back, not 2000
    assert window_stage.read_back_records <= 1000


async def test_a_rebalance_reads_back_every_window_emitted_since_the_first_record_it_reads_again(
    kafka_config: dict[str, Any],
) -> None:
    wall = datetime.now(UTC)
    # The committed position is an open window's first record, three days old: the windows
    # emitted since (two days ago) must be known, or re-read items would emit them again.
    producer = KafkaProducer(**kafka_config, acks="all")
    first = scored("open-0", "OLD", 0)
    producer.send(
        SENTIMENT_TOPIC,
        key=b"OLD",
        value=first.model_dump_json().encode(),
        partition=0,
        timestamp_ms=int((wall - timedelta(days=3)).timestamp() * 1000),
    ).get(timeout=10)
    producer.close()
    committer = KafkaConsumer(**kafka_config, group_id="test-windows", enable_auto_commit=False)
    committer.commit({TopicPartition(SENTIMENT_TOPIC, 0): OffsetAndMetadata(0, "", -1)})
    committer.close(autocommit=False)
    produce_windows(kafka_config, [(old_window("OLD", index), wall - timedelta(days=2)) for index in range(1, 2001)])
    window_stage = stage(kafka_config, MonitorSettings(restore_lookback_hours=6), clock=lambda: datetime.now(UTC))
    try:
        await until_assigned(window_stage)
        emitted = window_stage.states[0].emitted
    finally:
        close(window_stage)
    assert sum(key.startswith("OLD:") for key in emitted) == 2000


async def test_the_read_back_lookback_follows_the_stage_clock(kafka_config: dict[str, Any]) -> None:
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    produce_windows(kafka_config, [(old_window("OLD", index), two_days_ago) for index in range(2000)])
    clock = Clock(two_days_ago + timedelta(hours=1))  # by the stage's clock, they are an hour old
    window_stage = stage(kafka_config, MonitorSettings(restore_lookback_hours=6), clock=clock)
    try:
        await until_assigned(window_stage)
        emitted = window_stage.states[0].emitted
    finally:
        close(window_stage)
    assert sum(key.startswith("OLD:") for key in emitted) == 2000
