"""The monitor's scoring stage on a test broker, with the clients the worker gives it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer

from shared.messages import NEWS_TOPIC
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import NewsScorer, Scorer
from workers.sentiment_monitor.runner import group_consumer
from workers.sentiment_monitor.settings import MonitorSettings


def scoring_stage(
    kafka_config: dict[str, Any],
    scorer: Scorer,
    settings: MonitorSettings,
    *,
    group: str = "",
    attributor: TickerAttributor | None = None,
    sleep: Callable[[float], None] | None = None,
) -> NewsScorer:
    """A NewsScorer subscribed to `finance.news.v1` in `group` (default: the settings'
    scoring group), ready for `run_once`; its consumer is the worker's own (`group_consumer`).
    `sleep`: the retries' back-off (default: real sleeps)."""
    consumer = group_consumer(kafka_config, group or settings.scorer_group, settings.max_batch)
    consumer.subscribe([NEWS_TOPIC])
    producer = KafkaProducer(**kafka_config, acks="all", enable_idempotence=True)
    attributor = attributor or TickerAttributor.from_csv(settings.companies_csv)
    if sleep is None:
        return NewsScorer(consumer, producer, scorer, attributor, settings)
    return NewsScorer(consumer, producer, scorer, attributor, settings, sleep=sleep)
