"""python -m workers.sentiment_monitor (or `infermesh serve worker`): the monitor's stages."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from kafka import KafkaConsumer, KafkaProducer

from shared.kafka import KafkaSettings, broker_reachable, ensure_topics
from shared.metrics import MetricsServer
from shared.pipeline import PipelineTargets
from shared.telemetry import configure_logging, configure_tracing
from shared.tls import TlsMisconfigured, environment_tls
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import NewsScorer
from workers.sentiment_monitor.runner import StageRunner, group_consumer
from workers.sentiment_monitor.scoring import BlockingPipeline, check_score_mapping
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics
from workers.sentiment_monitor.windowing import TOPICS, WindowStage

logger = logging.getLogger("workers.sentiment_monitor")


def main() -> None:
    settings = MonitorSettings()
    client = KafkaSettings().client_config()
    configure_logging(settings.log_json, settings.log_level)
    configure_tracing("infermesh-worker")
    try:
        environment_tls()  # fail now, in one line, rather than on the first scoring call
    except TlsMisconfigured as error:
        logger.error("worker cannot start: %s", error.detail)
        sys.exit(1)
    topics = monitor_topics(settings.partitions)
    ensure_topics(client, topics)

    def clients(group: str) -> tuple[KafkaConsumer, KafkaProducer]:
        """A stage's consumer and producer, or neither (no half-built pair left open)."""
        consumer = group_consumer(client, group, settings.max_batch)
        try:
            return consumer, KafkaProducer(**client, acks="all", enable_idempotence=True, linger_ms=5)
        except Exception:
            consumer.close(autocommit=False)
            raise

    runners: list[StageRunner] = []
    pipeline = None
    if "score" in settings.stages:
        pipeline = BlockingPipeline(
            PipelineTargets(settings.tokenizer, settings.inference, settings.postprocessor),
            settings.model_name,
            settings.language_routing(),
        )
        refusal = check_score_mapping(
            pipeline,
            settings.model_name,
            models=settings.models,
            topic_model=settings.topic_model,
            topic_head=settings.topic_head,
        )
        if refusal is not None:
            logger.error("worker cannot score: %s", refusal)
            pipeline.close()
            sys.exit(1)
        scoring = pipeline
        attributor = TickerAttributor.from_csv(settings.companies_csv)

        def scorer() -> NewsScorer:
            return NewsScorer(*clients(settings.scorer_group), scoring, attributor, settings)

        runners.append(StageRunner("score", scorer, client, topics))
    if "windows" in settings.stages:

        def windows() -> WindowStage:
            return WindowStage(*clients(settings.windows_group), client, settings)

        runners.append(StageRunner("windows", windows, client, topics))
    if "topics" in settings.stages:

        def topic_windows() -> WindowStage:
            return WindowStage(*clients(settings.topics_group), client, settings, dimension=TOPICS)

        runners.append(StageRunner("topics", topic_windows, client, topics))

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: finishing the current batches", signum)
        for runner in runners:
            runner.stop()

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, stop)

    def readiness() -> tuple[bool, str]:
        idle = [runner.name for runner in runners if runner.assigned_partitions == 0]
        if idle:
            return False, f"no partitions assigned yet to {', '.join(idle)}"
        if not broker_reachable(client["bootstrap_servers"]):
            return False, "no bootstrap broker accepts connections"
        return True, "ready: " + ", ".join(f"{r.name} {r.assigned_partitions} partitions" for r in runners)

    metrics = MetricsServer(settings.host, settings.metrics_port, readiness) if settings.metrics_enabled else None
    failed: list[str] = []

    def run_stage(runner: StageRunner) -> None:
        try:
            runner.run()
        except Exception:
            # A stage that cannot go on takes the process down: its records stay
            # uncommitted, and the group hands its partitions to a healthy member.
            logger.exception("stage %s failed; stopping the worker", runner.name)
            failed.append(runner.name)
            for other in runners:
                other.stop()

    threads = [threading.Thread(target=run_stage, args=(runner,), name=runner.name) for runner in runners]
    for thread in threads:
        thread.start()
    logger.info("sentiment monitor running stages %s against %s", settings.stages, client["bootstrap_servers"])
    for thread in threads:
        thread.join()
    if pipeline is not None:
        pipeline.close()
    if metrics is not None:
        metrics.stop()
    sys.exit(1 if failed else 0)


main()
