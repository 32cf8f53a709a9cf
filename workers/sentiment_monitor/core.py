"""Event-time tumbling windows, per ticker and per topic, and the negative-spike alert rule.

Pure and deterministic: no Kafka, no clock reads (callers pass times in), so the rules
are tested directly: the same items, in the same order, at the same times give the same
windows and alerts (with the same ids). A restarted worker does not always raise the
alerts the first one would have: it rebuilds a ticker's baseline only from the windows
emitted within the restore lookback (windowing.py), so a ticker with fewer windows than
the baseline needs in that time starts a new baseline and stays quiet until it has
`min_baseline_windows` again.

Ticker windows (`TumblingWindows`) and topic windows (`TopicWindows`) share the window
and watermark rules; they differ in the key (an item's ticker, or its topic) and in what
a closed window tells: a ticker's topic mix, or a topic's ticker mix. A topic alert
(`TopicAlertRule`) is the ticker rule plus breadth: one company's bad news is its
ticker's alert, not its topic's.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from workers.sentiment_monitor.messages import (
    Alert,
    HeadlineEvidence,
    ScoredItem,
    TopicAlert,
    TopicWindow,
    WindowAggregate,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window_start(moment: datetime, size: timedelta) -> datetime:
    """Start of the tumbling window holding `moment` (windows align to the Unix epoch)."""
    steps = (moment - EPOCH) // size
    return EPOCH + steps * size


def window_id(key: str, start: datetime) -> str:
    """The deterministic id of a ticker's (or a topic's) window; an alert on it has the same id."""
    return f"{key}:{start.isoformat()}"


WindowT = TypeVar("WindowT", WindowAggregate, TopicWindow)
AlertT = TypeVar("AlertT", Alert, TopicAlert)


@dataclass
class _OpenWindow:
    key: str
    start: datetime
    end: datetime
    scores: dict[str, ScoredItem] = field(default_factory=dict)
    """By item id: a redelivered item counts once."""


@dataclass(frozen=True)
class WindowSettings:
    size: timedelta = timedelta(minutes=5)
    allowed_lateness: timedelta = timedelta(minutes=1)
    """How far behind the newest event time an item may arrive and still be counted."""
    max_future: timedelta = timedelta(minutes=1)
    """Items stamped further ahead of the caller's clock are dropped (counted in
    `dropped_future`): an allowance for producers' clock skew, not for wrong stamps."""
    idle_timeout: timedelta = timedelta(minutes=1)
    """After this long (caller's clock) without a newer event time, `close_idle` lets the
    watermark follow the clock from the newest event time seen, if the caller says every
    item published meanwhile has reached it (`caught_up`)."""
    top_headlines: int = 3


class KeyedWindows(Generic[WindowT]):
    """Collects scored items into per-key windows of one partition; emits a window once
    the partition's watermark passes its end. `TumblingWindows` keys by ticker,
    `TopicWindows` by topic.

    The watermark is the bounded-out-of-orderness one of Flink
    (`WatermarkStrategy.forBoundedOutOfOrderness`) and Kafka Streams (stream time minus the
    grace period): newest event time seen minus the allowed lateness, one per partition.
    Like any max, one wrong stamp would move it for every ticker of the partition, so two
    bounds come from processing time (the caller's clock), as Kafka's own
    `log.message.timestamp.after.max.ms` (KIP-937) bounds record timestamps by the
    broker's clock:
    - items stamped more than `max_future` ahead of the clock are dropped and counted;
    - an accepted item moves the watermark no further than the clock minus the lateness,
      as an item published this instant would: a stamp inside the skew allowance cannot
      close a window earlier than real news could.
    A partition that goes quiet keeps its windows open until `close_idle` (called on every
    poll) advances its watermark with the clock, like a processing-time timer in Flink, and
    only when the caller knows nothing is still on its way: a stalled upstream (inference
    down, a scorer behind) looks exactly like a quiet partition, and moving the watermark
    on through the stall would drop its whole backlog as late.
    """

    def __init__(self, settings: WindowSettings | None = None) -> None:
        self.settings = settings or WindowSettings()
        self._open: dict[tuple[str, datetime], _OpenWindow] = {}
        self.watermark: datetime | None = None
        self._stream_time: datetime | None = None
        """Newest accepted event time (capped at the clock when it was accepted)."""
        self._stream_time_at: datetime | None = None
        """The caller's clock when `_stream_time` last moved."""
        self.dropped_late = 0
        self.dropped_future = 0
        self.dropped_emitted = 0
        """Items whose window is in `emitted` but not behind the watermark."""

    @staticmethod
    def key_of(item: ScoredItem) -> str | None:
        """What the item is windowed by; None: not windowed here."""
        raise NotImplementedError

    def _aggregate(self, window: _OpenWindow) -> WindowT:
        raise NotImplementedError

    def window_of(self, item: ScoredItem) -> str | None:
        """Id of the window the item belongs to (None without a key)."""
        key = self.key_of(item)
        if key is None:
            return None
        return window_id(key, window_start(item.published_at, self.settings.size))

    def add(self, item: ScoredItem, now: datetime, emitted: Container[str] = frozenset()) -> bool:
        """Adds an item with a key; False (and counted) when it is too late or too far
        ahead of `now`, the caller's clock (processing time), or when its window is in
        `emitted` but not behind the watermark (`dropped_emitted`): usually an item read
        again after a restart, already counted by the owner that emitted the window, but
        it may be one that owner never saw, so it is counted too, never dropped silently."""
        key = self.key_of(item)
        if key is None:
            return False
        if item.published_at > now + self.settings.max_future:
            self.dropped_future += 1
            return False
        start = window_start(item.published_at, self.settings.size)
        end = start + self.settings.size
        if self.watermark is not None and end <= self.watermark:
            self.dropped_late += 1
            return False
        if window_id(key, start) in emitted:
            self.dropped_emitted += 1
            return False
        window = self._open.setdefault((key, start), _OpenWindow(key, start, end))
        window.scores[item.item_id] = item
        event_time = min(item.published_at, now)
        if self._stream_time is None or event_time > self._stream_time:
            self._stream_time, self._stream_time_at = event_time, now
            self._advance(event_time - self.settings.allowed_lateness)
        return True

    def close_due(self) -> list[WindowT]:
        """Windows whose end the watermark has passed, oldest first."""
        if self.watermark is None:
            return []
        due = sorted(
            (key for key, window in self._open.items() if window.end <= self.watermark),
            key=lambda key: (key[1], key[0]),
        )
        return [self._aggregate(self._open.pop(key)) for key in due]

    def is_idle(self, now: datetime) -> bool:
        """Whether the newest event time has not moved for `idle_timeout` of the clock."""
        return self._stream_time_at is not None and now - self._stream_time_at >= self.settings.idle_timeout

    def awaits_idle_close(self, now: datetime) -> bool:
        """Whether `close_idle` has windows to close if the caller can say `caught_up`."""
        return bool(self._open) and self.is_idle(now)

    def close_idle(self, now: datetime, *, caught_up: bool) -> list[WindowT]:
        """Closes what is due once the newest event time has not moved for `idle_timeout`
        of the caller's clock: the watermark then goes on from it at the clock's pace, so
        a quiet partition's last window closes at most size + allowed lateness (or the
        idle timeout, if longer) after its last item, as if newer items kept arriving.
        It never passes the clock minus the allowed lateness.

        Only when `caught_up`: the caller has read everything published upstream so far
        (every stage before it has processed its input, and this partition has no lag).
        A quiet partition and a stalled upstream look the same from here; on any doubt the
        caller passes False and the windows wait, late rather than lost. Once caught up
        again, the backlog has been added and moved the watermark itself."""
        if not caught_up or self._stream_time is None or not self.is_idle(now):
            return []
        assert self._stream_time_at is not None
        idle = now - self._stream_time_at
        self._advance(min(self._stream_time + idle, now) - self.settings.allowed_lateness)
        return self.close_due()

    def _advance(self, candidate: datetime) -> None:
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate

    def open_window_ids(self) -> set[str]:
        return {window_id(key, start) for key, start in self._open}

    def _most_negative(self, negative: list[ScoredItem], with_tickers: bool) -> list[HeadlineEvidence]:
        top = sorted(negative, key=lambda i: (-i.probabilities.get("negative", 0.0), i.item_id))
        return [
            HeadlineEvidence(
                item_id=i.item_id,
                headline=i.headline,
                negative_probability=i.probabilities.get("negative", 0.0),
                tickers=list(i.tickers) if with_tickers else [],
            )
            for i in top[: self.settings.top_headlines]
        ]


class TumblingWindows(KeyedWindows[WindowAggregate]):
    """Per-ticker windows; each closed window carries its topic mix."""

    @staticmethod
    def key_of(item: ScoredItem) -> str | None:
        return item.ticker

    def _aggregate(self, window: _OpenWindow) -> WindowAggregate:
        items = list(window.scores.values())
        negative = [i for i in items if i.label == "negative"]
        return WindowAggregate(
            id=window_id(window.key, window.start),
            ticker=window.key,
            window_start=window.start,
            window_end=window.end,
            count=len(items),
            mean_score=statistics.fmean(i.score for i in items),
            share_negative=len(negative) / len(items),
            top_negative=self._most_negative(negative, with_tickers=False),
            topics=_sorted_counts(i.topic for i in items if i.topic is not None),
            negative_topics=_sorted_counts(i.topic for i in negative if i.topic is not None),
        )


class TopicWindows(KeyedWindows[TopicWindow]):
    """Per-topic windows across tickers (items naming no ticker count too); each closed
    window carries its ticker mix. Items are counted once per item id, whatever the number
    of tickers they name."""

    @staticmethod
    def key_of(item: ScoredItem) -> str | None:
        return item.topic

    def _aggregate(self, window: _OpenWindow) -> TopicWindow:
        items = list(window.scores.values())
        negative = [i for i in items if i.label == "negative"]
        return TopicWindow(
            id=window_id(window.key, window.start),
            topic=window.key,
            window_start=window.start,
            window_end=window.end,
            count=len(items),
            mean_score=statistics.fmean(i.score for i in items),
            share_negative=len(negative) / len(items),
            top_negative=self._most_negative(negative, with_tickers=True),
            tickers=_sorted_counts(t for i in items for t in dict.fromkeys(i.tickers)),
            negative_tickers=_sorted_counts(t for i in negative for t in dict.fromkeys(i.tickers)),
            without_ticker=sum(1 for i in items if not i.tickers),
        )


def _sorted_counts(keys: Iterable[str]) -> dict[str, int]:
    """Counts, largest first (ties by name): the order a reader wants, and deterministic."""
    counts = Counter(keys)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class AlertSettings:
    min_items: int = 5
    """A window needs at least this many items to alert."""
    z_threshold: float = 3.0
    """How many baseline standard deviations above the baseline the share must be."""
    min_share_negative: float = 0.4
    """And at least this share of negative items, whatever the baseline."""
    baseline_windows: int = 12
    """Closed windows of the ticker the baseline is computed from."""
    min_baseline_windows: int = 3
    """No alert before a ticker has this many windows of history."""
    stddev_floor: float = 0.05
    """Lower bound on the baseline's spread, so a perfectly steady ticker does not alert
    on one extra negative item."""
    cooldown: timedelta = timedelta(minutes=30)
    """After an alert, the ticker stays quiet this long (one episode, one alert)."""


@dataclass(frozen=True)
class TopicAlertSettings(AlertSettings):
    max_ticker_share: float = 0.5
    """A topic window alerts only when no single ticker names more than this share of its
    negative items: a storm about one company is that ticker's alert (the ticker rule
    raises it), not news about the topic. Items naming no ticker belong to no company."""


class SpikeRule(Generic[WindowT, AlertT]):
    """Per-key rolling baseline of the share of negative items; alerts on spikes."""

    def __init__(self, settings: AlertSettings) -> None:
        self.settings = settings
        self._history: dict[str, deque[float]] = {}
        self._quiet_until: dict[str, datetime] = {}

    def remember(self, window: WindowT) -> None:
        """Restores history from an already emitted window (after a restart)."""
        self._history.setdefault(window.key, deque(maxlen=self.settings.baseline_windows)).append(window.share_negative)

    def remember_alert(self, alert: AlertT) -> None:
        """Restores a key's cooldown from an already emitted alert."""
        key = alert.window.key
        quiet_until = alert.window.window_end + self.settings.cooldown
        if quiet_until > self._quiet_until.get(key, quiet_until - timedelta(1)):
            self._quiet_until[key] = quiet_until

    def observe(self, window: WindowT) -> AlertT | None:
        """Feeds one closed window (in window order per key); returns an alert or None."""
        settings = self.settings
        history = self._history.setdefault(window.key, deque(maxlen=settings.baseline_windows))
        alert = None
        if len(history) >= settings.min_baseline_windows and window.count >= settings.min_items:
            baseline = statistics.fmean(history)
            spread = max(statistics.pstdev(history), settings.stddev_floor)
            z_score = (window.share_negative - baseline) / spread
            quiet_until = self._quiet_until.get(window.key)
            cooling = quiet_until is not None and window.window_start < quiet_until
            if (
                z_score >= settings.z_threshold
                and window.share_negative >= settings.min_share_negative
                and not cooling
                and self._broad_enough(window)
            ):
                alert = self._alert(window, baseline, spread, len(history), z_score if math.isfinite(z_score) else 1e9)
                self._quiet_until[window.key] = window.window_end + settings.cooldown
        # A spike stays out of the baseline it is judged against only while it is judged;
        # afterwards it is history like any other window.
        history.append(window.share_negative)
        return alert

    def _broad_enough(self, window: WindowT) -> bool:
        return True

    def _alert(self, window: WindowT, baseline: float, spread: float, windows: int, z_score: float) -> AlertT:
        raise NotImplementedError


class AlertRule(SpikeRule[WindowAggregate, Alert]):
    """Per-ticker rolling baseline of the share of negative items; alerts on spikes."""

    def __init__(self, settings: AlertSettings | None = None) -> None:
        super().__init__(settings or AlertSettings())

    def _alert(self, window: WindowAggregate, baseline: float, spread: float, windows: int, z_score: float) -> Alert:
        return Alert(
            id=window.id,
            ticker=window.ticker,
            window=window,
            baseline_share_negative=baseline,
            baseline_stddev=spread,
            baseline_windows=windows,
            z_score=z_score,
        )


def largest_ticker_share(window: TopicWindow) -> float:
    """Share of a topic window's negative items that name its most-named ticker."""
    negatives = round(window.share_negative * window.count)
    if negatives == 0:
        return 0.0
    return min(1.0, max(window.negative_tickers.values(), default=0) / negatives)


class TopicAlertRule(SpikeRule[TopicWindow, TopicAlert]):
    """The ticker rule per topic, against the topic's own baseline, plus breadth: no
    alert when one ticker names more than `max_ticker_share` of the negative items."""

    settings: TopicAlertSettings

    def __init__(self, settings: TopicAlertSettings | None = None) -> None:
        super().__init__(settings or TopicAlertSettings())

    def _broad_enough(self, window: TopicWindow) -> bool:
        return largest_ticker_share(window) <= self.settings.max_ticker_share

    def _alert(self, window: TopicWindow, baseline: float, spread: float, windows: int, z_score: float) -> TopicAlert:
        return TopicAlert(
            id=window.id,
            topic=window.topic,
            window=window,
            baseline_share_negative=baseline,
            baseline_stddev=spread,
            baseline_windows=windows,
            z_score=z_score,
            largest_ticker_share=largest_ticker_share(window),
        )
