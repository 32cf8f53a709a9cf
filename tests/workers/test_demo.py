"""The demo's story does not depend on the minute it is replayed: aligned to the window
grid, its windows hold the same items every run, and only TSLA's episode alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from shared.messages import ScoredItem
from workers.sentiment_monitor.core import AlertRule, TumblingWindows, WindowSettings
from workers.sentiment_monitor.demo import NEGATIVE, POSITIVE, TICKERS, WINDOW, replay_records

NEGATIVE_HEADLINES = {t.format(name=n, t=k) for t in NEGATIVE for k, n in TICKERS.items()}
POSITIVE_HEADLINES = {t.format(name=n, t=k) for t in POSITIVE for k, n in TICKERS.items()}


def scored(record: dict[str, str]) -> ScoredItem:
    """The label the demo's templates mean (the model agrees on these clear headlines)."""
    headline = record["headline"]
    ticker = next(t for t, name in TICKERS.items() if t in headline or name in headline)
    label = (
        "negative" if headline in NEGATIVE_HEADLINES else "positive" if headline in POSITIVE_HEADLINES else "neutral"
    )
    probabilities = {name: 0.9 if name == label else 0.05 for name in ("negative", "neutral", "positive")}
    return ScoredItem(
        id=f"{record['id']}:{ticker}",
        item_id=record["id"],
        ticker=ticker,
        published_at=datetime.fromisoformat(record["published_at"]),
        source=record["source"],
        headline=headline,
        label=label,
        probabilities=probabilities,
        score=0.0,
        model_name="finance-sentiment",
        model_version="1",
    )


def alerts_of_a_replay(end: datetime) -> list[tuple[str, float]]:
    windows: dict[str, TumblingWindows] = {}
    rules: dict[str, AlertRule] = {}
    alerts = []
    for _, value in replay_records("test", end):
        item = scored(json.loads(value))
        assert item.ticker is not None
        ticker_windows = windows.setdefault(item.ticker, TumblingWindows(WindowSettings(size=WINDOW)))
        ticker_windows.add(item, end)
        for closed in ticker_windows.close_due():
            alert = rules.setdefault(item.ticker, AlertRule()).observe(closed)
            if alert is not None:
                alerts.append((alert.ticker, closed.share_negative))
    return alerts


def test_the_demo_raises_one_tsla_alert_whatever_the_minute_it_runs() -> None:
    ends = [datetime(2026, 11, 24, 9, tzinfo=UTC) + timedelta(seconds=s) for s in range(0, 300, 25)]
    stories = {end.isoformat(): alerts_of_a_replay(end) for end in ends}
    assert all(len(alerts) == 1 and alerts[0][0] == "TSLA" and alerts[0][1] >= 0.5 for alerts in stories.values()), (
        stories
    )
