"""The dashboard feed sized for many gateway replicas, against the real embedded broker: a
feed started over topics full of old records reads only its bounded history (counted
from each partition's high watermark, which the broker gives in fetch responses), keeps
a bounded summary, and still shows what arrives next."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka import KafkaProducer

from gateway.dashboard import TOPICS, DashboardFeed
from gateway.settings import DashboardSettings
from shared.messages import SENTIMENT_TOPIC, WINDOWS_TOPIC, WindowAggregate
from workers.sentiment_monitor.topics import monitor_topics

T0 = datetime(2100, 1, 1, tzinfo=UTC)
PARTITIONS = 2  # as the kafka_config fixture creates the monitor's topics
#: Partitions the feed follows (the dead-letter topic has one).
FOLLOWED = sum(topic.partitions for topic in monitor_topics(partitions=PARTITIONS) if topic.name in TOPICS)


def window(ticker: str, minute: int) -> bytes:
    start = T0 + timedelta(minutes=minute)
    aggregate = WindowAggregate(
        id=f"{ticker}:{start.isoformat()}",
        ticker=ticker,
        window_start=start,
        window_end=start + timedelta(minutes=1),
        count=3,
        mean_score=-0.5,
        share_negative=0.5,
        top_negative=[],
    )
    return aggregate.model_dump_json().encode()


def publish(kafka_config: dict[str, Any], records: list[tuple[str, int, bytes]]) -> None:
    """(topic, partition, value) records, in order."""
    producer = KafkaProducer(**kafka_config, acks="all", linger_ms=20)
    for topic, partition, value in records:
        producer.send(topic, partition=partition, value=value)
    producer.flush()
    producer.close()


def wait_for(condition: Callable[[dict[str, Any]], bool], feed: DashboardFeed, seconds: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        state = feed.snapshot()
        if condition(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


@pytest.fixture
def start_feed(kafka_config: dict[str, Any]) -> Iterator[Callable[[DashboardSettings], DashboardFeed]]:
    feeds: list[DashboardFeed] = []

    def start(settings: DashboardSettings) -> DashboardFeed:
        feed = DashboardFeed(kafka_config, "infermesh-scorer", settings)
        feed.start()
        feeds.append(feed)
        return feed

    yield start
    for feed in feeds:
        feed.stop()


def test_a_new_feed_loads_only_the_bounded_history_then_follows_new_records(
    kafka_config: dict[str, Any], start_feed: Callable[[DashboardSettings], DashboardFeed]
) -> None:
    old_scored = 1500  # per partition
    old_tickers = 120  # one window each, spread over both partitions
    publish(
        kafka_config,
        [(SENTIMENT_TOPIC, p, b"{}") for p in range(PARTITIONS) for _ in range(old_scored)]
        + [(WINDOWS_TOPIC, i % PARTITIONS, window(f"T{i:03d}", i)) for i in range(old_tickers)],
    )
    history = 40
    feed = start_feed(DashboardSettings(history_records=history, max_tickers=50, windows_per_ticker=4))

    # Exactly `history` records per partition: the newest ones, not the first ones.
    state = wait_for(lambda s: s["scored_total"] >= PARTITIONS * history and len(s["tickers"]) >= 50, feed)
    time.sleep(2)  # anything beyond the history would have arrived by now
    state = feed.snapshot()
    assert state["scored_total"] == PARTITIONS * history
    assert state["scored_per_second"] == 0, "history is not throughput"
    # The newest `history` windows of each partition (T040..T119), of which the 50 tickers
    # with the newest windows are kept.
    newest = {f"T{i:03d}" for i in range(old_tickers - 50, old_tickers)}
    assert set(state["tickers"]) == newest

    # New records still arrive, and the summary stays bounded.
    publish(
        kafka_config,
        [(SENTIMENT_TOPIC, p, b"{}") for p in range(PARTITIONS) for _ in range(7)]
        + [(WINDOWS_TOPIC, 0, window("NEWCO", 1000 + minute)) for minute in range(10)],
    )
    state = wait_for(lambda s: s["scored_total"] == PARTITIONS * (history + 7) and "NEWCO" in s["tickers"], feed)
    assert state["scored_total"] == PARTITIONS * (history + 7)
    assert state["scored_per_second"] > 0
    assert len(state["tickers"]["NEWCO"]) == 4
    assert [w["start"] for w in state["tickers"]["NEWCO"]][-1] == (T0 + timedelta(minutes=1009)).isoformat()
    assert len(state["tickers"]) == 50


def test_history_zero_shows_only_new_records(
    kafka_config: dict[str, Any], start_feed: Callable[[DashboardSettings], DashboardFeed]
) -> None:
    publish(kafka_config, [(SENTIMENT_TOPIC, p, b"{}") for p in range(PARTITIONS) for _ in range(300)])
    feed = start_feed(DashboardSettings(history_records=0))
    # The feed is positioned once a fetch of each partition answered; wait for that.
    deadline = time.monotonic() + 30
    while feed.positioned() < FOLLOWED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert feed.positioned() == FOLLOWED
    publish(kafka_config, [(SENTIMENT_TOPIC, 1, b"{}") for _ in range(5)])
    wait_for(lambda s: s["scored_total"] >= 5, feed)
    time.sleep(1)
    assert feed.snapshot()["scored_total"] == 5
