"""The worker under faults, every component a real process on loopback: the inference
service killed and restarted mid-stream, the worker stopped with SIGTERM or SIGKILL
mid-batch, the embedded broker restarted. Nothing may be lost or dead-lettered."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from infermesh.broker import EmbeddedBroker
from shared.grpc_server import RunningServer
from tests.faults.processes import ServiceProcess, inference_process, worker_process
from tests.reliability import Observed
from tests.workers.test_scorer import news, produce
from workers.sentiment_monitor.messages import DLQ_TOPIC, SENTIMENT_TOPIC, ScoredItem


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


def headlines(prefix: str, count: int) -> list[bytes]:
    # No tickers: one scored record per item, so counts are per item id.
    return [news(f"{prefix}{i}", f"Chip demand {'soars' if i % 2 else 'slumps'} in quarter {i}") for i in range(count)]


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


@pytest.mark.parametrize(
    "stop_signal",
    [
        pytest.param(
            signal.SIGTERM,
            marks=pytest.mark.reliability(
                "Faults",
                "Worker sent SIGTERM mid-batch, a new worker started",
                "drains its batch, commits, exits 0; nothing lost, nothing scored twice",
            ),
        ),
        pytest.param(
            signal.SIGKILL,
            marks=pytest.mark.reliability(
                "Faults",
                "Worker killed (SIGKILL) mid-batch, a new worker started",
                "nothing lost (at least once); duplicates identifiable by item id",
            ),
        ),
    ],
    ids=["sigterm", "sigkill"],
)
async def test_worker_stopped_mid_batch_loses_nothing(
    stop_signal: signal.Signals,
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
    first.signal(stop_signal)
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
    if stop_signal == signal.SIGTERM:
        assert exit_code == 0
        assert duplicates == 0  # it committed exactly what it had produced


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
