"""The bundled demo stream: several tickers over three simulated hours, mostly calm, with
one scripted negative episode for TSLA, and central-bank news naming no ticker with one
scripted hawkish burst (a `Fed | Central Banks` topic alert), replayed onto
`finance.news.v1`.

The stream is generated from fixed seeds (the ticker items from one, the central-bank
items from another, so the ticker story is the same with or without them); its
timestamps are shifted at replay time so it ends now.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaProducer
from opentelemetry import trace

from shared.kafka_tracing import inject_headers
from shared.messages import NEWS_TOPIC
from workers.sentiment_monitor.core import window_start

TICKERS = {
    "AAPL": "Apple",
    "MSFT": "Microsoft",
    "NVDA": "Nvidia",
    "JPM": "JPMorgan",
    "TSLA": "Tesla",
    "KO": "Coca-Cola",
}
NEUTRAL = [
    "{name} to present at an industry conference next week",
    "{name} schedules its quarterly earnings call for Thursday",
    "{name} names a new head of investor relations",
    "${t} options volume in line with its monthly average",
    "{name} files its annual report with the securities regulator",
]
POSITIVE = [
    "{name} shares rise after earnings beat estimates",
    "Analysts upgrade ${t} to buy on strong demand",
    "{name} raises full-year guidance as revenue grows",
]
NEGATIVE = [
    "{name} shares plunge after the company cuts its outlook",
    "${t} falls as regulators open an investigation into {name}",
    "{name} recalls vehicles over safety defect, shares tumble",
    "Analysts downgrade ${t} to sell, citing weak deliveries",
    "{name} misses estimates and warns of lower margins",
]
CENTRAL_BANK_CALM = [
    "Fed officials see policy in a good place, minutes show",
    "ECB keeps rates unchanged, as expected",
    "Bank of England holds rates in a split vote",
    "Fed chair to speak at the Jackson Hole symposium on Friday",
    "Bank of Japan keeps its yield curve policy unchanged",
    "Fed's balance sheet little changed this week",
]
CENTRAL_BANK_NEGATIVE = [
    "Fed signals more rate hikes as inflation stays hot; markets slide",
    "Fed minutes show officials ready to hike again; stocks fall",
    "Hawkish Fed remarks send yields soaring and shares lower",
    "Fed's Waller says inflation is still too high and rate cuts must wait; stocks slide",
    "Fed chair says rate cuts are not coming soon; Wall Street sinks",
]
CENTRAL_BANKS = "Fed | Central Banks"
TEMPLATE_TOPICS = {
    NEUTRAL[0]: "Company | Product News",
    NEUTRAL[1]: "Earnings",
    NEUTRAL[2]: "Personnel Change",
    NEUTRAL[3]: "Stock Commentary",
    NEUTRAL[4]: "Legal | Regulation",
    POSITIVE[0]: "Earnings",
    POSITIVE[1]: "Analyst Update",
    POSITIVE[2]: "Earnings",
    NEGATIVE[0]: "Stock Movement",
    NEGATIVE[1]: "Legal | Regulation",
    NEGATIVE[2]: "Company | Product News",
    NEGATIVE[3]: "Analyst Update",
    NEGATIVE[4]: "Earnings",
    **dict.fromkeys(CENTRAL_BANK_CALM + CENTRAL_BANK_NEGATIVE, CENTRAL_BANKS),
}
"""The topic each template means (Twitter Financial News Topic labels), as a two-headed
model is expected to read it; tests/workers/test_demo.py windows the stream with these."""
_tracer = trace.get_tracer(__name__)
SPAN = timedelta(hours=3)
EPISODE = (timedelta(minutes=140), timedelta(minutes=160))
"""When TSLA's negative episode runs, from the start of the stream."""
CENTRAL_BANK_EPISODE = (timedelta(minutes=95), timedelta(minutes=115))
"""When the hawkish central-bank burst runs, from the start of the stream."""
WINDOW = timedelta(minutes=5)
"""The worker's default window size, which the replay aligns the stream to."""


def demo_stream(seed: int = 11, central_bank_seed: int = 7) -> list[dict[str, Any]]:
    """Items with `offset_seconds` from the stream start instead of a timestamp, in
    event-time order: the ticker stream and the central-bank stream merged."""
    items = sorted(
        _ticker_stream(seed) + _central_bank_stream(central_bank_seed), key=lambda item: item["offset_seconds"]
    )
    return [{**item, "n": n} for n, item in enumerate(items)]


def _central_bank_stream(seed: int) -> list[dict[str, Any]]:
    """Central-bank news naming no company: a calm item every few minutes, then a
    hawkish burst (about one negative item every 15 s for 20 minutes)."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    second = 0.0
    start, end = (bound.total_seconds() for bound in CENTRAL_BANK_EPISODE)
    while second < SPAN.total_seconds():
        in_episode = start <= second < end
        second += rng.uniform(10, 20) if in_episode else rng.uniform(40, 80)
        if second >= SPAN.total_seconds():
            break
        pool = CENTRAL_BANK_NEGATIVE if in_episode and rng.random() < 0.9 else CENTRAL_BANK_CALM
        items.append({"offset_seconds": round(second, 1), "source": "demo-macro", "headline": rng.choice(pool)})
    return items


def _ticker_stream(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    second = 0.0
    while second < SPAN.total_seconds():
        second += rng.uniform(4, 9)
        ticker = rng.choice(list(TICKERS))
        in_episode = ticker == "TSLA" and EPISODE[0].total_seconds() <= second < EPISODE[1].total_seconds()
        if in_episode:
            pool = NEGATIVE if rng.random() < 0.85 else NEUTRAL
        else:
            roll = rng.random()
            pool = NEGATIVE if roll < 0.08 else POSITIVE if roll < 0.35 else NEUTRAL
        headline = rng.choice(pool).format(name=TICKERS[ticker], t=ticker)
        items.append({"n": len(items), "offset_seconds": round(second, 1), "source": "demo-wire", "headline": headline})
        # Extra TSLA coverage during the episode, as a real news storm would bring.
        if in_episode and rng.random() < 0.7:
            second += 1
            items.append(
                {
                    "n": len(items),
                    "offset_seconds": round(second, 1),
                    "source": "demo-social",
                    "headline": rng.choice(NEGATIVE).format(name="Tesla", t="TSLA"),
                }
            )
    return items


def replay_records(run_id: str, end: datetime | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each demo item, timestamps shifted so the stream starts on a window
    boundary and ends within one window before `end`. Windows are aligned to the epoch: a
    stream shifted by any other amount splits its items between windows differently, and
    some splits put two negatives among five items of a calm ticker (an extra alert) or
    thin out TSLA's episode window; aligned, every run tells the same story."""
    start = window_start((end or datetime.now(UTC)) - SPAN, WINDOW)
    for item in demo_stream():
        record = {
            "id": f"demo-{run_id}-{item['n']}",
            "published_at": (start + timedelta(seconds=item["offset_seconds"])).isoformat(),
            "source": item["source"],
            "headline": item["headline"],
        }
        yield record["id"].encode(), json.dumps(record).encode()


def replay(producer: KafkaProducer, per_second: float = 100.0) -> int:
    """Sends the demo stream at about `per_second` items per second; returns the count.

    Everything goes to partition 0, so the stream is scored in event-time order. Spread
    over partitions, a scorer that falls behind (a busy machine) catches up partition by
    partition, and one second of skew is ten minutes of the compressed stream: items
    would arrive behind the window watermark and windows would lose some."""
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    sent = 0
    started = time.monotonic()
    for key, value in replay_records(run_id):
        with _tracer.start_as_current_span("produce demo news", kind=trace.SpanKind.PRODUCER):
            producer.send(NEWS_TOPIC, key=key, value=value, headers=inject_headers(), partition=0)
        sent += 1
        ahead = sent / per_second - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.flush()
    return sent
