"""The windowing stage against the real embedded broker: windows, one alert per episode,
and no duplicate alert or window after a restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from opentelemetry import trace
from prometheus_client import REGISTRY

from shared.kafka import read_to_end
from shared.kafka_tracing import extract_context, inject_headers
from tests.conftest import SPANS
from workers.sentiment_monitor.messages import ALERTS_TOPIC, SENTIMENT_TOPIC, WINDOWS_TOPIC, Alert, WindowAggregate
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.windowing import WindowStage

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


def stage(kafka_config: dict[str, Any]) -> WindowStage:
    consumer = KafkaConsumer(
        **kafka_config,
        group_id="test-windows",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1500,
    )
    producer = KafkaProducer(**kafka_config, acks="all", enable_idempotence=True)
    window_stage = WindowStage(
        consumer, producer, kafka_config, MonitorSettings(), clock=lambda: T0 + timedelta(days=1)
    )
    consumer.subscribe([SENTIMENT_TOPIC], listener=window_stage)
    return window_stage


async def run_until_idle(window_stage: WindowStage, expected: int) -> None:
    seen, idle = 0, 0
    while idle < 3:
        count = await asyncio.to_thread(window_stage.run_once, 500)
        seen += count
        idle = idle + 1 if count == 0 and seen >= expected else 0


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
