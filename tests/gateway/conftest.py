"""A real uvicorn server on a loopback port the OS picks, and headless Debian chromium.

Browser tests carry `@needs_chromium`: without Debian's chromium they skip (saying so), except
in CI (`CI=true`), where they fail: `make test` only warns when it cannot install chromium,
and CI must not pass with every page test silently skipped."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from playwright.async_api import Browser, async_playwright

from gateway.apikeys import hash_api_key
from gateway.app import create_app, server_config
from gateway.settings import GatewaySettings
from shared.grpc_server import RunningServer

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # The gateway's own uvicorn configuration (python -m gateway), so tests see its headers.
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


CHROMIUM_MISSING = "Debian chromium is not installed (make test installs it)"


def in_ci(environ: Mapping[str, str]) -> bool:
    """Whether this is a CI run: CI=true (GitHub Actions, GitLab CI and most others set it)."""
    return environ.get("CI", "").strip().lower() in ("true", "1")


def require_chromium(
    environ: Mapping[str, str] = os.environ, which: Callable[[str], str | None] = shutil.which
) -> None:
    """Returns if chromium is on PATH; otherwise skips the calling test, or fails it in CI."""
    if which("chromium") is not None:
        return
    if in_ci(environ):
        pytest.fail(f"{CHROMIUM_MISSING}; CI=true, so a browser test that cannot run fails", pytrace=False)
    pytest.skip(CHROMIUM_MISSING)


@pytest.fixture
def chromium_available() -> None:
    require_chromium()


#: Marks a test that drives chromium (before any of its other fixtures start servers).
needs_chromium = pytest.mark.usefixtures("chromium_available")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


#: The keys `keyed_client` accepts, by name; its settings hold only their hashes.
API_KEYS = {"ci": "ci-7f3a9c1e5b2d8f4a6c0e", "ops": "ops-2b8e4d6f0a1c3e5b7d9f"}


def settings_for(servers: list[RunningServer], **overrides: object) -> GatewaySettings:
    """Gateway settings for test servers (the `servers` fixture's order)."""
    return settings_for_targets([f"127.0.0.1:{s.port}" for s in servers], **overrides)


def settings_for_targets(targets: list[str], **overrides: object) -> GatewaySettings:
    """Gateway settings for the tokenizer, inference, post-processor and explainer at `targets`."""
    tokenizer, inference, postprocessor, explainer = targets
    values: dict[str, object] = {
        "tokenizer": tokenizer,
        "inference": inference,
        "postprocessor": postprocessor,
        "explainer": explainer,
        "dashboard": False,
        "grpc_port": 0,
        "max_texts": 8,
        "max_body_bytes": 4096,
    }
    return GatewaySettings(**(values | overrides))  # type: ignore[arg-type]


async def client_for(settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            client.headers["x-test-grpc-port"] = str(app.state.grpc_port)
            yield client


@pytest_asyncio.fixture
async def client(servers: list[RunningServer]) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(settings_for(servers)):
        yield c


@pytest_asyncio.fixture
async def keyed_client(servers: list[RunningServer]) -> AsyncIterator[httpx.AsyncClient]:
    hashes = {name: hash_api_key(key) for name, key in API_KEYS.items()}
    async for c in client_for(settings_for(servers, api_keys=hashes)):
        yield c
