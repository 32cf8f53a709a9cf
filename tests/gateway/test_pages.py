"""The /explain page in headless Chromium against the real services."""

from __future__ import annotations

from pathlib import Path

from gateway.app import create_app
from shared.grpc_server import RunningServer
from tests.gateway.conftest import chromium, needs_chromium, serving, settings_for

HEADLINE = "Acme shares plunge after the company slashes its profit forecast"


@needs_chromium
async def test_explain_page_highlights_the_words_that_drive_the_label(
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    explainer_server: RunningServer,
    tmp_path: Path,
) -> None:
    servers = [tokenizer_server, inference_server, postprocessor_server, explainer_server]
    app = create_app(settings_for(servers))
    screenshot = tmp_path / "explain.png"
    async with serving(app) as url, chromium() as browser:
        page = await browser.new_page(viewport={"width": 1000, "height": 700})
        await page.goto(f"{url}/explain")
        await page.fill("#input", HEADLINE)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#text span.word", timeout=30_000)
        assert (await page.inner_text("#label")).startswith("negative")
        words = await page.eval_on_selector_all(
            "#text span.word",
            "spans => spans.map(s => "
            "[s.textContent, Number(s.dataset.attribution), getComputedStyle(s).backgroundColor])",
        )
        assert [w[0] for w in words] == HEADLINE.split(" ")
        strongest = max(words, key=lambda w: w[1])
        assert strongest[0] in {"plunge", "slashes"}
        assert strongest[2].startswith("rgba(198, 40, 40")  # red: pushes towards negative
        assert len(await page.query_selector_all("#faithfulness tr")) == 3
        await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
