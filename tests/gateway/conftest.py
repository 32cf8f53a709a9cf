"""A real uvicorn server on a loopback port the OS picks, and headless Debian chromium."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from playwright.async_api import Browser, async_playwright
from pydantic import SecretStr

from gateway.app import create_app
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
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def settings_for(servers: list[RunningServer], **overrides: object) -> GatewaySettings:
    tokenizer, inference, postprocessor, explainer = (f"127.0.0.1:{s.port}" for s in servers)
    return GatewaySettings(
        tokenizer=tokenizer,
        inference=inference,
        postprocessor=postprocessor,
        explainer=explainer,
        dashboard=False,
        grpc_port=0,
        max_texts=8,
        max_body_bytes=4096,
        **overrides,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def servers(
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    explainer_server: RunningServer,
) -> list[RunningServer]:
    return [tokenizer_server, inference_server, postprocessor_server, explainer_server]


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
    async for c in client_for(settings_for(servers, api_keys=[SecretStr("k-123"), SecretStr("k-456")])):
        yield c
