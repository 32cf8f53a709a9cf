"""The demo's story does not depend on the minute it is replayed: aligned to the window
grid, its windows hold the same items every run; only TSLA's episode raises a ticker
alert, and only the hawkish central-bank burst (naming no ticker) a topic alert."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from shared.messages import ScoredItem
from workers.sentiment_monitor.attribution import TickerAttributor
from workers.sentiment_monitor.consumer import topic_record
from workers.sentiment_monitor.core import (
    AlertRule,
    TopicAlertRule,
    TopicWindows,
    TumblingWindows,
    WindowSettings,
)
from workers.sentiment_monitor.demo import (
    CENTRAL_BANK_NEGATIVE,
    CENTRAL_BANKS,
    NEGATIVE,
    POSITIVE,
    TEMPLATE_TOPICS,
    TICKERS,
    WINDOW,
    demo_stream,
    replay_records,
)
from workers.sentiment_monitor.messages import NewsItem
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.windowing import topic_alert_settings

NEGATIVE_HEADLINES = {t.format(name=n, t=k) for t in NEGATIVE for k, n in TICKERS.items()} | set(CENTRAL_BANK_NEGATIVE)
POSITIVE_HEADLINES = {t.format(name=n, t=k) for t in POSITIVE for k, n in TICKERS.items()}
TOPICS = {t.format(name=n, t=k): topic for t, topic in TEMPLATE_TOPICS.items() for k, n in TICKERS.items()}
ATTRIBUTOR = TickerAttributor.from_csv()


def scored(record: dict[str, str]) -> list[ScoredItem]:
    """The labels the demo's templates mean (sentiment, and topic as a two-headed model
    reads these clear headlines), one record per ticker found, as the scoring stage makes."""
    headline = record["headline"]
    label = (
        "negative" if headline in NEGATIVE_HEADLINES else "positive" if headline in POSITIVE_HEADLINES else "neutral"
    )
    probabilities = {name: 0.9 if name == label else 0.05 for name in ("negative", "neutral", "positive")}
    tickers = ATTRIBUTOR.tickers(NewsItem.model_validate(record))
    base = ScoredItem(
        id=record["id"],
        item_id=record["id"],
        ticker=None,
        published_at=datetime.fromisoformat(record["published_at"]),
        source=record["source"],
        headline=headline,
        label=label,
        probabilities=probabilities,
        score=probabilities["positive"] - probabilities["negative"],
        model_name="finance-sentiment",
        model_version="1",
        topic=TOPICS[headline],
        topic_probabilities={TOPICS[headline]: 0.9},
        tickers=tickers,
    )
    return [base.model_copy(update={"id": f"{base.id}:{t}", "ticker": t}) for t in tickers] or [base]


def alerts_of_a_replay(end: datetime) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(ticker alerts, topic alerts) with their windows' share negative."""
    windows: dict[str, TumblingWindows] = {}
    rules: dict[str, AlertRule] = {}
    topic_windows = TopicWindows(WindowSettings(size=WINDOW))  # one partition holds every topic
    topic_rule = TopicAlertRule(topic_alert_settings(MonitorSettings()))
    alerts, topic_alerts = [], []
    for _, value in replay_records("test", end):
        items = scored(json.loads(value))
        for item in items:
            if item.ticker is None:
                continue
            ticker_windows = windows.setdefault(item.ticker, TumblingWindows(WindowSettings(size=WINDOW)))
            ticker_windows.add(item, end)
            for closed in ticker_windows.close_due():
                alert = rules.setdefault(item.ticker, AlertRule()).observe(closed)
                if alert is not None:
                    alerts.append((alert.ticker, closed.share_negative))
        by_topic = topic_record(items[0])
        assert by_topic is not None
        topic_windows.add(by_topic, end)
        for topic_window in topic_windows.close_due():
            topic_alert = topic_rule.observe(topic_window)
            if topic_alert is not None:
                topic_alerts.append((topic_alert.topic, topic_window.share_negative))
    return alerts, topic_alerts


def test_the_demo_raises_one_tsla_alert_and_one_central_bank_alert_whatever_the_minute_it_runs() -> None:
    ends = [datetime(2026, 11, 24, 9, tzinfo=UTC) + timedelta(seconds=s) for s in range(0, 300, 25)]
    stories = {end.isoformat(): alerts_of_a_replay(end) for end in ends}
    for alerts, topic_alerts in stories.values():
        assert len(alerts) == 1 and alerts[0][0] == "TSLA" and alerts[0][1] >= 0.5, stories
        assert len(topic_alerts) == 1 and topic_alerts[0][0] == CENTRAL_BANKS and topic_alerts[0][1] >= 0.5, stories


def test_the_central_bank_news_names_no_ticker_and_keeps_the_ticker_stream() -> None:
    stream = demo_stream()
    macro = [item for item in stream if item["source"] == "demo-macro"]
    assert macro and all(TOPICS[item["headline"]] == CENTRAL_BANKS for item in macro)
    for item in macro:
        news = NewsItem(id="x", published_at=datetime.now(UTC), source="s", headline=item["headline"])
        assert ATTRIBUTOR.tickers(news) == [], item["headline"]
    # The ticker items come from their own seed: the 1,675 of the stream before central-bank
    # news was added (compared item by item when it was), so TSLA's story is unchanged.
    assert sum(1 for item in stream if item["source"] != "demo-macro") == 1675
    assert [i["offset_seconds"] for i in stream] == sorted(i["offset_seconds"] for i in stream)
    assert [i["n"] for i in stream] == list(range(len(stream)))
