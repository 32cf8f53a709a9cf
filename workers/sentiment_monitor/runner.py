"""Keeps a stage running across broker failures. The stage is rebuilt on fresh clients once
the broker answers again when its Kafka clients fail (the broker restarted and forgot our
producer id and group, a partition leader vanished), and also when the bootstrap brokers
stop accepting connections: clients that outlive a broker restart can sit in a group it
no longer knows, at positions in topics it recreated. Records the stage had not committed
are consumed again, so nothing is skipped: at least once, as always."""

from __future__ import annotations

import logging
import threading
import time
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
        probe_seconds: float = 0.5,
    ) -> None:
        self.name = name
        self._build = build
        self._client_config = client_config
        self._topics = topics
        self._max_backoff = max_backoff_seconds
        self._probe_seconds = probe_seconds
        self._stopping = threading.Event()
        self._rebuild_reason: str | None = None
        """Set by the watcher: why the current stage should be rebuilt on fresh clients."""
        self._stage: Stage | None = None
        self._built_at = 0.0
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
        watcher = threading.Thread(target=self._watch, name=f"{self.name}-kafka-watch", daemon=True)
        watcher.start()
        while not self._stopping.is_set():
            self._rebuild_reason = None
            stage = self._stage = self._build()
            self._built_at = time.monotonic()
            if self._stopping.is_set():  # a stop that arrived while the stage was built
                stage.stop()
            try:
                stage.run()
                if self._rebuild_reason is None or self._stopping.is_set():
                    return
                reason = self._rebuild_reason
            except KafkaError as error:
                reason = f"Kafka clients failed ({error})"
            finally:
                stage.consumer.close(autocommit=False)  # leave the group at once; commits happen per batch
                stage.producer.close(timeout=5)
            self.resets += 1
            WORKER_CLIENT_RESETS.labels(self.name).inc()
            logger.warning("%s: %s; recreating its Kafka clients", self.name, reason)
            self._wait_for_broker()

    def _watch(self) -> None:
        """Asks for a rebuild (the stage finishes its batch, then `run` makes a new one)
        when the broker stops accepting connections, or when it accepts them again and
        the stage still predates the outage (the first request did not take)."""
        down_since: float | None = None
        while not self._stopping.wait(self._probe_seconds):
            stage, built_at, reason = self._stage, self._built_at, None
            if not broker_reachable(self._client_config["bootstrap_servers"]):
                if down_since is None:
                    down_since = time.monotonic()
                    # Let go of the clients while it is down: a consumer that rejoins a
                    # restarted broker and is closed mid-join can leave its group waiting
                    # for a leader that never syncs (seen with the embedded broker).
                    reason = "the broker stopped accepting connections"
            else:
                if down_since is not None and built_at < down_since:
                    reason = "the broker came back after being unreachable"
                down_since = None
            if reason is not None and stage is not None and self._rebuild_reason is None:
                self._rebuild_reason = reason
                stage.stop()

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
