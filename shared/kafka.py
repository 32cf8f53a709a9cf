"""Kafka client settings shared by workers and tools (kafka-python 3.x).

`KAFKA_BOOTSTRAP_SERVERS` and the security variables are read without a service prefix,
as Kafka tooling usually does; empty means "start the embedded broker" for `infermesh run`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError, UnknownTopicOrPartitionError
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.metrics import KAFKA_LAG

logger = logging.getLogger(__name__)


class KafkaSettings(BaseSettings):
    """Where Kafka is and how to authenticate (env prefix KAFKA_)."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    bootstrap_servers: str = ""
    """Comma-separated host:port list; empty means the embedded broker on 127.0.0.1:9092."""

    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""

    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with SASL_*."""

    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    ssl_cafile: str | None = None
    """CA bundle that signed the brokers' certificates."""

    def client_config(self, default_bootstrap: str = "127.0.0.1:9092") -> dict[str, Any]:
        """Keyword arguments for any kafka-python client."""
        config: dict[str, Any] = {
            "bootstrap_servers": (self.bootstrap_servers or default_bootstrap).split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            config["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.ssl_cafile:
            config["ssl_cafile"] = self.ssl_cafile
        return config


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int = 1
    configs: Mapping[str, str] | None = None


def ensure_topics(client_config: Mapping[str, Any], topics: list[TopicSpec], timeout_seconds: float = 30.0) -> None:
    """Creates the topics that do not exist yet; existing ones are left as they are."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            admin = KafkaAdminClient(**client_config)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                admin.create_topics(
                    [
                        NewTopic(t.name, t.partitions, t.replication, topic_configs=dict(t.configs or {}))
                        for t in missing
                    ]
                )
            logger.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        admin.close()


def read_to_end(
    client_config: Mapping[str, Any], topic: str, partitions: list[int], timeout_seconds: float = 30.0
) -> list[Any]:
    """Every record now in `partitions` of `topic`, in offset order per partition.

    The end is the high-water mark a fetch reports, not `end_offsets()`, which the
    embedded broker answers wrongly."""
    if not partitions:
        return []
    consumer = KafkaConsumer(**client_config, enable_auto_commit=False)
    assigned = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_seconds
    try:
        pending = set(assigned)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} {sorted(p.partition for p in pending)} to the end")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            for partition in list(pending):
                highwater = consumer.highwater(partition)
                if highwater is not None and consumer.position(partition) >= highwater:
                    pending.discard(partition)
    finally:
        consumer.close(autocommit=False)
    return records


def unread_partitions(
    client_config: Mapping[str, Any],
    offsets: Mapping[TopicPartition, int | None],
    whole_topics: Collection[str] = (),
    timeout_seconds: float = 5.0,
) -> set[TopicPartition]:
    """The partitions that hold a record at or after the given offset (None: the log start;
    an offset the log no longer holds: the log start, as `auto_offset_reset="earliest"`),
    checking every partition of `whole_topics` too (from its offset in `offsets`, else the
    log start).

    A new group-less consumer fetches once from each offset (max_records=1): the high-water
    marks it reads are all newer than the call, never one cached from an earlier fetch
    (`end_offsets()` would be one request, but the embedded broker answers it wrongly).
    Raises on any failure or past the timeout: an unknown answer is not an empty one."""
    timeout_ms = int(timeout_seconds * 1000)
    consumer = KafkaConsumer(
        **{**client_config, "bootstrap_timeout_ms": timeout_ms, "request_timeout_ms": timeout_ms},
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024,  # one record would do
        fetch_max_wait_ms=10,  # an empty partition answers now, not after the default 500 ms
    )
    try:
        starts = dict(offsets)
        for topic in whole_topics:
            numbers = consumer.partitions_for_topic(topic)
            if not numbers:
                raise UnknownTopicOrPartitionError(topic)
            for number in numbers:
                starts.setdefault(TopicPartition(topic, number), None)
        if not starts:
            return set()
        consumer.assign(list(starts))
        for partition, offset in starts.items():
            if offset is None or offset < 0:
                consumer.seek_to_beginning(partition)
            else:
                consumer.seek(partition, offset)
        unread: set[TopicPartition] = set()
        pending = set(starts)
        deadline = time.monotonic() + timeout_seconds
        while pending:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"no fetch answered for {sorted(pending)}")
            returned = {p for p, records in consumer.poll(timeout_ms=20, max_records=1).items() if records}
            for partition in list(pending):
                highwater = consumer.highwater(partition)
                if partition in returned:
                    unread.add(partition)
                elif highwater is None:
                    continue  # no fetch of this consumer has answered for it yet
                else:
                    position = consumer.position(partition, timeout_ms=1000)
                    if position is None or position < highwater:
                        unread.add(partition)
                pending.discard(partition)
                # Paused, its fetched records stand aside: with max_records=1 they would
                # otherwise hold back the other partitions' answers.
                consumer.pause(partition)
        return unread
    finally:
        consumer.close(autocommit=False)


_lag_series: dict[str, set[tuple[str, str]]] = {}


def observe_lag(consumer: KafkaConsumer) -> int:
    """Sets the lag gauge of each assigned partition from the last fetch's high-water
    mark, and drops the series of partitions no longer assigned; call from the thread
    that polls (consumers are not thread-safe). Returns how many partitions are assigned."""
    group = str(consumer.config["group_id"])
    current: set[tuple[str, str]] = set()
    assignment = consumer.assignment()
    for partition in assignment:
        highwater = consumer.highwater(partition)
        if highwater is None:
            continue
        position = consumer.position(partition, timeout_ms=100)
        if position is not None:
            labels = (partition.topic, str(partition.partition))
            KAFKA_LAG.labels(group, *labels).set(max(0, highwater - position))
            current.add(labels)
    for labels in _lag_series.get(group, set()) - current:
        KAFKA_LAG.remove(group, *labels)
    _lag_series[group] = current
    return len(assignment)


def broker_reachable(bootstrap_servers: list[str], timeout_seconds: float = 1.0) -> bool:
    """Whether any bootstrap broker accepts a TCP connection (readiness, not a full handshake)."""
    for server in bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_seconds):
                return True
        except (OSError, ValueError):
            continue
    return False
