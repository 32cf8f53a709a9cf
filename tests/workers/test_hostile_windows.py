"""Hostile records for the monitor, generated: poison bytes on `finance.news.v1`, and event
times from year 1 to year 9999 among the scored items the windows read."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.messages import NewsItem, PoisonRecord, ScoredItem, decode_news
from tests.properties import hypothesis_settings
from tests.reliability import Observed
from workers.sentiment_monitor.core import TumblingWindows, WindowSettings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
"""The wall clock the windowing stage passes in."""
MAX_BYTES = 64 * 1024


# --- Poison records ---------------------------------------------------------------------

VALID_NEWS = {"id": "n-1", "published_at": "2026-03-02T11:59:00Z", "source": "wire", "headline": "Acme rallies"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def news_records(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["bytes", "json", "field", "nested", "none"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":  # deep enough to exhaust the JSON parser's recursion
        depth = draw(st.integers(1, 200_000))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    # A valid record with one field replaced by anything, timestamps from year 1 to 9999 included.
    field = draw(st.sampled_from(sorted(VALID_NEWS) + ["tickers", "body"]))
    value = draw(
        json_values
        | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
        | st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00", "0001-01-01T05:00:00+14:00"])
    )
    return json.dumps(VALID_NEWS | {field: value}, default=str).encode()


@pytest.mark.reliability(
    "Hostile input",
    "finance.news.v1 records: random bytes, random JSON, valid records with one field replaced (year-1 and "
    "year-9999 timestamps included), JSON nested 200,000 deep",
    "a NewsItem or a dead letter with a reason; the scoring stage never stops",
)
def test_any_record_is_news_or_a_dead_letter(observed: Observed) -> None:
    seen: Counter[str] = Counter()

    @hypothesis_settings(400)
    @given(value=news_records())
    def check(value: bytes | None) -> None:
        try:
            item = decode_news(value, MAX_BYTES)
        except PoisonRecord as poison:
            seen[poison.reason] += 1
            assert poison.detail
            return
        seen["news"] += 1
        assert isinstance(item, NewsItem)
        item.text().encode("utf-8")  # what the scorer sends must be valid UTF-8

    check()
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(seen.items()) if reason != "news")
    observed.record(f"{sum(seen.values())} generated records: {seen['news']} news; dead-lettered: {reasons}")
    assert seen["news"] and seen["not-json"] and seen["schema"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[" * 100_000, "not-json"),  # used to raise RecursionError and stop the scoring stage
        (json.dumps(VALID_NEWS | {"published_at": "0001-01-01T00:00:00Z"}).encode(), "schema"),
    ],
    ids=["nested", "year-1"],
)
def test_records_that_used_to_stop_the_worker_are_dead_lettered(value: bytes, reason: str) -> None:
    with pytest.raises(PoisonRecord) as caught:
        decode_news(value, 256 * 1024)
    assert caught.value.reason == reason


# --- Event times ------------------------------------------------------------------------


def scored(item_id: str, ticker: str, published_at: datetime | str, label: str = "neutral") -> ScoredItem:
    """Read from JSON, as the windowing stage reads it from Kafka."""
    negative = label == "negative"
    document = {
        "id": f"{item_id}:{ticker}",
        "item_id": item_id,
        "ticker": ticker,
        "published_at": published_at.isoformat() if isinstance(published_at, datetime) else published_at,
        "source": "test",
        "headline": f"headline {item_id}",
        "label": label,
        "probabilities": {"negative": 0.9 if negative else 0.05, "neutral": 0.05 if negative else 0.9},
        "score": -0.85 if negative else 0.0,
        "model_name": "m",
        "model_version": "1",
    }
    return ScoredItem.model_validate_json(json.dumps(document))


HOSTILE_TIMES = [
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-12:00",  # past datetime.max in UTC
    (NOW + timedelta(days=3650)).isoformat(),  # +10 years
    (NOW + timedelta(days=1)).isoformat(),
    (NOW + timedelta(hours=2)).isoformat(),
    (NOW + timedelta(minutes=30)).isoformat(),  # inside the old one-hour bound: closed every window
    (NOW + timedelta(minutes=2)).isoformat(),  # just past the one-minute skew allowance
    "0001-01-01T00:00:00Z",
    "0001-01-01T05:00:00+14:00",  # before datetime.min in UTC
    "1970-01-01T00:00:00Z",
    "2001-09-11T13:46:00Z",
    (NOW - timedelta(days=400)).isoformat(),
]


def realistic_items(draw: st.DrawFn) -> list[ScoredItem]:
    """Items of two hours ending an hour ago, each at most 50 s later than in time order."""
    count = draw(st.integers(1, 40))
    offsets = sorted(draw(st.lists(st.integers(0, 7200), min_size=count, max_size=count)))
    jitter = draw(st.lists(st.integers(0, 50), min_size=count, max_size=count))
    start = NOW - timedelta(hours=3)
    items = [
        scored(f"r{n}", "AAPL" if n % 3 else "TSLA", start + timedelta(seconds=o), "negative" if n % 4 == 0 else "x")
        for n, o in enumerate(offsets)
    ]
    order = sorted(range(count), key=lambda n: offsets[n] + jitter[n])
    return [items[n] for n in order]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[ScoredItem], list[ScoredItem | str]]:
    """Realistic items, and the same with hostile ones mixed in: strings are the event times
    of hostile items (built during the run: some do not even parse), items are repeated
    deliveries of realistic ones (after the first: one delivered earlier is simply early)."""
    realistic = realistic_items(draw)
    mixed: list[ScoredItem | str] = [draw(st.sampled_from(HOSTILE_TIMES))]
    for item in realistic:
        mixed.append(item)
        while draw(st.integers(0, 4)) == 4:  # one in five: another hostile item here
            delivered = [i for i in mixed if isinstance(i, ScoredItem)]
            mixed.append(draw(st.sampled_from(HOSTILE_TIMES) | st.sampled_from(delivered)))
    return realistic, mixed


def run(items: list[ScoredItem | str]) -> tuple[list[tuple[str, int, float]], TumblingWindows, Counter[str]]:
    windows = TumblingWindows(WindowSettings(size=timedelta(minutes=5), allowed_lateness=timedelta(minutes=1)))
    outcome: Counter[str] = Counter()
    closed = []
    for number, item in enumerate([*items, "flush"]):
        if isinstance(item, str):
            moment = NOW - timedelta(minutes=1) if item == "flush" else item
            try:
                item = scored(f"h{number}", "AAPL", moment)
            except ValidationError:  # the stage logs and skips it
                outcome["unreadable"] += 1
                continue
        outcome["added" if windows.add(item, NOW) else "dropped"] += 1
        closed += windows.close_due()
    return [(w.id, w.count, round(w.share_negative, 9)) for w in closed], windows, outcome


@pytest.mark.reliability(
    "Hostile input",
    "Windowing: realistic scored items with future (+2 min, +30 min, +2 h, +1 day, +10 years, year 9999), far-past "
    "(year 1, 1970, 2001) and duplicate items mixed in",
    "the realistic items' windows are exactly as without them: no jump of the watermark, each item counted once",
)
def test_hostile_event_times_do_not_change_the_real_windows(observed: Observed) -> None:
    totals: Counter[str] = Counter()

    @hypothesis_settings(120)
    @given(stream=streams())
    def check(stream: tuple[list[ScoredItem], list[ScoredItem | str]]) -> None:
        realistic, mixed = stream
        expected, _, _ = run(list(realistic))
        got, windows, outcome = run(mixed)
        real_ids = {window_id for window_id, _, _ in expected}
        assert [w for w in got if w[0] in real_ids] == expected
        # Nothing is counted twice: at most one count per distinct item.
        distinct = {item.id for item in mixed if isinstance(item, ScoredItem)} | {
            f"h{n}" for n, item in enumerate(mixed) if isinstance(item, str)
        }
        assert sum(count for _, count, _ in got) <= len(distinct) + 1
        assert windows.watermark is not None and windows.watermark <= NOW
        totals.update(outcome)
        totals["dropped_future"] += windows.dropped_future
        totals["mixed"] += len(mixed) - len(realistic)

    check()
    observed.record(
        f"{totals['mixed']} hostile items in generated streams: {totals['dropped_future']} ignored as future, "
        f"{totals['unreadable']} unreadable (before 1970), the rest late or counted once; real windows unchanged"
    )
    assert totals["dropped_future"] and totals["unreadable"]


def test_one_far_future_item_does_not_make_the_next_real_items_late() -> None:
    windows = TumblingWindows()
    assert windows.add(scored("real-1", "AAPL", NOW - timedelta(minutes=10)), NOW)
    assert not windows.add(scored("bogus", "AAPL", "9999-12-31T23:59:59Z"), NOW)
    assert windows.add(scored("real-2", "AAPL", NOW - timedelta(minutes=9)), NOW)
    assert (windows.dropped_future, windows.dropped_late) == (1, 0)
    assert windows.watermark == NOW - timedelta(minutes=10)


def test_one_item_stamped_half_an_hour_ahead_neither_closes_windows_nor_makes_real_items_late() -> None:
    windows = TumblingWindows()  # 5-minute windows, 1 minute of lateness, 1 minute of skew allowed
    live = [(ticker, minutes) for minutes in (4.5, 4, 3.5, 3, 2.5, 2) for ticker in ("AAPL", "TSLA")]
    for n, (ticker, minutes) in enumerate(live[:4]):
        assert windows.add(scored(f"real-{n}", ticker, NOW - timedelta(minutes=minutes)), NOW)
    assert not windows.add(scored("bogus", "MSFT", NOW + timedelta(minutes=30)), NOW)
    assert windows.close_due() == []  # the AAPL and TSLA windows stay open
    for n, (ticker, minutes) in enumerate(live[4:], start=4):
        assert windows.add(scored(f"real-{n}", ticker, NOW - timedelta(minutes=minutes)), NOW)
    assert (windows.dropped_future, windows.dropped_late) == (1, 0)
    assert windows.watermark is not None and windows.watermark <= NOW - timedelta(minutes=1)
