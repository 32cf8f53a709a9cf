"""The dashboard's topics: the demo's story (TSLA's episode, the hawkish central-bank burst
naming no ticker) windowed per ticker and per topic as the worker would, published to the
real embedded broker, and looked at in headless Chromium: a per-topic trend, topic alerts
beside ticker alerts, each ticker's topic mix."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from kafka import KafkaProducer

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.kafka import KafkaSettings
from shared.messages import ALERTS_TOPIC, TOPIC_ALERTS_TOPIC, TOPIC_WINDOWS_TOPIC, WINDOWS_TOPIC
from tests.gateway.conftest import chromium, needs_chromium, serving
from tests.workers.test_demo import scored
from workers.sentiment_monitor.consumer import topic_record
from workers.sentiment_monitor.core import AlertRule, TopicAlertRule, TopicWindows, TumblingWindows, WindowSettings
from workers.sentiment_monitor.demo import CENTRAL_BANKS, TEMPLATE_TOPICS, WINDOW, replay_records
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.windowing import topic_alert_settings

SCREENSHOT = Path("/tmp/dashboard-topics.png")


def publish_demo(kafka_config: dict[str, Any]) -> None:
    """The demo stream's ticker and topic windows and alerts, as the worker emits them."""
    end = datetime.now(UTC)
    producer = KafkaProducer(**kafka_config, acks="all")
    ticker_windows, rules = TumblingWindows(WindowSettings(size=WINDOW)), AlertRule()
    topic_windows = TopicWindows(WindowSettings(size=WINDOW))
    topic_rule = TopicAlertRule(topic_alert_settings(MonitorSettings()))
    for _, value in replay_records("dash", end):
        items = scored(json.loads(value))
        for item in items:
            if item.ticker is not None:
                ticker_windows.add(item, end)
        by_topic = topic_record(items[0])
        assert by_topic is not None
        topic_windows.add(by_topic, end)
        for closed in ticker_windows.close_due():
            alert = rules.observe(closed)
            if alert is not None:
                producer.send(ALERTS_TOPIC, key=alert.ticker.encode(), value=alert.model_dump_json().encode())
            producer.send(WINDOWS_TOPIC, key=closed.ticker.encode(), value=closed.model_dump_json().encode())
        for topic_window in topic_windows.close_due():
            topic_alert = topic_rule.observe(topic_window)
            if topic_alert is not None:
                producer.send(
                    TOPIC_ALERTS_TOPIC, key=topic_alert.topic.encode(), value=topic_alert.model_dump_json().encode()
                )
            producer.send(
                TOPIC_WINDOWS_TOPIC, key=topic_window.topic.encode(), value=topic_window.model_dump_json().encode()
            )
    producer.flush()
    producer.close()


@pytest_asyncio.fixture
async def gateway_url(kafka_config: dict[str, Any], broker: Any) -> AsyncIterator[str]:
    app = create_app(
        GatewaySettings(dashboard=True, grpc_port=0), KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    )
    async with serving(app) as url:
        yield url


async def test_events_carry_topic_windows_topic_alerts_and_ticker_topic_mix(
    kafka_config: dict[str, Any], gateway_url: str
) -> None:
    publish_demo(kafka_config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        for _ in range(40):
            async with client.stream("GET", "/dashboard/events") as stream:
                line = await anext(aiter(stream.aiter_lines()))
            state = json.loads(line.removeprefix("data: "))
            # Windows arrive as the dashboard's consumer reads them: wait for all of them.
            if state["topic_alerts"] and state["alerts"] and len(state["topics"].get(CENTRAL_BANKS, [])) >= 30:
                break
            await asyncio.sleep(0.5)
    assert [a["topic"] for a in state["topic_alerts"]] == [CENTRAL_BANKS]
    assert [a["ticker"] for a in state["alerts"]] == ["TSLA"]
    fed = state["topics"][CENTRAL_BANKS]
    assert len(fed) >= 30 and all(w["without_ticker"] == w["count"] for w in fed)
    (tsla_alert,) = state["alerts"]
    assert tsla_alert["window"]["topics"], "a ticker's window carries its topic mix"
    assert all("topics" in w for w in state["tickers"]["TSLA"])


@needs_chromium
async def test_the_page_shows_the_topic_trend_and_both_kinds_of_alert(
    kafka_config: dict[str, Any], gateway_url: str, tmp_path: Path
) -> None:
    publish_demo(kafka_config)
    screenshot = tmp_path / "dashboard-topics.png"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1500, "height": 1000})
        await page.goto(f"{gateway_url}/dashboard")
        topic_alert = await page.wait_for_selector(f'.alert[data-topic="{CENTRAL_BANKS}"]', timeout=30_000)
        assert topic_alert is not None
        text = await topic_alert.inner_text()
        assert f"{CENTRAL_BANKS}: " in text and "name no ticker" in text and "Fed" in text
        ticker_alert = await page.wait_for_selector(".alert[data-ticker=TSLA]", timeout=30_000)
        assert ticker_alert is not None and "mostly " in await ticker_alert.inner_text()
        await page.wait_for_function("document.querySelectorAll('.card').length == 6")
        # One heatmap row per topic, its cells coloured, the alerting window outlined.
        rows = await page.eval_on_selector_all(
            "#topics svg text:not(.axis):not(.latest)", "ts => ts.map(t => t.textContent)"
        )
        assert CENTRAL_BANKS in rows and len(rows) == len(set(TEMPLATE_TOPICS.values()))
        assert await page.eval_on_selector_all("#topics svg rect[stroke]", "rs => rs.length") == 1
        assert await page.eval_on_selector("#topics svg text.alerting", "t => t.textContent") == CENTRAL_BANKS
        mix = await page.inner_text(".card[data-ticker=TSLA] .mix")
        assert mix.startswith("topics: ")
        await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 30_000
    shutil.copyfile(screenshot, SCREENSHOT)  # to look at
