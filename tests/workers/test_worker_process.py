"""Worker processes as deployed: a member killed with SIGKILL mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

from kafka import KafkaConsumer

from infermesh.broker import EmbeddedBroker
from shared.grpc_server import RunningServer
from workers.sentiment_monitor.messages import SENTIMENT_TOPIC, ScoredItem

from .test_scorer import news, produce


def start_worker(broker: EmbeddedBroker, servers: list[RunningServer]) -> subprocess.Popen[bytes]:
    tokenizer, inference, postprocessor = (f"127.0.0.1:{s.port}" for s in servers)
    env = dict(os.environ) | {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "INFERMESH_WORKER_TOKENIZER": tokenizer,
        "INFERMESH_WORKER_INFERENCE": inference,
        "INFERMESH_WORKER_POSTPROCESSOR": postprocessor,
        "INFERMESH_WORKER_STAGES": json.dumps(["score"]),
        "INFERMESH_WORKER_MAX_BATCH": "8",
        "INFERMESH_WORKER_PARTITIONS": "2",
    }
    return subprocess.Popen([sys.executable, "-m", "workers.sentiment_monitor"], env=env, stderr=subprocess.DEVNULL)


async def scored_ids(kafka_config: dict[str, Any], consumer: KafkaConsumer, seen: set[str]) -> set[str]:
    batches = await asyncio.to_thread(consumer.poll, 500)
    for records in batches.values():
        seen.update(ScoredItem.model_validate_json(r.value).item_id for r in records)
    return seen


async def test_sigkill_mid_stream_loses_no_item(
    broker: EmbeddedBroker,
    kafka_config: dict[str, Any],
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
) -> None:
    total = 400
    produce(
        kafka_config,
        [news(f"k{i}", f"$NVDA item {i}: chip demand {'soars' if i % 2 else 'slumps'}") for i in range(total)],
    )
    servers = [tokenizer_server, inference_server, postprocessor_server]
    reader = KafkaConsumer(SENTIMENT_TOPIC, **kafka_config, auto_offset_reset="earliest")
    seen: set[str] = set()
    first = start_worker(broker, servers)
    second = None
    try:
        for _ in range(120):
            if len(await scored_ids(kafka_config, reader, seen)) >= 40:
                break
        assert 0 < len(seen) < total, "the first worker should be mid-stream"
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_worker(broker, servers)
        for _ in range(240):
            if len(await scored_ids(kafka_config, reader, seen)) >= total:
                break
        assert seen == {f"k{i}" for i in range(total)}
    finally:
        reader.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    assert second.returncode == 0  # a SIGTERM drains, commits and leaves the group cleanly
