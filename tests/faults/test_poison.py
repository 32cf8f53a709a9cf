"""Poison on the news topic, all in one partition between good items, against a worker
process: each bad record is dead-lettered with its reason, the good ones around it are
scored, and the worker neither crashes nor stalls."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from infermesh.broker import EmbeddedBroker
from shared.grpc_server import RunningServer
from shared.messages import DLQ_TOPIC, NEWS_TOPIC, SENTIMENT_TOPIC
from tests.faults.processes import ServiceProcess, worker_process
from tests.faults.test_worker_faults import Tally
from tests.reliability import Observed
from tests.workers.test_scorer import news

MAX_RECORD_BYTES = 4096

#: (record value, reason expected on its dead letter)
POISON: dict[str, tuple[bytes | None, str]] = {
    "null value (tombstone)": (None, "empty"),
    "empty value": (b"", "empty"),
    "oversized record": (news("big", "Shares rise", body="word " * 2000), "too-large"),
    "invalid UTF-8": (b'{"id": "\xff\xfe", "headline": "x"}', "invalid-utf8"),
    "not JSON": (b"BREAKING: markets up", "not-json"),
    "JSON but not an object": (b'["id", "headline"]', "schema"),
    "deeply nested JSON": (b"[" * 1000 + b"]" * 1000, "not-json"),
    "wrong types": (json.dumps({"id": 7, "published_at": 5, "source": [], "headline": {}}).encode(), "schema"),
    "missing fields": (json.dumps({"id": "m", "headline": "Shares rise"}).encode(), "schema"),
    "timestamp without zone": (
        json.dumps({"id": "z", "published_at": "2026-11-24T09:00:00", "source": "s", "headline": "up"}).encode(),
        "schema",
    ),
    "headline of invisible characters": (news("zw", "\u200b\u200d\u2060"), "rejected"),
}


@pytest.mark.reliability(
    "Hostile input",
    f"Kafka poison variety: {len(POISON)} kinds ({', '.join(POISON)}), plus duplicate ids and null keys, "
    "all in one partition between good items",
    "each poison dead-lettered with its reason and original bytes; duplicates and null keys scored; "
    "worker alive; partition not blocked",
)
async def test_every_kind_of_poison_is_dead_lettered_and_the_partition_flows(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    observed: Observed,
) -> None:
    producer = KafkaProducer(**kafka_config, acks="all")
    good = 0
    for kind, (value, _) in POISON.items():
        producer.send(NEWS_TOPIC, key=kind.encode(), value=value, partition=0)
        producer.send(NEWS_TOPIC, key=None, value=news(f"good{good}", f"Profit beats estimates {good}"), partition=0)
        good += 1
    for _ in range(2):  # the same id twice: at least once means consumers dedupe by id
        producer.send(NEWS_TOPIC, key=b"dup", value=news("dup", "Dividend raised"), partition=0)
    producer.flush()
    producer.close()
    targets = [f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server)]
    worker: ServiceProcess = worker_process(
        broker.bootstrap_servers, *targets, max_batch="4", max_record_bytes=str(MAX_RECORD_BYTES)
    )
    worker.start(wait_serving=False)
    outputs = Tally(kafka_config, SENTIMENT_TOPIC)
    dead = KafkaDeadLetters(kafka_config)
    try:
        scored = await outputs.until(lambda counts: len(counts) >= good + 1, 60)
        letters = await dead.until(len(POISON), 30)
        alive = worker.alive
    finally:
        outputs.close()
        dead.close()
        worker.stop()
    reasons = {kind: letters.get(kind.encode(), (None, b""))[0] for kind in POISON}
    wrong = {kind: reason for kind, reason in reasons.items() if reason != POISON[kind][1]}
    observed.record(
        f"{len(letters)}/{len(POISON)} dead-lettered, each with its reason; {len(scored)} good ids scored "
        f"({scored['dup']} records for the duplicate id); worker alive: {alive}",
        lost=(good + 1 - len(scored)) + (len(POISON) - len(letters)),
    )
    assert not wrong, wrong
    assert all(letters[kind.encode()][1] == (POISON[kind][0] or b"") for kind in POISON)  # original bytes
    assert set(scored) == {f"good{i}" for i in range(good)} | {"dup"}
    assert alive


class KafkaDeadLetters:
    """The dead-letter topic by the original record's key: (reason, value)."""

    def __init__(self, kafka_config: dict[str, Any]) -> None:
        self.tally = Tally(kafka_config, DLQ_TOPIC)
        self.letters: dict[bytes, tuple[str, bytes]] = {}

    async def until(self, count: int, timeout_seconds: float) -> dict[bytes, tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_seconds
        while len(self.letters) < count and time.monotonic() < deadline:
            batches = await asyncio.to_thread(self.tally.consumer.poll, 300)
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers)
                    self.letters[record.key] = (headers["error-type"].decode(), record.value)
        return self.letters

    def close(self) -> None:
        self.tally.close()
