"""Windows, alerts, attribution and poison rules as pure code (no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.core import AlertRule, AlertSettings, TumblingWindows, WindowSettings, window_start
from workers.sentiment_monitor.messages import (
    NewsItem,
    PoisonRecord,
    ScoredItem,
    WindowAggregate,
    decode_internal,
    decode_news,
    news_json_schema,
)

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)


def scored(item_id: str, ticker: str, minute: float, label: str = "neutral") -> ScoredItem:
    negative = {"negative": 0.9, "neutral": 0.05, "positive": 0.05}
    neutral = {"negative": 0.05, "neutral": 0.9, "positive": 0.05}
    probabilities = negative if label == "negative" else neutral
    return ScoredItem(
        id=f"{item_id}:{ticker}",
        item_id=item_id,
        ticker=ticker,
        published_at=T0 + timedelta(minutes=minute),
        source="test",
        headline=f"headline {item_id}",
        label=label,
        probabilities=probabilities,
        score=probabilities["positive"] - probabilities["negative"],
        model_name="m",
        model_version="1",
    )


def test_window_start_aligns_to_the_size() -> None:
    assert window_start(T0 + timedelta(minutes=7, seconds=3), timedelta(minutes=5)) == T0 + timedelta(minutes=5)


def test_windows_close_when_the_watermark_passes_and_count_each_item_once() -> None:
    windows = TumblingWindows(WindowSettings(size=timedelta(minutes=5), allowed_lateness=timedelta(minutes=1)))
    for item in (scored("a", "AAPL", 0), scored("b", "AAPL", 1, "negative"), scored("b", "AAPL", 1, "negative")):
        assert windows.add(item, NOW)
    assert windows.add(scored("c", "MSFT", 2), NOW)
    assert windows.close_due() == []  # watermark 00:01
    windows.add(scored("d", "AAPL", 5.5), NOW)
    assert windows.close_due() == []  # watermark 00:04:30, lateness not over yet
    windows.add(scored("e", "AAPL", 6.5), NOW)
    closed = windows.close_due()  # watermark 00:05:30
    assert [(w.ticker, w.count) for w in closed] == [("AAPL", 2), ("MSFT", 1)]
    aapl = closed[0]
    assert aapl.id == f"AAPL:{T0.isoformat()}"
    assert aapl.share_negative == 0.5
    assert [e.item_id for e in aapl.top_negative] == ["b"]
    # Too late for a closed window; far-future items are ignored too.
    assert not windows.add(scored("late", "AAPL", 3), NOW)
    assert not windows.add(scored("future", "AAPL", 60 * 48), NOW)
    assert (windows.dropped_late, windows.dropped_future) == (1, 1)


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(30))))
def test_arrival_order_within_the_lateness_does_not_change_the_windows(order: list[int]) -> None:
    # 30 items one every 20 s over 10 minutes; any arrival order within 10 minutes of lateness.
    items = [
        scored(f"i{n}", "TSLA" if n % 2 else "NVDA", n / 3, "negative" if n % 5 == 0 else "neutral") for n in range(30)
    ]

    def run(sequence: list[ScoredItem]) -> list[tuple[str, str, int, float]]:
        windows = TumblingWindows(WindowSettings(allowed_lateness=timedelta(minutes=10)))
        for item in sequence:
            windows.add(item, NOW)
        windows.add(scored("flush", "ZZZ", 60), NOW)
        return [(w.ticker, w.id, w.count, round(w.share_negative, 6)) for w in windows.close_due()]

    assert run([items[i] for i in order]) == run(items)


def test_a_quiet_partition_closes_its_last_window_by_the_clock() -> None:
    settings = WindowSettings(size=timedelta(minutes=5), allowed_lateness=timedelta(minutes=1))
    windows = TumblingWindows(settings)
    live = T0 + timedelta(minutes=4)  # items arrive as they are published
    for n in range(4):
        assert windows.add(scored(f"q{n}", "AAPL", 3 + n * 0.25), live)
    assert windows.close_due() == []
    assert windows.close_idle(live + timedelta(seconds=30), caught_up=True) == []  # not idle for a minute yet
    # The watermark goes on at the clock's pace from the newest item (03:45, arrived at
    # 04:00): the window [00:00, 05:00) closes when 05:00 + 1 min lateness is reached, at
    # 06:15 by the clock, without another record.
    assert windows.close_idle(T0 + timedelta(minutes=6, seconds=10), caught_up=True) == []
    # Not while the caller cannot tell that everything published has reached it.
    assert windows.awaits_idle_close(T0 + timedelta(minutes=6, seconds=20))
    assert windows.close_idle(T0 + timedelta(minutes=6, seconds=20), caught_up=False) == []
    (closed,) = windows.close_idle(T0 + timedelta(minutes=6, seconds=20), caught_up=True)
    assert (closed.ticker, closed.count) == ("AAPL", 4)
    assert windows.watermark == T0 + timedelta(minutes=5, seconds=5)
    assert not windows.awaits_idle_close(T0 + timedelta(minutes=7))  # nothing open


def test_an_upstream_stall_longer_than_the_idle_time_drops_none_of_its_backlog() -> None:
    # Default settings. Live items until 09:02, then inference is down for ten minutes:
    # nothing reaches the stage, exactly as if the partition had gone quiet. The stage
    # polls all along, but the pipeline is not caught up (news waits unscored), so the
    # clock must not move the watermark; then the backlog arrives.
    windows = TumblingWindows()
    for n in range(10):
        assert windows.add(scored(f"live{n}", "AAPL", n * 0.2), T0 + timedelta(minutes=2))
    for second in range(0, 10 * 60 + 1, 10):
        assert windows.close_idle(T0 + timedelta(minutes=2, seconds=second), caught_up=False) == []
    back = T0 + timedelta(minutes=12)
    backlog = [scored(f"b{n}", "AAPL", 2 + n / 6) for n in range(60)]  # published 09:02 to 09:11:50
    assert all(windows.add(item, back) for item in backlog)
    assert windows.dropped_late == 0
    assert [(w.window_start, w.count) for w in windows.close_due()] == [(T0, 10 + 18), (T0 + timedelta(minutes=5), 30)]
    # Caught up again and quiet: the last window closes by the clock.
    (last,) = windows.close_idle(T0 + timedelta(minutes=16, seconds=30), caught_up=True)
    assert (last.window_start, last.count, windows.dropped_late) == (T0 + timedelta(minutes=10), 12, 0)


def test_a_stamp_inside_the_skew_allowance_does_not_make_on_time_items_late() -> None:
    # 12:00:30 by the worker's clock; a producer's clock runs 50 s ahead (under the 60 s allowance).
    now = T0 + timedelta(hours=3, seconds=30)
    windows = TumblingWindows(WindowSettings(allowed_lateness=timedelta(minutes=1)))
    assert windows.add(scored("skewed", "TSLA", 180 + 1 + 20 / 60), now)  # stamped 12:01:20
    assert windows.watermark == now - timedelta(minutes=1)  # as an item published now would
    # Published 11:59:50, arriving 40 s later: within the lateness, so its window
    # [11:55, 12:00) must still be open (the skewed stamp alone would have closed it).
    assert windows.add(scored("on-time", "AAPL", 180 - 10 / 60), now)
    assert windows.close_due() == [] and windows.dropped_late == 0


def test_late_items_are_counted_even_when_their_window_was_emitted() -> None:
    windows = TumblingWindows(WindowSettings(allowed_lateness=timedelta(minutes=1)))
    assert windows.add(scored("a", "AAPL", 1), NOW)
    assert windows.add(scored("b", "AAPL", 7), NOW)
    (closed,) = windows.close_due()
    emitted = {closed.id}
    assert not windows.add(scored("late", "AAPL", 2), NOW, emitted)
    assert windows.dropped_late == 1
    # Read again after a restart (watermark not yet past it): not late, but not silently
    # left out either (it may be an item the previous owner never counted).
    fresh = TumblingWindows(WindowSettings(allowed_lateness=timedelta(minutes=1)))
    assert not fresh.add(scored("a", "AAPL", 1), NOW, emitted)
    assert (fresh.dropped_late, fresh.dropped_future, fresh.dropped_emitted) == (0, 0, 1)


def test_internal_records_that_cannot_be_read_name_their_reason() -> None:
    good = window("ACME", 0, 10, 1)
    assert isinstance(good, WindowAggregate)
    assert decode_internal(WindowAggregate, good.model_dump_json().encode()) == good
    naive = good.model_dump(mode="json") | {"window_end": "2026-11-24T09:05:00"}
    cases = [(None, "empty"), (b"{oops", "not-json"), (json.dumps(naive).encode(), "schema")]
    for value, reason in cases:
        with pytest.raises(PoisonRecord) as caught:
            decode_internal(WindowAggregate, value)
        assert caught.value.reason == reason and caught.value.detail


def window(ticker: str, index: int, count: int, negatives: int) -> object:
    windows = TumblingWindows()
    for n in range(count):
        windows.add(
            scored(f"{ticker}-{index}-{n}", ticker, index * 5 + n * 0.1, "negative" if n < negatives else "neutral"),
            NOW,
        )
    windows.add(scored("flush", ticker, index * 5 + 30), NOW)
    (closed, *_) = windows.close_due()
    return closed


def test_a_negative_episode_raises_exactly_one_alert_and_steady_tickers_none() -> None:
    rule = AlertRule(AlertSettings(min_items=5, z_threshold=3.0, cooldown=timedelta(minutes=30)))
    alerts = []
    for index in range(20):
        episode = 8 <= index <= 10  # three windows of mostly negative news
        alerts += [rule.observe(window("ACME", index, 10, 8 if episode else 1))]  # type: ignore[arg-type]
        alerts += [rule.observe(window("STDY", index, 10, 1))]  # type: ignore[arg-type]
    raised = [a for a in alerts if a is not None]
    assert len(raised) == 1
    alert = raised[0]
    assert alert.ticker == "ACME" and alert.window.window_start == T0 + timedelta(minutes=40)
    assert alert.baseline_share_negative == pytest.approx(0.1) and alert.z_score >= 3
    assert alert.window.top_negative and alert.id == alert.window.id


def test_small_windows_and_young_tickers_do_not_alert() -> None:
    rule = AlertRule(AlertSettings(min_items=5, min_baseline_windows=3))
    assert rule.observe(window("NEW", 0, 10, 10)) is None  # type: ignore[arg-type]  # no history yet
    for index in range(1, 4):
        rule.observe(window("NEW", index, 10, 0))  # type: ignore[arg-type]
    assert rule.observe(window("NEW", 4, 4, 4)) is None  # type: ignore[arg-type]  # too few items


def test_attribution_from_cashtags_field_and_company_names() -> None:
    attributor = TickerAttributor.from_csv()
    item = NewsItem(
        id="1",
        published_at=T0,
        source="wire",
        headline="$tsla and Bank of America slide; $5M fine for a $BRK.B unit",
        body="Analysts at Goldman Sachs see more pain.",
        tickers=["AAPL"],
    )
    assert attributor.tickers(item) == ["AAPL", "BAC", "BRK.B", "GS", "TSLA"]
    assert TickerAttributor({}).tickers(item) == ["AAPL", "BRK.B", "TSLA"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"\xff\xfe{}", "invalid-utf8"),
        (b"{not json", "not-json"),
        (json.dumps({"id": "1", "source": "s", "headline": "h"}).encode(), "schema"),
        (
            json.dumps({"id": "1", "published_at": "2026-11-24T09:00:00", "source": "s", "headline": "h"}).encode(),
            "schema",
        ),
        (
            json.dumps(
                {"id": "1", "published_at": "2026-11-24T09:00:00Z", "source": "s", "headline": "h", "tickers": ["$A"]}
            ).encode(),
            "schema",
        ),
        (b'{"id": "1"}' + b" " * 5000, "too-large"),
    ],
)
def test_poison_records_name_their_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonRecord) as caught:
        decode_news(value, max_bytes=4096)
    assert caught.value.reason == reason and caught.value.detail


def test_a_good_record_decodes_and_the_schema_is_published() -> None:
    item = decode_news(
        json.dumps(
            {"id": "n1", "published_at": "2026-11-24T09:00:00+01:00", "source": "wire", "headline": " Up ", "extra": 1}
        ).encode(),
        max_bytes=4096,
    )
    assert item.headline == "Up" and item.published_at.utcoffset() == timedelta(hours=1)
    schema = news_json_schema()
    assert set(schema["required"]) == {"id", "published_at", "source", "headline"}
    with open("docs/schemas/finance.news.v1.json", encoding="utf-8") as published:
        assert json.load(published) == schema, "run `infermesh schema > docs/schemas/finance.news.v1.json`"
