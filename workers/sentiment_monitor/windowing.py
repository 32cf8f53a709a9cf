"""The windowing stage: `finance.sentiment.v1` in; windows and alerts out.

Scored items are keyed by ticker, so each ticker's items sit in one partition and one
member of the group owns its windows. State survives restarts and rebalances:
- open windows: offsets are committed only up to the earliest record still held in an
  open window, so the next owner re-reads exactly what it needs to rebuild them;
- alert baselines and cooldowns: rebuilt on assignment from the windows and alerts
  already emitted (same ticker keys, so the same partition numbers);
- emitted window ids are remembered, so re-read records never re-open a window that
  was already emitted, and no alert is raised twice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError

from shared.kafka import read_to_end
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

REMEMBERED_WINDOWS = 50_000
"""Emitted window ids kept per partition to reject replays (oldest forgotten first)."""


@dataclass
class PartitionState:
    windows: TumblingWindows
    rule: AlertRule
    emitted: OrderedDict[str, None] = field(default_factory=OrderedDict)
    first_offset: dict[str, int] = field(default_factory=dict)
    """Offset of the first record of each open window."""
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
        acks = []
        touched: list[TopicPartition] = []
        now = self.clock()
        for partition, records in polled.items():
            state = self.states.get(partition.partition)
            if state is None:
                continue  # revoked meanwhile
            touched.append(partition)
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
            for closed in state.windows.close_due():
                alert = state.rule.observe(closed)
                if alert is not None:
                    logger.warning(
                        "alert %s: share negative %.2f vs baseline %.2f",
                        alert.id,
                        closed.share_negative,
                        alert.baseline_share_negative,
                    )
                    # The alert is acknowledged before its window is written: a restart
                    # treats emitted windows as done, so the window must never land alone.
                    self.producer.send(
                        ALERTS_TOPIC, key=alert.ticker.encode(), value=alert.model_dump_json().encode()
                    ).get(timeout=30)
                    self.alerts_raised += 1
                acks.append(
                    self.producer.send(
                        WINDOWS_TOPIC, key=closed.ticker.encode(), value=closed.model_dump_json().encode()
                    )
                )
                state.remember_emitted(closed.id)
                state.first_offset.pop(closed.id, None)
                self.windows_closed += 1
        if not touched:
            return 0
        self.producer.flush()
        for ack in acks:
            ack.get(timeout=30)
        offsets = {}
        for partition in touched:
            offset = self.states[partition.partition].commit_offset()
            if offset is not None:
                offsets[partition] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)
        return sum(len(r) for r in polled.values())
