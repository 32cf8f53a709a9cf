"""The stage runner without a broker: scripted reachability and stages that stand in for
Kafka clients, so outages, failed rebuilds and stops can be ordered exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kafka.errors import KafkaTimeoutError

from workers.sentiment_monitor.runner import StageRunner


class Client:
    def __init__(self) -> None:
        self.closed = False

    def close(self, **options: Any) -> None:
        self.closed = True


class StageStandIn:
    """Runs until stopped, like a consumer loop."""

    def __init__(self) -> None:
        self.consumer, self.producer = Client(), Client()
        self.assigned_partitions = 1
        self._stopped = threading.Event()

    def run(self) -> None:
        self._stopped.wait(10)

    def stop(self) -> None:
        self._stopped.set()


class Broker:
    """Reachability the test switches; counts topic preparations."""

    def __init__(self) -> None:
        self.up = True
        self.prepared = 0

    def reachable(self, servers: list[str]) -> bool:
        return self.up

    def prepare(self, config: dict[str, Any], topics: list[Any]) -> None:
        self.prepared += 1


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def start(broker: Broker, build: Callable[[], StageStandIn]) -> tuple[StageRunner, threading.Thread]:
    runner = StageRunner(
        "test",
        build,
        {"bootstrap_servers": ["broker:9092"]},
        [],
        max_backoff_seconds=0.05,
        probe_seconds=0.02,
        reachable=broker.reachable,
        prepare_topics=broker.prepare,
    )
    thread = threading.Thread(target=runner.run)
    thread.start()
    return runner, thread


def test_every_outage_rebuilds_the_clients_and_stop_ends_the_run() -> None:
    broker, built = Broker(), []

    def build() -> StageStandIn:
        built.append(StageStandIn())
        return built[-1]

    runner, thread = start(broker, build)
    for outage in (1, 2, 3):  # later outages must not be ignored after the first
        assert wait_until(partial(lambda count: len(built) == count, outage))
        broker.up = False
        assert wait_until(lambda: built[-1].consumer.closed and built[-1].producer.closed)
        broker.up = True
    assert wait_until(lambda: len(built) == 4)
    assert runner.resets == 3 and broker.prepared == 3
    runner.stop()
    thread.join(5)
    assert not thread.is_alive() and built[-1].consumer.closed


def test_clients_that_cannot_be_created_are_retried_not_fatal() -> None:
    broker, built, failures = Broker(), [], [KafkaTimeoutError("Unable to bootstrap")]

    def build() -> StageStandIn:
        if failures:
            raise failures.pop()
        built.append(StageStandIn())
        return built[-1]

    runner, thread = start(broker, build)
    assert wait_until(lambda: len(built) == 1)
    assert runner.resets == 1 and thread.is_alive()
    runner.stop()
    thread.join(5)
    assert not thread.is_alive()
