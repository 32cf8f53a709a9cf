"""Moved to `shared.messages` (the gateway reads these records too); this path is kept for
code that still imports it."""

from shared.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    EARLIEST_EVENT_TIME,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    HeadlineEvidence,
    Model,
    NewsItem,
    PoisonRecord,
    ScoredItem,
    Ticker,
    WindowAggregate,
    decode_internal,
    decode_news,
    news_json_schema,
)

__all__ = [
    "ALERTS_TOPIC",
    "DLQ_TOPIC",
    "EARLIEST_EVENT_TIME",
    "NEWS_TOPIC",
    "SENTIMENT_TOPIC",
    "WINDOWS_TOPIC",
    "Alert",
    "HeadlineEvidence",
    "Model",
    "NewsItem",
    "PoisonRecord",
    "ScoredItem",
    "Ticker",
    "WindowAggregate",
    "decode_internal",
    "decode_news",
    "news_json_schema",
]
