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
from kafka import KafkaAdminClient, KafkaConsumer
from pydantic import ValidationError

from workers.sentiment_monitor.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    WindowAggregate,
)

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "dashboard.html"


class DashboardFeed:
    """A bounded summary of windows, alerts, throughput and lag; thread-safe snapshots."""

    def __init__(
        self, client_config: dict[str, Any], scorer_group: str, windows_per_ticker: int = 96, alerts: int = 20
    ) -> None:
        self._client = client_config
        self._scorer_group = scorer_group
        self._lock = threading.Lock()
        self._windows: dict[str, dict[str, dict[str, Any]]] = {}
        self._windows_per_ticker = windows_per_ticker
        self._alerts: deque[dict[str, Any]] = deque(maxlen=alerts)
        self._scored_at: deque[float] = deque()
        self._scored_total = 0
        self._dead_letters = 0
        self._lag: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            while self._scored_at and self._scored_at[0] < now - 10:
                self._scored_at.popleft()
            return {
                "tickers": {
                    ticker: sorted(windows.values(), key=lambda w: str(w["start"]))
                    for ticker, windows in sorted(self._windows.items())
                },
                "alerts": list(reversed(self._alerts)),
                "scored_total": self._scored_total,
                "scored_per_second": len(self._scored_at) / 10,
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
        consumer = KafkaConsumer(**self._client, auto_offset_reset="earliest", enable_auto_commit=False)
        admin: KafkaAdminClient | None = None
        next_lag = 0.0
        try:
            consumer.subscribe([WINDOWS_TOPIC, ALERTS_TOPIC, SENTIMENT_TOPIC, DLQ_TOPIC, NEWS_TOPIC])
            admin = KafkaAdminClient(**self._client)
            while not self._stop.is_set():
                for partition, records in consumer.poll(timeout_ms=500).items():
                    self._ingest(partition.topic, records)
                if time.monotonic() >= next_lag:
                    self._lag = self._scorer_lag(consumer, admin)
                    next_lag = time.monotonic() + 2
        finally:
            consumer.close(autocommit=False)
            if admin is not None:
                admin.close()

    def _ingest(self, topic: str, records: list[Any]) -> None:
        with self._lock:
            if topic == SENTIMENT_TOPIC:
                now = time.monotonic()
                self._scored_total += len(records)
                self._scored_at.extend([now] * len(records))
                while self._scored_at and self._scored_at[0] < now - 10:
                    self._scored_at.popleft()
            elif topic == DLQ_TOPIC:
                self._dead_letters += len(records)
            for record in records:
                try:
                    if topic == WINDOWS_TOPIC:
                        self._add_window(WindowAggregate.model_validate_json(record.value))
                    elif topic == ALERTS_TOPIC:
                        self._alerts.append(json.loads(Alert.model_validate_json(record.value).model_dump_json()))
                except ValidationError:
                    logger.warning("unreadable record on %s", topic)

    def _add_window(self, window: WindowAggregate) -> None:
        windows = self._windows.setdefault(window.ticker, {})
        windows[window.id] = {
            "start": window.window_start.isoformat(),
            "count": window.count,
            "mean_score": round(window.mean_score, 4),
            "share_negative": round(window.share_negative, 4),
        }
        while len(windows) > self._windows_per_ticker:
            del windows[min(windows, key=lambda key: str(windows[key]["start"]))]

    def _scorer_lag(self, consumer: KafkaConsumer, admin: KafkaAdminClient) -> int | None:
        """Records on finance.news.v1 the scoring group has not committed yet."""
        ends = {p: consumer.highwater(p) for p in consumer.assignment() if p.topic == NEWS_TOPIC}
        if not ends or any(end is None for end in ends.values()):
            return None
        offsets = admin.list_group_offsets({self._scorer_group: None}).get(self._scorer_group, {})
        committed = {p: o.offset for p, o in offsets.items() if p.topic == NEWS_TOPIC}
        return int(sum(max(0, (end or 0) - committed.get(p, 0)) for p, end in ends.items()))


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
