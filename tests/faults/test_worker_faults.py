"""The worker under faults, every component a real process on loopback: the inference
service killed and restarted mid-stream, the worker stopped with SIGTERM or SIGKILL
mid-batch, the embedded broker restarted. Nothing may be lost or dead-lettered."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from infermesh.broker import EmbeddedBroker
from shared.grpc_server import RunningServer
from shared.messages import (
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    ScoredItem,
    WindowAggregate,
)
from tests.faults.processes import ServiceProcess, inference_process, worker_process
from tests.reliability import Observed
from tests.workers.test_scorer import news, produce, read_all
from workers.sentiment_monitor.settings import MonitorSettings


class Tally:
    """Reads a topic from the start and counts each item id's records."""

    def __init__(self, kafka_config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(topic, **kafka_config, auto_offset_reset="earliest")
        self.counts: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        for records in self.consumer.poll(timeout_ms=300).values():
            for record in records:
                key = ScoredItem.model_validate_json(record.value).item_id if self.topic == SENTIMENT_TOPIC else ""
                self.counts[key or f"offset {record.offset}"] += 1
        return self.counts

    async def until(self, predicate: Any, timeout_seconds: float) -> Counter[str]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            counts = await asyncio.to_thread(self.poll)
            if predicate(counts):
                break
        return self.counts

    def close(self) -> None:
        self.consumer.close()


def headlines(prefix: str, count: int, **extra: Any) -> list[bytes]:
    # No company names, at most one ticker: one scored record per item, so counts are per item id.
    return [
        news(f"{prefix}{i}", f"Chip demand {'soars' if i % 2 else 'slumps'} in quarter {i}", **extra)
        for i in range(count)
    ]


@pytest.fixture
def outputs(kafka_config: dict[str, Any]) -> Iterator[Tally]:
    tally = Tally(kafka_config, SENTIMENT_TOPIC)
    yield tally
    tally.close()


@pytest.fixture
def dead_letters(kafka_config: dict[str, Any]) -> Iterator[Tally]:
    tally = Tally(kafka_config, DLQ_TOPIC)
    yield tally
    tally.close()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.mark.reliability(
    "Faults",
    "Inference service killed (SIGKILL) mid-stream and restarted 2 s later, worker consuming",
    "worker retries with backoff; nothing dead-lettered or lost; worker keeps running; throughput recovers",
)
async def test_inference_killed_and_restarted_under_the_worker(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    postprocessor_server: RunningServer,
    model_repository: Path,
    outputs: Tally,
    dead_letters: Tally,
    processes: list[ServiceProcess],
    observed: Observed,
) -> None:
    total = 600
    inference = inference_process(model_repository)
    processes.append(await asyncio.to_thread(inference.start))
    worker = worker_process(
        broker.bootstrap_servers,
        f"127.0.0.1:{tokenizer_server.port}",
        inference.target,
        f"127.0.0.1:{postprocessor_server.port}",
        max_batch="16",
    )
    processes.append(worker.start(wait_serving=False))
    produce(kafka_config, headlines("r", total))
    await outputs.until(lambda counts: len(counts) >= 100, 60)
    inference.signal(signal.SIGKILL)
    inference.wait()
    killed_at = len(outputs.poll())
    await asyncio.sleep(2)
    restarted = time.monotonic()
    await asyncio.to_thread(inference.start)
    ready = time.monotonic()
    counts = await outputs.until(lambda counts: len(counts) >= total, 120)
    recovered_seconds = time.monotonic() - ready
    dead = await dead_letters.until(lambda counts: False, 1)
    retries = worker.metric("infermesh_worker_retries_total")
    lost = total - len(counts)
    observed.record(
        f"{killed_at} scored before the kill; restart took {ready - restarted:.1f} s; the other "
        f"{total - killed_at} scored {recovered_seconds:.1f} s after it; {int(retries)} worker retries; "
        f"{sum(dead.values())} dead-lettered; {sum(counts.values()) - len(counts)} duplicates",
        lost=lost,
    )
    assert lost == 0
    assert sum(dead.values()) == 0
    assert worker.alive
    assert retries > 0


@pytest.mark.reliability(
    "Faults",
    "Worker sent SIGTERM mid-batch, a new worker started",
    "drains its batch, commits, exits 0; nothing lost, nothing scored twice",
)
async def test_worker_sigterm_mid_stream_drains_and_loses_nothing(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    outputs: Tally,
    dead_letters: Tally,
    processes: list[ServiceProcess],
    observed: Observed,
) -> None:
    total = 400
    targets = [f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server)]
    produce(kafka_config, headlines("w", total))
    first = worker_process(broker.bootstrap_servers, *targets, max_batch="8")
    processes.append(first.start(wait_serving=False))
    await outputs.until(lambda counts: len(counts) >= 40, 60)
    first.signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(first.wait, 30)
    stopped_at = len(outputs.poll())
    assert stopped_at < total, "the first worker should have been mid-stream"
    second = worker_process(broker.bootstrap_servers, *targets, max_batch="8")
    processes.append(second.start(wait_serving=False))
    counts = await outputs.until(lambda counts: len(counts) >= total, 90)
    dead = await dead_letters.until(lambda counts: False, 1)
    duplicates = sum(counts.values()) - len(counts)
    lost = total - len(counts)
    observed.record(
        f"exit code {exit_code} after {stopped_at} scored; the second worker scored the rest; "
        f"{duplicates} duplicates (same item id); {sum(dead.values())} dead-lettered",
        lost=lost,
    )
    assert lost == 0 and sum(dead.values()) == 0
    assert all(item.startswith("w") for item in counts)
    assert exit_code == 0
    assert duplicates == 0  # it committed exactly what it had produced


async def appears(path: Path, process: ServiceProcess, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while not path.exists():
        if not process.alive or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def committed_offsets(kafka_config: dict[str, Any], group: str, partitions: set[int]) -> dict[int, int | None]:
    consumer = KafkaConsumer(**kafka_config, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(NEWS_TOPIC, p)) for p in sorted(partitions)}
    finally:
        consumer.close(autocommit=False)


@pytest.mark.reliability(
    "Faults",
    "Worker killed (SIGKILL) after its batch's outputs were acked and before its offset commit "
    "(a test hook pauses it there), a new worker started",
    "nothing lost (at least once); exactly that batch scored again, told by item id; "
    "the ticker's window counts each item once",
)
async def test_worker_killed_between_acks_and_commit_rescores_exactly_that_batch(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    outputs: Tally,
    dead_letters: Tally,
    processes: list[ServiceProcess],
    observed: Observed,
    tmp_path: Path,
) -> None:
    total = 160
    targets = [f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server)]
    # One ticker, one event-time window: every item lands in the same ACME window.
    produce(kafka_config, headlines("k", total, tickers=["ACME"]))
    paused = tmp_path / "paused-before-commit.json"
    first = worker_process(broker.bootstrap_servers, *targets, pause_before_commit=paused, max_batch="8")
    processes.append(first.start(wait_serving=False))
    assert await appears(paused, first, 60), first.log_tail()
    batch = json.loads(paused.read_text())
    first.signal(signal.SIGKILL)
    exit_code = await asyncio.to_thread(first.wait, 30)
    batch_ids = {record["item_id"] for record in batch}

    # At the kill the batch's outputs were in the topic (acked) and its offsets not committed.
    before = set(await outputs.until(lambda counts: batch_ids <= counts.keys(), 10))
    before |= set(outputs.poll())
    committed = await asyncio.to_thread(
        committed_offsets, kafka_config, MonitorSettings().scorer_group, {record["partition"] for record in batch}
    )
    assert before == batch_ids, "scored before the kill: exactly the paused batch"
    for record in batch:
        assert (committed[record["partition"]] or 0) <= record["offset"], committed

    second = worker_process(broker.bootstrap_servers, *targets, max_batch="8", stages='["score", "windows"]')
    processes.append(second.start(wait_serving=False))
    counts = Counter(
        await outputs.until(lambda counts: len(counts) >= total and all(counts[i] > 1 for i in batch_ids), 90)
    )
    dead = await dead_letters.until(lambda counts: False, 1)
    duplicates = {item for item, seen in counts.items() if seen > 1}
    lost = total - len(counts)

    # A later item moves the ACME watermark past the window, which then closes.
    produce(kafka_config, [news("closer", "Chip demand steady", tickers=["ACME"], published_at="2026-11-24T10:00:00Z")])
    windows = [
        WindowAggregate.model_validate_json(record.value)
        for record in await asyncio.to_thread(read_all, kafka_config, WINDOWS_TOPIC, 1, 60_000)
    ]
    observed.record(
        f"paused after the acks of a {len(batch)}-record batch ({', '.join(sorted(batch_ids))}), offsets "
        f"uncommitted; exit code {exit_code}; after the restart {len(counts)}/{total} item ids scored; "
        f"{sum(counts.values()) - len(counts)} duplicates, by item id exactly the paused batch, each twice; "
        f"{sum(dead.values())} dead-lettered; ACME window counted {windows[0].count if windows else '-'} items "
        f"from {sum(counts.values())} scored records (windowing keeps an item id once per window)",
        lost=lost,
    )
    assert exit_code == -signal.SIGKILL
    assert lost == 0 and sum(dead.values()) == 0
    assert set(counts) == {f"k{i}" for i in range(total)}
    assert duplicates == batch_ids
    assert all(counts[item] == 2 for item in duplicates)
    assert [(w.ticker, w.count) for w in windows] == [("ACME", total)]


@pytest.mark.reliability(
    "Faults",
    "Embedded broker restarted (memory only: topics, records and offsets gone)",
    "worker notices, recreates its clients and topics, and scores news produced after the restart",
)
async def test_broker_restart_the_worker_carries_on_for_new_data(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    processes: list[ServiceProcess],
    observed: Observed,
) -> None:
    targets = [f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server)]
    worker = worker_process(broker.bootstrap_servers, *targets, max_batch="8")
    processes.append(worker.start(wait_serving=False))
    produce(kafka_config, headlines("before", 20))
    before = Tally(kafka_config, SENTIMENT_TOPIC)
    try:
        assert len(await before.until(lambda counts: len(counts) >= 20, 60)) == 20
    finally:
        before.close()
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(1)
    restarted = time.monotonic()
    await asyncio.to_thread(broker.start)
    produced_at = None
    for _ in range(60):  # the worker recreates the topics; a producer can send once they exist
        try:
            await asyncio.to_thread(produce, kafka_config, headlines("after", 20))
            produced_at = time.monotonic()
            break
        except Exception:
            await asyncio.sleep(0.5)
    assert produced_at is not None
    after = Tally(kafka_config, SENTIMENT_TOPIC)
    try:
        counts = await after.until(lambda counts: len([i for i in counts if i.startswith("after")]) >= 20, 90)
    finally:
        after.close()
    scored_after = len([item for item in counts if item.startswith("after")])
    observed.record(
        f"{scored_after}/20 news produced after the restart scored, "
        f"{time.monotonic() - restarted:.1f} s after the broker came back; the worker kept running",
        lost=20 - scored_after,
    )
    assert scored_after == 20, worker.log_tail() + "\n" + worker.readiness()
    assert worker.alive
