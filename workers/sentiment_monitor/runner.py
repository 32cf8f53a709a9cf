"""Keeps a stage running across broker failures: when its Kafka clients fail (the broker
restarted and forgot our producer id and group, a partition leader vanished), the stage
is rebuilt on fresh clients once the broker answers again. Records it had not committed
are consumed again, so nothing is skipped: at least once, as always."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from kafka.errors import KafkaError

from shared.kafka import TopicSpec, broker_reachable, ensure_topics
from shared.metrics import WORKER_CLIENT_RESETS

logger = logging.getLogger(__name__)


class Stage(Protocol):
    consumer: Any
    producer: Any
    assigned_partitions: int

    def run(self) -> None: ...

    def stop(self) -> None: ...


class StageRunner:
    def __init__(
        self,
        name: str,
        build: Callable[[], Stage],
        client_config: dict[str, Any],
        topics: list[TopicSpec],
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.name = name
        self._build = build
        self._client_config = client_config
        self._topics = topics
        self._max_backoff = max_backoff_seconds
        self._stopping = threading.Event()
        self._stage: Stage | None = None
        self.resets = 0

    @property
    def assigned_partitions(self) -> int:
        return self._stage.assigned_partitions if self._stage is not None else 0

    def stop(self) -> None:
        """Finish the current batch, commit and return from `run`."""
        self._stopping.set()
        if self._stage is not None:
            self._stage.stop()

    def run(self) -> None:
        """Runs the stage until `stop`; any error other than a Kafka client failure
        propagates (the process exits and its records stay uncommitted)."""
        while not self._stopping.is_set():
            stage = self._stage = self._build()
            if self._stopping.is_set():  # a stop that arrived while the stage was built
                stage.stop()
            try:
                stage.run()
                return
            except KafkaError as error:
                self.resets += 1
                WORKER_CLIENT_RESETS.labels(self.name).inc()
                logger.warning("%s: Kafka clients failed (%s); recreating them", self.name, error)
            finally:
                stage.consumer.close(autocommit=False)  # leave the group at once; commits happen per batch
                stage.producer.close(timeout=5)
            self._wait_for_broker()

    def _wait_for_broker(self) -> None:
        """Backs off until the broker accepts connections and our topics exist again
        (an embedded, memory-only broker comes back empty)."""
        delay = 0.5
        while not self._stopping.wait(delay):
            if broker_reachable(self._client_config["bootstrap_servers"]):
                try:
                    ensure_topics(self._client_config, self._topics, timeout_seconds=5)
                    return
                except Exception as error:
                    logger.warning("%s: topics not ready yet (%s)", self.name, error)
            delay = min(delay * 2, self._max_backoff)
