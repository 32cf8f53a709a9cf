"""The bundled demo stream: several tickers over three simulated hours, mostly calm, with
one scripted negative episode for TSLA, replayed onto `finance.news.v1`.

The stream is generated from a fixed seed, so every run shows the same story; its
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
_tracer = trace.get_tracer(__name__)
SPAN = timedelta(hours=3)
EPISODE = (timedelta(minutes=140), timedelta(minutes=160))
"""When TSLA's negative episode runs, from the start of the stream."""
WINDOW = timedelta(minutes=5)
"""The worker's default window size, which the replay aligns the stream to."""


def demo_stream(seed: int = 11) -> list[dict[str, Any]]:
    """Items with `offset_seconds` from the stream start instead of a timestamp."""
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
