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

from kafka import KafkaConsumer
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
        reachable: Callable[[list[str]], bool] = broker_reachable,
        prepare_topics: Callable[[dict[str, Any], list[TopicSpec]], None] = ensure_topics,
    ) -> None:
        self.name = name
        self._build = build
        self._client_config = client_config
        self._topics = topics
        self._max_backoff = max_backoff_seconds
        self._probe_seconds = probe_seconds
        self._reachable = reachable
        self._prepare_topics = prepare_topics
        self._stopping = threading.Event()
        self._rebuild_reason: str | None = None
        """Set by the watcher: why the current stage should be rebuilt on fresh clients."""
        self._stage: Stage | None = None
        """The running stage; None while one is being built."""
        self._building_since = 0.0
        self._lock = threading.Lock()
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
            with self._lock:  # the watcher never acts on a stage that is being replaced
                self._stage, self._rebuild_reason = None, None
                self._building_since = time.monotonic()
            try:
                stage = self._build()
            except KafkaError as error:  # the broker went away again while we connected
                reason = f"Kafka clients could not be created ({error})"
            else:
                with self._lock:
                    self._stage = stage
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
                    _close_quietly(stage.consumer.close, autocommit=False)  # leave the group now
                    _close_quietly(stage.producer.close, timeout=5)
            self.resets += 1
            WORKER_CLIENT_RESETS.labels(self.name).inc()
            logger.warning("%s: %s; recreating its Kafka clients", self.name, reason)
            self._wait_for_broker()

    def _watch(self) -> None:
        """Asks for a rebuild (the stage finishes its batch, then `run` makes a new one)
        when the broker stops accepting connections, or when it accepts them again and
        the stage was built before the outage began (the first request did not take)."""
        down_since: float | None = None
        while not self._stopping.wait(self._probe_seconds):
            reason = None
            if not self._reachable(self._client_config["bootstrap_servers"]):
                if down_since is None:
                    down_since = time.monotonic()
                    # Let go of the clients while it is down: a consumer that rejoins a
                    # restarted broker and is closed mid-join can leave its group waiting
                    # for a leader that never syncs (seen with the embedded broker).
                    reason = "the broker stopped accepting connections"
            else:
                if down_since is not None and self._building_since < down_since:
                    reason = "the broker came back after being unreachable"
                down_since = None
            with self._lock:
                stage = self._stage
                if reason is None or stage is None or self._rebuild_reason is not None:
                    continue
                self._rebuild_reason = reason
            stage.stop()

    def _wait_for_broker(self) -> None:
        """Backs off until the broker accepts connections and our topics exist again
        (an embedded, memory-only broker comes back empty)."""
        delay = 0.5
        while not self._stopping.wait(delay):
            if self._reachable(self._client_config["bootstrap_servers"]):
                try:
                    self._prepare_topics(self._client_config, self._topics)
                    return
                except Exception as error:
                    logger.warning("%s: topics not ready yet (%s)", self.name, error)
            delay = min(delay * 2, self._max_backoff)


def _close_quietly(close: Callable[..., object], **options: Any) -> None:
    """Closes a client that may already be broken; its error must not hide the one that
    brought us here, nor keep the other client open."""
    try:
        close(**options)
    except Exception as error:
        logger.warning("closing a Kafka client failed: %s", error)


def group_consumer(client: dict[str, Any], group: str, max_poll_records: int) -> KafkaConsumer:
    """A stage's consumer: manual commits, batches of `max_poll_records`, quick rejoins."""
    return KafkaConsumer(
        **client,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        # Let a fetch gather a batch's worth of records (or wait 50 ms) rather than
        # returning the first few: small batches leave the inference service idle.
        fetch_min_bytes=64 * 1024,
        fetch_max_wait_ms=50,
        # The broker holds a group join for half the session timeout; the 45 s default
        # would mean ~23 s of nothing after every rebalance.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1500,
    )
