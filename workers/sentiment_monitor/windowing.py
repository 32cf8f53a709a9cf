"""The windowing stages: `finance.sentiment.v1` in, ticker windows and alerts out
(`TICKERS`); `finance.sentiment.topics.v1` in, topic windows and alerts out (`TOPICS`).

Scored items are keyed by ticker (by topic on the topics stream, which the scoring stage
writes as a repartition, like a Kafka Streams `-repartition` topic), so each key's items
sit in one partition and one member of the group owns its windows. Both stages are the
same code over a `Dimension`. State survives restarts and rebalances:
- open windows: offsets are committed only up to the earliest record still held in an
  open window, so the next owner re-reads exactly what it needs to rebuild them;
- alert baselines and cooldowns: rebuilt on assignment from the windows and alerts
  already emitted (same ticker keys, so the same partition numbers), read back from the
  end of those partitions only as far as restoring needs (`read_back`), not their whole
  retention;
- emitted window ids are remembered, so re-read records never re-open a window that
  was already emitted, and no alert is raised twice.

Every poll closes what is due in every assigned partition, including partitions that
returned nothing (`TumblingWindows.close_idle`): a quiet ticker's last window and its
alert do not wait for the next record, as long as the pipeline is caught up
(`PipelineCaughtUp`: the scoring group has committed all of the news topic and this stage
has read all of the partition). During an upstream stall the windows wait instead, so the
backlog is counted when it comes rather than dropped as late. Unreadable records of the
stage's topics go to the dead-letter topic with their reason; the stage goes on.

Each closed window gets a span linking the traces of (up to MAX_WINDOW_LINKS of) the
items in it; the window and any alert carry that span's context in their headers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition
from opentelemetry import trace

from shared.kafka import observe_lag, unread_partitions
from shared.kafka_tracing import extract_context, inject_headers
from shared.metrics import (
    KAFKA_CONSUMED,
    KAFKA_PRODUCED,
    WORKER_ALERTS,
    WORKER_BATCH_DURATION,
    WORKER_DEAD_LETTERED,
    WORKER_DROPPED_ITEMS,
    WORKER_IDLE_CLOSED_WINDOWS,
    WORKER_INTERNAL_DEAD_LETTERED,
    WORKER_WINDOWS_CLOSED,
)
from workers.sentiment_monitor.consumer import dead_letter_headers
from workers.sentiment_monitor.core import (
    AlertRule,
    AlertSettings,
    KeyedWindows,
    SpikeRule,
    TopicAlertRule,
    TopicAlertSettings,
    TopicWindows,
    TumblingWindows,
    WindowSettings,
)
from workers.sentiment_monitor.messages import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    NEWS_TOPIC,
    SENTIMENT_TOPIC,
    TOPIC_ALERTS_TOPIC,
    TOPIC_SENTIMENT_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    WINDOWS_TOPIC,
    Alert,
    PoisonRecord,
    ScoredItem,
    TopicAlert,
    TopicWindow,
    WindowAggregate,
    decode_internal,
)
from workers.sentiment_monitor.settings import MonitorSettings

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

REMEMBERED_WINDOWS = 50_000
"""Emitted window ids kept per partition to reject replays (oldest forgotten first)."""
MAX_WINDOW_LINKS = 32
"""Item traces a window's span links to; a busy window would otherwise carry thousands."""
READ_BACK_STEP = 500
"""Records of the first step back from the end of a windows or alerts partition when
restoring; each further step doubles."""
CLOCK_SKEW_MARGIN = timedelta(minutes=5)
"""Between the clocks that stamp scored items (the scorer's) and windows (this stage's)."""
REMEMBERED_DEAD_LETTERS = 10_000
"""Source offsets this stage has dead-lettered, so a record read again (after a rebalance)
is not dead-lettered twice by the same process."""


@dataclass
class PartitionState:
    windows: KeyedWindows[Any]
    rule: SpikeRule[Any, Any]
    emitted: OrderedDict[str, None] = field(default_factory=OrderedDict)
    first_offset: dict[str, int] = field(default_factory=dict)
    """Offset of the first record of each open window."""
    links: dict[str, list[trace.Link]] = field(default_factory=dict)
    """Traces of the first items of each open window."""
    next_offset: int | None = None

    def remember_emitted(self, window_id: str) -> None:
        self.emitted[window_id] = None
        while len(self.emitted) > REMEMBERED_WINDOWS:
            self.emitted.popitem(last=False)

    def commit_offset(self) -> int | None:
        return min(self.first_offset.values(), default=self.next_offset)


@dataclass(frozen=True)
class _DeadLetter:
    source: tuple[str, int, int]
    """Topic, partition and offset of the unreadable record."""
    ack: Any


CaughtUpCheck = Callable[[Mapping[int, int]], set[int]]
"""Given this stage's positions on its partitions of the scored topic, the partitions whose
watermark may follow the clock (idle closing); an empty set on any doubt."""


class PipelineCaughtUp:
    """Whether everything published upstream of this stage has reached it, per partition:
    the scoring group has committed every partition of the news topic up to its high-water
    mark (it commits only after the broker acknowledged the scored outputs, so everything
    scored is on the scored topic), and the scored topic holds nothing at or after this
    stage's position. A quiet partition passes; one whose upstream is stalled (inference
    down, a scorer behind or not running) does not.

    The committed offsets are read first, the high-water marks after them (by a new
    group-less consumer, so none is older than the call): a record scored after the
    offsets were read is then on the scored topic in time to count as unread. Any error is
    "not caught up"."""

    def __init__(
        self,
        client_config: dict[str, Any],
        scorer_group: str,
        timeout_seconds: float = 5.0,
        source: str = SENTIMENT_TOPIC,
    ) -> None:
        """`source`: the topic the windowing stage reads (the scored or topics stream)."""
        self.client_config = client_config
        self.scorer_group = scorer_group
        self.timeout_seconds = timeout_seconds
        self.source = source
        self._failing = False

    def __call__(self, positions: Mapping[int, int]) -> set[int]:
        try:
            timeout_ms = int(self.timeout_seconds * 1000)
            admin = KafkaAdminClient(
                **{**self.client_config, "bootstrap_timeout_ms": timeout_ms, "request_timeout_ms": timeout_ms}
            )
            try:
                committed = admin.list_group_offsets({self.scorer_group: None}).get(self.scorer_group, {})
            finally:
                admin.close()
            offsets: dict[TopicPartition, int | None] = {
                partition: meta.offset
                for partition, meta in committed.items()
                if partition.topic == NEWS_TOPIC and meta.offset >= 0
            }
            offsets.update({TopicPartition(self.source, n): position for n, position in positions.items()})
            unread = unread_partitions(self.client_config, offsets, [NEWS_TOPIC], self.timeout_seconds)
        except Exception as error:  # never idle-close on doubt
            if not self._failing:
                logger.warning("cannot tell whether the pipeline is caught up (%s); no idle closing", error)
            self._failing = True
            return set()
        self._failing = False
        if any(partition.topic == NEWS_TOPIC for partition in unread):
            return set()  # news not yet scored (or scored but not acknowledged and committed)
        return {n for n in positions if TopicPartition(self.source, n) not in unread}


def window_settings(settings: MonitorSettings) -> WindowSettings:
    return WindowSettings(
        size=timedelta(minutes=settings.window_minutes),
        allowed_lateness=timedelta(seconds=settings.allowed_lateness_seconds),
        max_future=timedelta(seconds=settings.max_future_seconds),
        idle_timeout=timedelta(seconds=settings.idle_seconds),
    )


def alert_settings(settings: MonitorSettings) -> AlertSettings:
    return AlertSettings(
        min_items=settings.alert_min_items,
        z_threshold=settings.alert_z_threshold,
        min_share_negative=settings.alert_min_share_negative,
        baseline_windows=settings.alert_baseline_windows,
        cooldown=timedelta(minutes=settings.alert_cooldown_minutes),
    )


def topic_alert_settings(settings: MonitorSettings) -> TopicAlertSettings:
    return TopicAlertSettings(
        min_items=settings.topic_alert_min_items,
        z_threshold=settings.alert_z_threshold,
        min_share_negative=settings.alert_min_share_negative,
        baseline_windows=settings.alert_baseline_windows,
        cooldown=timedelta(minutes=settings.alert_cooldown_minutes),
        max_ticker_share=settings.topic_alert_max_ticker_share,
    )


@dataclass(frozen=True)
class Dimension:
    """What a windowing stage windows by: its input, its outputs and its rules."""

    name: str
    """`ticker` or `topic`: span attribute `infermesh.<name>`, logs."""
    source: str
    windows_topic: str
    alerts_topic: str
    window_model: type[WindowAggregate] | type[TopicWindow]
    alert_model: type[Alert] | type[TopicAlert]
    make_windows: Callable[[MonitorSettings], KeyedWindows[Any]]
    make_rule: Callable[[MonitorSettings], SpikeRule[Any, Any]]
    group: Callable[[MonitorSettings], str]


TICKERS = Dimension(
    "ticker",
    SENTIMENT_TOPIC,
    WINDOWS_TOPIC,
    ALERTS_TOPIC,
    WindowAggregate,
    Alert,
    lambda settings: TumblingWindows(window_settings(settings)),
    lambda settings: AlertRule(alert_settings(settings)),
    lambda settings: settings.windows_group,
)
TOPICS = Dimension(
    "topic",
    TOPIC_SENTIMENT_TOPIC,
    TOPIC_WINDOWS_TOPIC,
    TOPIC_ALERTS_TOPIC,
    TopicWindow,
    TopicAlert,
    lambda settings: TopicWindows(window_settings(settings)),
    lambda settings: TopicAlertRule(topic_alert_settings(settings)),
    lambda settings: settings.topics_group,
)


class WindowStage(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        client_config: dict[str, Any],
        settings: MonitorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        caught_up: CaughtUpCheck | None = None,
        dimension: Dimension = TICKERS,
    ) -> None:
        """`caught_up` tells which partitions may be closed by the clock when quiet
        (default: `PipelineCaughtUp` on the broker, asked at most every
        `caught_up_check_seconds`). `dimension`: ticker windows (the default) or topic
        windows (`TOPICS`)."""
        self.dimension = dimension
        self.consumer = consumer
        self.producer = producer
        self.client_config = client_config
        self.settings = settings
        self.clock = clock
        self.states: dict[int, PartitionState] = {}
        self.alerts_raised = 0
        self.windows_closed = 0
        self._stopping = threading.Event()
        self.assigned_partitions = 0
        """Partitions the group gave this stage, as of its last poll (for readiness)."""
        self.read_back_records = 0
        """Window and alert records read back at the last assignment."""
        self._dead_lettered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._caught_up_check = caught_up or PipelineCaughtUp(
            client_config, settings.scorer_group, source=dimension.source
        )
        self._caught_up: set[int] = set()
        self._caught_up_at: float | None = None
        """When `_caught_up` was asked (monotonic); None: ask before using it."""
        self._holding: set[int] = set()
        """Partitions whose idle closing waits for the pipeline to catch up (for the log)."""
        for topic in (dimension.source, dimension.windows_topic, dimension.alerts_topic):
            WORKER_INTERNAL_DEAD_LETTERED.labels(topic)  # exported at 0 from the start

    # ConsumerRebalanceListener: called inside poll().
    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for partition in revoked:
            self.states.pop(partition.partition, None)
        self._caught_up_at = None

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        numbers = sorted(p.partition for p in assigned)
        self._caught_up_at = None
        for number in numbers:
            self.states[number] = PartitionState(
                self.dimension.make_windows(self.settings), self.dimension.make_rule(self.settings)
            )
        if not numbers:
            return
        # A consumer of its own: the group's consumer is inside poll() here. It resets to
        # the earliest offset, as the group's consumer does: a committed offset the log no
        # longer holds means the group re-reads from the log start, so the read-back must
        # reach back to that record's time too (with "latest" it found no record and fell
        # back to the lookback, and older windows and alerts were emitted again).
        reader = restore_reader(self.client_config, str(self.consumer.config["group_id"]))
        try:
            since = self._read_back_since(reader, numbers)
            windows = read_back(reader, self.dimension.windows_topic, since)
            alerts = read_back(reader, self.dimension.alerts_topic, since)
        finally:
            reader.close(autocommit=False)
        self.read_back_records = len(windows) + len(alerts)
        dead_letters = []
        restored = 0
        for record in windows:  # per partition in offset order: each key's windows as emitted
            try:
                window = decode_internal(self.dimension.window_model, record.value)
            except PoisonRecord as poison:
                dead_letters.append(self._dead_letter(record, poison.reason, poison.detail))
                continue
            state = self.states[record.partition]
            if window.id not in state.emitted:
                state.rule.remember(window)
                state.remember_emitted(window.id)
                restored += 1
        for record in alerts:
            try:
                alert = decode_internal(self.dimension.alert_model, record.value)
                self.states[record.partition].rule.remember_alert(alert)
            except PoisonRecord as poison:
                dead_letters.append(self._dead_letter(record, poison.reason, poison.detail))
            except OverflowError:  # a window end near year 9999 plus the cooldown
                dead_letters.append(self._dead_letter(record, "schema", "window.window_end: out of range"))
        confirmed = self._confirm(dead_letters)
        logger.info(
            "windowing %ss on partitions %s (%d emitted windows and %d alerts read back, %d dead-lettered)",
            self.dimension.name,
            numbers,
            restored,
            len(alerts),
            confirmed,
        )

    def _read_back_since(self, reader: KafkaConsumer, numbers: list[int]) -> dict[int, int]:
        """Per partition, the record time (ms) from which windows and alerts are read back:
        the lookback, or earlier when the first scored record this stage will read again
        is older (the windows emitted since then must be known, or they would be emitted
        again)."""
        lookback = self.clock() - timedelta(hours=self.settings.restore_lookback_hours)
        since = {}
        for number in numbers:
            partition = TopicPartition(self.dimension.source, number)
            committed = reader.committed(partition)
            first = timestamp_at(reader, partition, committed) if committed is not None else None
            resume = datetime.fromtimestamp(first / 1000, UTC) - CLOCK_SKEW_MARGIN if first is not None else lookback
            since[number] = int(min(lookback, resume).timestamp() * 1000)
        return since

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        self.consumer.subscribe([self.dimension.source], listener=self)
        while not self._stopping.is_set():
            self.run_once()

    def run_once(self, timeout_ms: int = 500) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.max_batch)
        self.assigned_partitions = observe_lag(self.consumer)
        started = time.perf_counter()
        window_acks = []
        dead_letters = []
        touched: set[int] = set()
        now = self.clock()
        for partition, records in polled.items():
            state = self.states.get(partition.partition)
            if state is None:
                continue  # revoked meanwhile
            touched.add(partition.partition)
            KAFKA_CONSUMED.labels(self.dimension.source).inc(len(records))
            windows = state.windows
            late, future, emitted = windows.dropped_late, windows.dropped_future, windows.dropped_emitted
            for record in records:
                state.next_offset = record.offset + 1
                try:
                    item = decode_internal(ScoredItem, record.value)
                except PoisonRecord as poison:
                    dead_letters.append(self._dead_letter(record, poison.reason, poison.detail))
                    continue
                window = state.windows.window_of(item)
                if window is None:
                    continue
                if state.windows.add(item, now, state.emitted):
                    state.first_offset.setdefault(window, record.offset)
                    self._link(state, window, record.headers)
            WORKER_DROPPED_ITEMS.labels("late").inc(windows.dropped_late - late)
            WORKER_DROPPED_ITEMS.labels("future").inc(windows.dropped_future - future)
            WORKER_DROPPED_ITEMS.labels("emitted").inc(windows.dropped_emitted - emitted)
            for closed in state.windows.close_due():
                window_acks.append(self._emit(state, closed))
        # Every assigned partition, polled or not: a quiet one must not hold its last
        # windows (and their alerts) until its next record, which may be hours away; but
        # only once the pipeline is caught up, or a stall's backlog would all be late.
        awaiting = {number for number, state in self.states.items() if state.windows.awaits_idle_close(now)}
        caught_up = self._caught_up_partitions() if awaiting else set()
        self._log_holding(awaiting - caught_up)
        for number, state in self.states.items():
            idle_closed = state.windows.close_idle(now, caught_up=number in caught_up)
            if idle_closed:
                touched.add(number)
                WORKER_IDLE_CLOSED_WINDOWS.inc(len(idle_closed))
            for closed in idle_closed:
                window_acks.append(self._emit(state, closed))
        if not touched:
            return 0
        self.producer.flush()
        for ack in window_acks:
            ack.get(timeout=30)
        self._confirm(dead_letters)
        KAFKA_PRODUCED.labels(self.dimension.windows_topic).inc(len(window_acks))
        offsets = {}
        for number in touched:
            offset = self.states[number].commit_offset()
            if offset is not None:
                offsets[TopicPartition(self.dimension.source, number)] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)
        WORKER_BATCH_DURATION.labels("windows").observe(time.perf_counter() - started)
        return sum(len(r) for r in polled.values())

    def _caught_up_partitions(self) -> set[int]:
        """The assigned partitions that may be closed by the clock: caught up at the last
        check (at most `caught_up_check_seconds` old) and with nothing fetched since that
        this stage has not read."""
        checked = self._caught_up_at
        if checked is None or time.monotonic() - checked >= self.settings.caught_up_check_seconds:
            positions = {}
            for number in self.states:
                position = self.consumer.position(TopicPartition(self.dimension.source, number), timeout_ms=100)
                if position is not None:
                    positions[number] = position
            self._caught_up = self._caught_up_check(positions)
            self._caught_up_at = time.monotonic()
        caught_up = set()
        for number in self._caught_up & self.states.keys():
            partition = TopicPartition(self.dimension.source, number)
            highwater = self.consumer.highwater(partition)
            position = self.consumer.position(partition, timeout_ms=100)
            if position is not None and (highwater is None or position >= highwater):
                caught_up.add(number)
        return caught_up

    def _log_holding(self, holding: set[int]) -> None:
        if holding - self._holding:
            logger.info(
                "partitions %s are quiet but the pipeline is not caught up (scoring behind or stalled, "
                "or records not read yet): their windows wait rather than close by the clock",
                sorted(holding),
            )
        elif self._holding and not holding:
            logger.info("pipeline caught up: quiet partitions close their windows by the clock again")
        self._holding = holding

    def _dead_letter(self, record: Any, reason: str, detail: str) -> _DeadLetter | None:
        """Sends an unreadable record of the stage's topics to the dead-letter topic (the
        scorer's headers: reason, source topic, partition, offset); returns it for
        `_confirm`, or None when this process already dead-lettered that record."""
        source = (record.topic, record.partition, record.offset)
        if source in self._dead_lettered:
            return None
        logger.error("dead-lettering %s[%d]@%d: %s (%s)", record.topic, record.partition, record.offset, reason, detail)
        WORKER_DEAD_LETTERED.labels(reason).inc()
        WORKER_INTERNAL_DEAD_LETTERED.labels(record.topic).inc()
        KAFKA_PRODUCED.labels(DLQ_TOPIC).inc()
        ack = self.producer.send(
            DLQ_TOPIC, key=record.key, value=record.value or b"", headers=dead_letter_headers(record, reason, detail)
        )
        return _DeadLetter(source, ack)

    def _confirm(self, letters: list[_DeadLetter | None]) -> int:
        """Waits until the broker has acknowledged the dead letters, then remembers their
        sources (a send that failed raises, and the record is dead-lettered when read
        again); returns how many there were."""
        sent = [letter for letter in letters if letter is not None]
        if not sent:
            return 0
        self.producer.flush()
        for letter in sent:
            letter.ack.get(timeout=30)
            self._dead_lettered[letter.source] = None
        while len(self._dead_lettered) > REMEMBERED_DEAD_LETTERS:
            self._dead_lettered.popitem(last=False)
        return len(sent)

    @staticmethod
    def _link(state: PartitionState, window: str, headers: list[tuple[str, bytes]] | None) -> None:
        links = state.links.setdefault(window, [])
        if len(links) < MAX_WINDOW_LINKS:
            item_span = trace.get_current_span(extract_context(headers)).get_span_context()
            if item_span.is_valid:
                links.append(trace.Link(item_span))

    def _emit(self, state: PartitionState, closed: WindowAggregate | TopicWindow) -> Any:
        """Raises the window's alert if due, then sends the window; returns the window's ack."""
        attribute = f"infermesh.{self.dimension.name}"
        with _tracer.start_as_current_span(
            "close window",
            links=state.links.pop(closed.id, []),
            attributes={attribute: closed.key, "infermesh.items": closed.count},
        ):
            alert = state.rule.observe(closed)
            if alert is not None:
                with _tracer.start_as_current_span("emit alert", attributes={attribute: closed.key}):
                    logger.warning(
                        "alert %s: share negative %.2f vs baseline %.2f",
                        alert.id,
                        closed.share_negative,
                        alert.baseline_share_negative,
                    )
                    # The alert is acknowledged before its window is written: a restart
                    # treats emitted windows as done, so the window must never land alone.
                    self.producer.send(
                        self.dimension.alerts_topic,
                        key=closed.key.encode(),
                        value=alert.model_dump_json().encode(),
                        headers=inject_headers(),
                    ).get(timeout=30)
                KAFKA_PRODUCED.labels(self.dimension.alerts_topic).inc()
                WORKER_ALERTS.inc()
                self.alerts_raised += 1
            ack = self.producer.send(
                self.dimension.windows_topic,
                key=closed.key.encode(),
                value=closed.model_dump_json().encode(),
                headers=inject_headers(),
            )
        state.remember_emitted(closed.id)
        state.first_offset.pop(closed.id, None)
        self.windows_closed += 1
        WORKER_WINDOWS_CLOSED.inc()
        return ack


def restore_reader(client_config: dict[str, Any], group_id: str) -> KafkaConsumer:
    """The consumer that reads windows and alerts back on assignment (and the group's
    committed offsets, without joining it)."""
    return KafkaConsumer(**client_config, group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest")


def timestamp_at(
    reader: KafkaConsumer, partition: TopicPartition, offset: int, timeout_seconds: float = 30.0
) -> int | None:
    """Timestamp (ms) of the first record at or after `offset`; None when there is none."""
    reader.assign([partition])
    reader.seek(partition, offset)
    deadline = time.monotonic() + timeout_seconds
    while True:
        for batch in reader.poll(timeout_ms=200, max_records=1).values():
            if batch:
                return int(batch[0].timestamp)
        highwater = reader.highwater(partition)
        if highwater is not None and reader.position(partition) >= highwater:
            return None
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"could not read {partition.topic}[{partition.partition}]@{offset}")


def read_back(reader: KafkaConsumer, topic: str, since_ms: dict[int, int], timeout_seconds: float = 30.0) -> list[Any]:
    """The records of each partition of `topic` from the last one stamped before
    `since_ms[partition]` (or the log start) to the end, in offset order per partition.

    Read backwards from the high-water mark in doubling steps, so the cost follows what is
    asked for, not the topic's retention. Kafka's `offsets_for_times` would find the
    start in one call, but the embedded broker answers it (and `end_offsets`) wrongly;
    the high-water mark a fetch reports is right on both."""
    deadline = time.monotonic() + timeout_seconds
    records: list[Any] = []
    for number, since in sorted(since_ms.items()):
        partition = TopicPartition(topic, number)
        reader.assign([partition])
        reader.seek_to_beginning(partition)
        log_start = reader.position(partition)
        head: list[Any] = []
        while reader.highwater(partition) is None:  # the first fetch tells the high-water mark
            _check(deadline, partition)
            for batch in reader.poll(timeout_ms=200).values():
                head.extend(batch)
        highwater = reader.highwater(partition)
        assert highwater is not None and log_start is not None
        if highwater - log_start <= READ_BACK_STEP:
            records += head + _read_range(
                reader, partition, reader.position(partition) or log_start, highwater, deadline
            )
            continue
        chunks: list[list[Any]] = []
        end, step = highwater, READ_BACK_STEP
        while end > log_start:
            start = max(log_start, end - step)
            chunk = _read_range(reader, partition, start, end, deadline)
            chunks.append(chunk)
            if chunk and chunk[0].timestamp < since:
                break
            end, step = start, step * 2
        records += [record for chunk in reversed(chunks) for record in chunk]
    return records


def _read_range(reader: KafkaConsumer, partition: TopicPartition, start: int, end: int, deadline: float) -> list[Any]:
    """Records of `partition` with offsets in [start, end)."""
    reader.seek(partition, start)
    records: list[Any] = []
    while (reader.position(partition) or 0) < end:
        _check(deadline, partition)
        for batch in reader.poll(timeout_ms=200).values():
            records.extend(record for record in batch if record.offset < end)
    return records


def _check(deadline: float, partition: TopicPartition) -> None:
    # A Kafka error, so the stage runner rebuilds the clients rather than the process exiting.
    if time.monotonic() > deadline:
        raise KafkaTimeoutError(f"could not read {partition.topic}[{partition.partition}] back in time")
