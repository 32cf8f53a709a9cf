"""The monitor's topics, created explicitly at start-up (never auto-created)."""

from __future__ import annotations

from shared.kafka import TopicSpec
from shared.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    TOPIC_ALERTS_TOPIC,
    TOPIC_SENTIMENT_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    WINDOWS_TOPIC,
)


def monitor_topics(partitions: int = 4, replication: int = 1) -> list[TopicSpec]:
    """Input and outputs share a partition count (each windowing stage restores a
    partition's state from the same partition numbers of its windows and alerts topics);
    the dead-letter topic keeps 14 days."""
    return [
        TopicSpec(NEWS_TOPIC, partitions, replication),
        TopicSpec(SENTIMENT_TOPIC, partitions, replication),
        TopicSpec(WINDOWS_TOPIC, partitions, replication),
        TopicSpec(ALERTS_TOPIC, partitions, replication),
        TopicSpec(TOPIC_SENTIMENT_TOPIC, partitions, replication),
        TopicSpec(TOPIC_WINDOWS_TOPIC, partitions, replication),
        TopicSpec(TOPIC_ALERTS_TOPIC, partitions, replication),
        TopicSpec(DLQ_TOPIC, 1, replication, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
    ]
