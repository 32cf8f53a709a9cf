"""The windowing stage: `finance.sentiment.v1` in; windows and alerts out.

Scored items are keyed by ticker, so each ticker's items sit in one partition and one
member of the group owns its windows. State survives restarts and rebalances:
- open windows: offsets are committed only up to the earliest record still held in an
  open window, so the next owner re-reads exactly what it needs to rebuild them;
- alert baselines and cooldowns: rebuilt on assignment from the windows and alerts
  already emitted (same ticker keys, so the same partition numbers);
- emitted window ids are remembered, so re-read records never re-open a window that
  was already emitted, and no alert is raised twice.

Each closed window gets a span linking the traces of (up to MAX_WINDOW_LINKS of) the
items in it; the window and any alert carry that span's context in their headers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from opentelemetry import trace
from pydantic import ValidationError

from shared.kafka import observe_lag, read_to_end
from shared.kafka_tracing import extract_context, inject_headers
from shared.metrics import KAFKA_CONSUMED, KAFKA_PRODUCED, WORKER_ALERTS, WORKER_BATCH_DURATION, WORKER_WINDOWS_CLOSED
from workers.sentiment_monitor.core import AlertRule, AlertSettings, TumblingWindows, WindowSettings
from workers.sentiment_monitor.messages import (
    ALERTS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    ScoredItem,
    WindowAggregate,
)
from workers.sentiment_monitor.settings import MonitorSettings

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

REMEMBERED_WINDOWS = 50_000
"""Emitted window ids kept per partition to reject replays (oldest forgotten first)."""
MAX_WINDOW_LINKS = 32
"""Item traces a window's span links to; a busy window would otherwise carry thousands."""


@dataclass
class PartitionState:
    windows: TumblingWindows
    rule: AlertRule
    emitted: OrderedDict[str, None] = field(default_factory=OrderedDict)
    first_offset: dict[str, int] = field(default_factory=dict)
    """Offset of the first record of each open window."""
    links: dict[str, list[trace.Link]] = field(default_factory=dict)
    """Traces of the first items of each open window."""
    next_offset: int | None = None

    def remember_emitted(self, window_id: str) -> None:
        self.emitted[window_id] = None
        while len(self.emitted) > REMEMBERED_WINDOWS:
            self.emitted.popitem(last=False)

    def commit_offset(self) -> int | None:
        return min(self.first_offset.values(), default=self.next_offset)


def window_settings(settings: MonitorSettings) -> WindowSettings:
    return WindowSettings(
        size=timedelta(minutes=settings.window_minutes),
        allowed_lateness=timedelta(seconds=settings.allowed_lateness_seconds),
    )


def alert_settings(settings: MonitorSettings) -> AlertSettings:
    return AlertSettings(
        min_items=settings.alert_min_items,
        z_threshold=settings.alert_z_threshold,
        min_share_negative=settings.alert_min_share_negative,
        baseline_windows=settings.alert_baseline_windows,
        cooldown=timedelta(minutes=settings.alert_cooldown_minutes),
    )


class WindowStage(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        client_config: dict[str, Any],
        settings: MonitorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.client_config = client_config
        self.settings = settings
        self.clock = clock
        self.states: dict[int, PartitionState] = {}
        self.alerts_raised = 0
        self.windows_closed = 0
        self._stopping = threading.Event()
        self.assigned_partitions = 0
        """Partitions the group gave this stage, as of its last poll (for readiness)."""

    # ConsumerRebalanceListener: called inside poll().
    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for partition in revoked:
            self.states.pop(partition.partition, None)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        numbers = sorted(p.partition for p in assigned)
        for number in numbers:
            self.states[number] = PartitionState(
                TumblingWindows(window_settings(self.settings)), AlertRule(alert_settings(self.settings))
            )
        windows = read_to_end(self.client_config, WINDOWS_TOPIC, numbers)
        for record in sorted(windows, key=lambda r: r.timestamp):
            window = WindowAggregate.model_validate_json(record.value)
            state = self.states[record.partition]
            if window.id not in state.emitted:
                state.rule.remember(window)
                state.remember_emitted(window.id)
        for record in read_to_end(self.client_config, ALERTS_TOPIC, numbers):
            self.states[record.partition].rule.remember_alert(Alert.model_validate_json(record.value))
        logger.info("windowing partitions %s (%d emitted windows restored)", numbers, len(windows))

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        self.consumer.subscribe([SENTIMENT_TOPIC], listener=self)
        while not self._stopping.is_set():
            self.run_once()

    def run_once(self, timeout_ms: int = 500) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.max_batch)
        self.assigned_partitions = observe_lag(self.consumer)
        started = time.perf_counter()
        acks = []
        touched: list[TopicPartition] = []
        now = self.clock()
        for partition, records in polled.items():
            state = self.states.get(partition.partition)
            if state is None:
                continue  # revoked meanwhile
            touched.append(partition)
            KAFKA_CONSUMED.labels(SENTIMENT_TOPIC).inc(len(records))
            for record in records:
                state.next_offset = record.offset + 1
                try:
                    item = ScoredItem.model_validate_json(record.value)
                except ValidationError:
                    logger.error("skipping an unreadable scored item at %s@%d", partition, record.offset)
                    continue
                window = state.windows.window_of(item)
                if window is None or window in state.emitted:
                    continue
                if state.windows.add(item, now):
                    state.first_offset.setdefault(window, record.offset)
                    self._link(state, window, record.headers)
            for closed in state.windows.close_due():
                acks.append(self._emit(state, closed))
        if not touched:
            return 0
        self.producer.flush()
        for ack in acks:
            ack.get(timeout=30)
        KAFKA_PRODUCED.labels(WINDOWS_TOPIC).inc(len(acks))
        offsets = {}
        for partition in touched:
            offset = self.states[partition.partition].commit_offset()
            if offset is not None:
                offsets[partition] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)
        WORKER_BATCH_DURATION.labels("windows").observe(time.perf_counter() - started)
        return sum(len(r) for r in polled.values())

    @staticmethod
    def _link(state: PartitionState, window: str, headers: list[tuple[str, bytes]] | None) -> None:
        links = state.links.setdefault(window, [])
        if len(links) < MAX_WINDOW_LINKS:
            item_span = trace.get_current_span(extract_context(headers)).get_span_context()
            if item_span.is_valid:
                links.append(trace.Link(item_span))

    def _emit(self, state: PartitionState, closed: WindowAggregate) -> Any:
        """Raises the window's alert if due, then sends the window; returns the window's ack."""
        with _tracer.start_as_current_span(
            "close window",
            links=state.links.pop(closed.id, []),
            attributes={"infermesh.ticker": closed.ticker, "infermesh.items": closed.count},
        ):
            alert = state.rule.observe(closed)
            if alert is not None:
                with _tracer.start_as_current_span("emit alert", attributes={"infermesh.ticker": alert.ticker}):
                    logger.warning(
                        "alert %s: share negative %.2f vs baseline %.2f",
                        alert.id,
                        closed.share_negative,
                        alert.baseline_share_negative,
                    )
                    # The alert is acknowledged before its window is written: a restart
                    # treats emitted windows as done, so the window must never land alone.
                    self.producer.send(
                        ALERTS_TOPIC,
                        key=alert.ticker.encode(),
                        value=alert.model_dump_json().encode(),
                        headers=inject_headers(),
                    ).get(timeout=30)
                KAFKA_PRODUCED.labels(ALERTS_TOPIC).inc()
                WORKER_ALERTS.inc()
                self.alerts_raised += 1
            ack = self.producer.send(
                WINDOWS_TOPIC,
                key=closed.ticker.encode(),
                value=closed.model_dump_json().encode(),
                headers=inject_headers(),
            )
        state.remember_emitted(closed.id)
        state.first_offset.pop(closed.id, None)
        self.windows_closed += 1
        WORKER_WINDOWS_CLOSED.inc()
        return ack
