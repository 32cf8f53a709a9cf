"""python -m workers.sentiment_monitor: the scoring stage of the monitor."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from kafka import KafkaConsumer, KafkaProducer

from shared.kafka import KafkaSettings, ensure_topics
from shared.pipeline import PipelineTargets
from shared.telemetry import configure_logging
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import NewsScorer
from workers.sentiment_monitor.scoring import BlockingPipeline
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics

logger = logging.getLogger("workers.sentiment_monitor")


def main() -> None:
    settings = MonitorSettings()
    kafka = KafkaSettings()
    configure_logging(json_lines=False)
    client = kafka.client_config()
    ensure_topics(client, monitor_topics(settings.partitions))
    consumer = KafkaConsumer(
        **client,
        group_id=settings.scorer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_batch,
        # The broker holds a group join for half the session timeout; the 45 s default
        # would mean ~23 s of nothing after every rebalance.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1500,
    )
    producer = KafkaProducer(**client, acks="all", enable_idempotence=True, linger_ms=5)
    pipeline = BlockingPipeline(
        PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor), settings.model_name
    )
    scorer = NewsScorer(consumer, producer, pipeline, TickerAttributor.from_csv(settings.companies_csv), settings)

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: finishing the current batch", signum)
        scorer.stop()

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, stop)
    logger.info("scoring %s as group %s", client["bootstrap_servers"], settings.scorer_group)
    try:
        scorer.run()
    finally:
        consumer.close(autocommit=False)  # leave the group at once; commits only happen in run_once
        producer.close()
        pipeline.close()
    sys.exit(0)


main()
