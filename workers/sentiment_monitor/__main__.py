"""python -m workers.sentiment_monitor (or `infermesh serve worker`): the monitor's stages."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from shared.kafka import KafkaSettings, broker_reachable, ensure_topics
from shared.metrics import MetricsServer
from shared.pipeline import PipelineTargets
from shared.telemetry import configure_logging, configure_tracing
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import NewsScorer
from workers.sentiment_monitor.scoring import BlockingPipeline
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics
from workers.sentiment_monitor.windowing import WindowStage

logger = logging.getLogger("workers.sentiment_monitor")


def group_consumer(client: dict[str, Any], group: str, max_poll_records: int) -> KafkaConsumer:
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


def main() -> None:
    settings = MonitorSettings()
    client = KafkaSettings().client_config()
    configure_logging(settings.log_json, settings.log_level)
    configure_tracing("infermesh-worker")
    ensure_topics(client, monitor_topics(settings.partitions))
    producer = KafkaProducer(**client, acks="all", enable_idempotence=True, linger_ms=5)
    stages: list[NewsScorer | WindowStage] = []
    pipeline = None
    if "score" in settings.stages:
        pipeline = BlockingPipeline(
            PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor), settings.model_name
        )
        consumer = group_consumer(client, settings.scorer_group, settings.max_batch)
        stages.append(
            NewsScorer(consumer, producer, pipeline, TickerAttributor.from_csv(settings.companies_csv), settings)
        )
    if "windows" in settings.stages:
        consumer = group_consumer(client, settings.windows_group, settings.max_batch)
        stages.append(WindowStage(consumer, producer, client, settings))

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: finishing the current batches", signum)
        for stage in stages:
            stage.stop()

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, stop)

    def readiness() -> tuple[bool, str]:
        idle = [type(stage).__name__ for stage in stages if stage.assigned_partitions == 0]
        if idle:
            return False, f"no partitions assigned yet to {', '.join(idle)}"
        if not broker_reachable(client["bootstrap_servers"]):
            return False, "no bootstrap broker accepts connections"
        return True, "ready: " + ", ".join(f"{type(s).__name__} {s.assigned_partitions} partitions" for s in stages)

    metrics = MetricsServer(settings.host, settings.metrics_port, readiness) if settings.metrics_enabled else None
    failed: list[str] = []

    def run_stage(stage: NewsScorer | WindowStage) -> None:
        try:
            stage.run()
        except Exception:
            # A stage that cannot go on takes the process down: its records stay
            # uncommitted, and the group hands its partitions to a healthy member.
            logger.exception("%s failed; stopping the worker", type(stage).__name__)
            failed.append(type(stage).__name__)
            for other in stages:
                other.stop()

    threads = [threading.Thread(target=run_stage, args=(stage,), name=type(stage).__name__) for stage in stages]
    for thread in threads:
        thread.start()
    logger.info("sentiment monitor running stages %s against %s", settings.stages, client["bootstrap_servers"])
    for thread in threads:
        thread.join()
    for stage in stages:
        stage.consumer.close(autocommit=False)  # leave the group at once; commits happen per batch
    producer.close()
    if pipeline is not None:
        pipeline.close()
    if metrics is not None:
        metrics.stop()
    sys.exit(1 if failed else 0)


main()
