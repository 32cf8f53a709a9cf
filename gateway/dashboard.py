"""The live monitoring dashboard: a feed that follows the monitor's output topics in a
background thread, a server-sent-events stream of its summary, and the page."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from pydantic import ValidationError

from gateway.settings import DashboardSettings
from shared.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    TOPIC_ALERTS_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    TopicAlert,
    TopicWindow,
    WindowAggregate,
)

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "dashboard.html"


#: The topics the feed follows.
TOPICS = (
    WINDOWS_TOPIC,
    ALERTS_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    TOPIC_ALERTS_TOPIC,
    SENTIMENT_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
)

#: Entries of a window's mix (topics of a ticker, tickers of a topic) the summary keeps.
MIX_ENTRIES = 5

#: Seconds of throughput `scored_per_second` averages over.
RATE_SECONDS = 10


class DashboardFeed:
    """A bounded summary of ticker and topic windows, their alerts, throughput and lag;
    thread-safe snapshots.

    Sized for many gateway replicas, each with its own feed: a partition is read from
    `history_records` before its high watermark, never from the earliest offset, and the
    summary keeps a bounded number of tickers, topics, windows and alerts (topics are
    bounded like tickers, by `max_tickers` and `windows_per_ticker`). The high watermark comes
    from the first fetch of the partition (`consumer.highwater`), not from `end_offsets`,
    `seek_to_end` or `offsets_for_times`, which the embedded broker answers wrongly."""

    def __init__(
        self, client_config: dict[str, Any], scorer_group: str, settings: DashboardSettings | None = None
    ) -> None:
        self._client = client_config
        self._scorer_group = scorer_group
        self._settings = settings or DashboardSettings()
        self._lock = threading.Lock()
        self._windows: dict[str, dict[str, dict[str, Any]]] = {}
        self._newest: dict[str, str] = {}  # ticker: start of its newest window
        self._topics: dict[str, dict[str, dict[str, Any]]] = {}
        self._topic_newest: dict[str, str] = {}  # topic: start of its newest window
        self._alerts: deque[dict[str, Any]] = deque(maxlen=self._settings.alerts)
        self._topic_alerts: deque[dict[str, Any]] = deque(maxlen=self._settings.alerts)
        # (whole monotonic second, records scored live in it): RATE_SECONDS + 1 entries at most.
        self._scored_per_second: deque[list[int]] = deque(maxlen=RATE_SECONDS + 1)
        self._scored_total = 0
        self._dead_letters = 0
        self._lag: int | None = None
        # Per partition of the current consumer: (first offset kept, first live offset).
        self._starts: dict[TopicPartition, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def positioned(self) -> int:
        """Partitions whose start is fixed (their first fetch answered): the feed shows
        every record that arrives on them from now on."""
        return len(self._starts)

    def snapshot(self) -> dict[str, Any]:
        second = int(time.monotonic())
        with self._lock:
            recent = sum(count for at, count in self._scored_per_second if at > second - RATE_SECONDS)
            return {
                "tickers": {
                    ticker: sorted(windows.values(), key=lambda w: str(w["start"]))
                    for ticker, windows in sorted(self._windows.items())
                },
                "topics": {
                    topic: sorted(windows.values(), key=lambda w: str(w["start"]))
                    for topic, windows in sorted(self._topics.items())
                },
                "alerts": list(reversed(self._alerts)),
                "topic_alerts": list(reversed(self._topic_alerts)),
                "scored_total": self._scored_total,
                "scored_per_second": recent / RATE_SECONDS,
                "dead_letters": self._dead_letters,
                "consumer_lag": self._lag,
            }

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:
                logger.exception("dashboard feed lost Kafka; retrying in 2 s")
                self._stop.wait(2)

    def _follow(self) -> None:
        fetch_max = self._settings.fetch_max_bytes
        consumer = KafkaConsumer(
            **self._client,
            # A partition's first fetch starts at its earliest offset only to learn its
            # high watermark; `_bound` then moves it to its bounded history.
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=fetch_max,
            max_partition_fetch_bytes=min(fetch_max, 1024 * 1024),
            # Topics are created by their owners (the worker, Strimzi), never by a reader.
            allow_auto_create_topics=False,
            # ...and so are partitions: a new one is followed within this.
            metadata_max_age_ms=30_000,
        )
        admin: KafkaAdminClient | None = None
        next_lag = 0.0
        self._starts = {}  # a new consumer positions every partition afresh
        try:
            consumer.subscribe(list(TOPICS))
            admin = KafkaAdminClient(**self._client)
            while not self._stop.is_set():
                for partition, records in consumer.poll(timeout_ms=500).items():
                    self._ingest(partition.topic, self._bound(consumer, partition, records))
                for partition in consumer.assignment():
                    if partition not in self._starts:
                        self._bound(consumer, partition, [])
                if time.monotonic() >= next_lag:
                    self._lag = self._scorer_lag(consumer, admin)
                    next_lag = time.monotonic() + 2
        finally:
            consumer.close(autocommit=False)
            if admin is not None:
                admin.close()

    def _bound(self, consumer: KafkaConsumer, partition: TopicPartition, records: list[Any]) -> list[Any]:
        """The records of `partition` inside its bounded history. The first time its high
        watermark is known, the partition's start is fixed at `history_records` before it
        (and the consumer moved there if it is still behind); records before the start are
        dropped, whether already fetched or not."""
        if partition not in self._starts:
            highwater = consumer.highwater(partition)
            if highwater is None:
                return records  # no fetch answered yet (or a broker without watermarks)
            start = max(0, highwater - self._settings.history_records)
            self._starts[partition] = (start, highwater)
            if consumer.position(partition) < start:
                consumer.seek(partition, start)
        start = self._starts[partition][0]
        return [record for record in records if record.offset >= start]

    def _ingest(self, topic: str, records: list[Any]) -> None:
        if not records:
            return
        with self._lock:
            if topic == SENTIMENT_TOPIC:
                self._scored_total += len(records)
                partition = TopicPartition(topic, records[0].partition)
                live_from = self._starts.get(partition, (0, 0))[1]
                live = sum(1 for record in records if record.offset >= live_from)
                if live:
                    second = int(time.monotonic())
                    if self._scored_per_second and self._scored_per_second[-1][0] == second:
                        self._scored_per_second[-1][1] += live
                    else:
                        self._scored_per_second.append([second, live])
            elif topic == DLQ_TOPIC:
                self._dead_letters += len(records)
            for record in records:
                try:
                    if topic == WINDOWS_TOPIC:
                        self._add_window(WindowAggregate.model_validate_json(record.value))
                    elif topic == ALERTS_TOPIC:
                        self._alerts.append(json.loads(Alert.model_validate_json(record.value).model_dump_json()))
                    elif topic == TOPIC_WINDOWS_TOPIC:
                        self._add_topic_window(TopicWindow.model_validate_json(record.value))
                    elif topic == TOPIC_ALERTS_TOPIC:
                        alert = TopicAlert.model_validate_json(record.value)
                        self._topic_alerts.append(json.loads(alert.model_dump_json()))
                except ValidationError:
                    logger.warning("unreadable record on %s", topic)

    def _add_window(self, window: WindowAggregate) -> None:
        entry = _summary(window) | {
            "topics": dict(list(window.topics.items())[:MIX_ENTRIES]),
            "negative_topics": dict(list(window.negative_topics.items())[:MIX_ENTRIES]),
        }
        self._keep(self._windows, self._newest, window.ticker, window.id, entry)

    def _add_topic_window(self, window: TopicWindow) -> None:
        entry = _summary(window) | {
            "tickers": dict(list(window.tickers.items())[:MIX_ENTRIES]),
            "without_ticker": window.without_ticker,
        }
        self._keep(self._topics, self._topic_newest, window.topic, window.id, entry)

    def _keep(
        self,
        store: dict[str, dict[str, dict[str, Any]]],
        newest: dict[str, str],
        key: str,
        window_id: str,
        entry: dict[str, Any],
    ) -> None:
        """Keeps a window of `key` (a ticker or a topic), bounded per key and in keys."""
        start = str(entry["start"])
        windows = store.setdefault(key, {})
        windows[window_id] = entry
        newest[key] = max(start, newest.get(key, start))
        while len(windows) > self._settings.windows_per_ticker:
            del windows[min(windows, key=lambda old: str(windows[old]["start"]))]
        while len(store) > self._settings.max_tickers:
            stalest = min(newest, key=lambda old: newest[old])
            del store[stalest], newest[stalest]

    def _scorer_lag(self, consumer: KafkaConsumer, admin: KafkaAdminClient) -> int | None:
        """Records on finance.news.v1 the scoring group has not committed yet."""
        ends = {p: consumer.highwater(p) for p in consumer.assignment() if p.topic == NEWS_TOPIC}
        if not ends or any(end is None for end in ends.values()):
            return None
        offsets = admin.list_group_offsets({self._scorer_group: None}).get(self._scorer_group, {})
        committed = {p: o.offset for p, o in offsets.items() if p.topic == NEWS_TOPIC}
        return int(sum(max(0, (end or 0) - committed.get(p, 0)) for p, end in ends.items()))


def _summary(window: WindowAggregate | TopicWindow) -> dict[str, Any]:
    return {
        "start": window.window_start.isoformat(),
        "count": window.count,
        "mean_score": round(window.mean_score, 4),
        "share_negative": round(window.share_negative, 4),
    }


router = APIRouter(include_in_schema=False)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/dashboard/events")
async def dashboard_events(request: Request) -> StreamingResponse:
    """Server-sent events: the feed's summary once a second."""
    feed: DashboardFeed = request.app.state.dashboard

    async def events() -> AsyncIterator[bytes]:
        while not await request.is_disconnected():
            yield f"data: {json.dumps(feed.snapshot())}\n\n".encode()
            await asyncio.sleep(1)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
