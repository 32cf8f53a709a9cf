"""The live dashboard through a real uvicorn server, fed by the real embedded broker,
looked at in headless Chromium."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from kafka import KafkaProducer

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.kafka import KafkaSettings
from shared.messages import ALERTS_TOPIC, SENTIMENT_TOPIC, WINDOWS_TOPIC
from tests.gateway.conftest import chromium, needs_chromium, serving
from tests.workers.test_windowing import T0, episode_items
from workers.sentiment_monitor.core import AlertRule, TumblingWindows


def publish_episode(kafka_config: dict[str, Any]) -> None:
    """Windows and the one alert of the scripted ACME episode, as the worker would emit them."""
    producer = KafkaProducer(**kafka_config, acks="all")
    windows, rule = TumblingWindows(), AlertRule()
    for item in episode_items(0, 19):
        windows.add(item, T0.replace(year=2100))
        producer.send(SENTIMENT_TOPIC, key=item.ticker.encode(), value=item.model_dump_json().encode())
        for closed in windows.close_due():
            producer.send(WINDOWS_TOPIC, key=closed.ticker.encode(), value=closed.model_dump_json().encode())
            alert = rule.observe(closed)
            if alert is not None:
                producer.send(ALERTS_TOPIC, key=alert.ticker.encode(), value=alert.model_dump_json().encode())
    producer.flush()
    producer.close()


@pytest_asyncio.fixture
async def gateway_url(kafka_config: dict[str, Any], broker: Any) -> AsyncIterator[str]:
    app = create_app(
        GatewaySettings(dashboard=True, grpc_port=0), KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    )
    async with serving(app) as url:
        yield url


async def test_events_stream_carries_windows_and_alerts(kafka_config: dict[str, Any], gateway_url: str) -> None:
    publish_episode(kafka_config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        for _ in range(30):
            async with client.stream("GET", "/dashboard/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                line = await anext(aiter(stream.aiter_lines()))
            state = json.loads(line.removeprefix("data: "))
            if state["alerts"] and len(state["tickers"].get("ACME", [])) == 19:
                break
            await asyncio.sleep(0.5)
    assert [a["ticker"] for a in state["alerts"]] == ["ACME"]
    assert set(state["tickers"]) == {"ACME", "STDY"}
    assert state["scored_total"] == 400


@needs_chromium
async def test_dashboard_page_shows_the_alert_in_a_browser(
    kafka_config: dict[str, Any], gateway_url: str, tmp_path: Path
) -> None:
    publish_episode(kafka_config)
    screenshot = tmp_path / "dashboard.png"
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{gateway_url}/dashboard")
        alert = await page.wait_for_selector(".alert[data-ticker=ACME]", timeout=30_000)
        assert alert is not None
        text = await alert.inner_text()
        assert "ACME: 80% negative" in text and "a8-" in text
        await page.wait_for_function("document.querySelectorAll('.card').length == 2")
        assert await page.get_attribute(".card[data-ticker=ACME]", "class") == "card alerting"
        assert await page.get_attribute(".card[data-ticker=STDY]", "class") == "card"
        await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 20_000
