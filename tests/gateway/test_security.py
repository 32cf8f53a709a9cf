"""The gateway as an attacker or a careless operator meets it: hashed API keys, rate
limits, CORS, security headers, and error bodies that give nothing internal away."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway.apikeys import hash_api_key
from gateway.app import STATIC, create_app
from gateway.settings import GatewaySettings
from infermesh.cli import app as cli
from shared.grpc_server import RunningServer
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from tests.conftest import free_port
from tests.gateway.conftest import (
    API_KEYS,
    chromium,
    client_for,
    needs_chromium,
    serving,
    settings_for,
    settings_for_targets,
)
from tests.reliability import Observed

BODY = {"texts": ["Acme beats estimates"]}
PAGES = ("/explain", "/traces")
INLINE_CODE = re.compile(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=")


def unreachable_settings(**overrides: object) -> tuple[GatewaySettings, list[int]]:
    """Settings whose four services sit at closed loopback ports, and those ports."""
    ports = [free_port() for _ in range(4)]
    timeouts: dict[str, object] = {"request_timeout_seconds": 5, "explain_timeout_seconds": 5}
    settings = settings_for_targets([f"127.0.0.1:{port}" for port in ports], **(timeouts | overrides))
    return settings, ports


@pytest_asyncio.fixture
async def offline_client() -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with every service down: enough for what never reaches them."""
    async for client in client_for(unreachable_settings()[0]):
        yield client


# API keys


@pytest.mark.reliability(
    "Security", "config with a plaintext or malformed API key", "gateway refuses to start, no traceback, key not echoed"
)
def test_a_config_with_a_plaintext_key_is_refused_at_start(observed: Observed) -> None:
    plaintext = "k-0123456789abcdef0123"
    env = dict(os.environ) | {
        "INFERMESH_GATEWAY_API_KEYS": json.dumps({"ci": plaintext}),
        "INFERMESH_GATEWAY_HTTP_PORT": str(free_port()),
        "INFERMESH_GATEWAY_GRPC_PORT": "0",
        "INFERMESH_GATEWAY_DASHBOARD": "false",
    }
    started = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert started.returncode != 0
    assert started.stderr.startswith("infermesh gateway: refusing to start") and "Traceback" not in started.stderr
    assert "API key 'ci' is not a key hash" in started.stderr and "infermesh hash-key" in started.stderr
    assert plaintext not in started.stderr + started.stdout

    refused = {
        "a list of keys (the old format)": [plaintext],
        "a plaintext key": {"ci": plaintext},
        "a hash of the wrong length": {"ci": "sha256:abc123"},
        "another scheme": {"ci": "md5:" + "0" * 32},
        "a name with a space": {"c i": hash_api_key(plaintext)},
        "the same key twice": {"ci": hash_api_key(plaintext), "ops": hash_api_key(plaintext)},
    }
    for case, value in refused.items():
        with pytest.raises(ValidationError) as caught:
            GatewaySettings(api_keys=value)
        assert plaintext not in str(caught.value), case
    assert GatewaySettings(api_keys={"ci": hash_api_key(plaintext)}).api_keys
    observed.record(f"exit status {started.returncode}, key not in the error; {len(refused)} bad configs refused")


@pytest.mark.reliability("Security", "key made by `infermesh hash-key`", "config holds only its hash; the key works")
async def test_hash_key_makes_a_key_whose_entry_the_gateway_accepts(
    servers: list[RunningServer], observed: Observed
) -> None:
    runner = CliRunner()
    made = runner.invoke(cli, ["hash-key", "--name", "ci"])
    assert made.exit_code == 0, made.output
    printed = json.loads(made.stdout)
    key = printed["key"]
    assert len(key) >= 40 and printed["api_keys"] == {"ci": printed["hash"]}
    assert key not in printed["hash"]

    mine = "my-own-random-key-0b7d1f3a9e"
    hashed = runner.invoke(cli, ["hash-key", "--name", "ops", "--stdin"], input=mine + "\n")
    assert hashed.exit_code == 0, hashed.output
    hashed_entry = json.loads(hashed.stdout)
    assert "key" not in hashed_entry and hashed_entry["hash"] == hash_api_key(mine)
    short = runner.invoke(cli, ["hash-key", "--name", "ops", "--stdin"], input="secret\n")
    assert short.exit_code == 2 and "24 or more" in short.stderr

    configured = json.dumps(printed["api_keys"] | hashed_entry["api_keys"])
    async for client in client_for(settings_for(servers, api_keys=json.loads(configured))):
        for offered in (key, mine):
            reply = await client.post("/v1/sentiment", json=BODY, headers={"Authorization": f"Bearer {offered}"})
            assert reply.status_code == 200, reply.text
    assert key not in configured and mine not in configured
    observed.record("made and stdin keys both 200; neither key in the configuration")


# Rate limits


@pytest.mark.reliability(
    "Security", "key over its rate limit", "429 problem+json with Retry-After >= 1 s; other keys still served"
)
async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(
    servers: list[RunningServer], observed: Observed
) -> None:
    hashes = {name: hash_api_key(key) for name, key in API_KEYS.items()}
    settings = settings_for(servers, api_keys=hashes, key_rate_per_second=0.05, key_rate_burst=2)
    ci = {"X-API-Key": API_KEYS["ci"]}
    async for client in client_for(settings):
        served = [(await client.post("/v1/sentiment", json=BODY, headers=ci)).status_code for _ in range(2)]
        limited = await client.post("/v1/sentiment", json=BODY, headers=ci)
        other_key = await client.post("/v1/sentiment", json=BODY, headers={"X-API-Key": API_KEYS["ops"]})
        v2_limited = await client.post("/v2/models/finance-sentiment/infer", json={"inputs": []}, headers=ci)
    assert served == [200, 200]
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    retry_after = limited.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 20  # one token every 20 s
    problem = limited.json()
    assert problem["title"] == "Too many requests" and "'ci' is over its limit of 0.05 requests/s" in problem["detail"]
    assert API_KEYS["ci"] not in limited.text
    assert other_key.status_code == 200
    assert v2_limited.status_code == 429
    observed.record(f"200, 200, then 429 with Retry-After {retry_after}; the other key 200")


@pytest.mark.reliability("Security", "client address over its limit (no keys)", "429 problem+json with Retry-After")
async def test_without_keys_a_client_address_can_be_limited(servers: list[RunningServer], observed: Observed) -> None:
    async for client in client_for(settings_for(servers, ip_rate_per_second=0.1)):
        first = await client.post("/v1/sentiment", json=BODY)
        second = await client.post("/v1/sentiment", json=BODY)
        page = await client.get("/explain")
    assert first.status_code == 200
    assert second.status_code == 429 and 1 <= int(second.headers["retry-after"]) <= 10  # one token every 10 s
    assert "this client is over its limit" in second.json()["detail"]
    assert page.status_code == 200  # pages, health and metrics are not limited
    observed.record(f"200, then 429 with Retry-After {second.headers['retry-after']}")


async def test_limits_are_off_by_default(client: httpx.AsyncClient) -> None:
    replies = [await client.post("/v1/sentiment", json=BODY) for _ in range(5)]
    assert [reply.status_code for reply in replies] == [200] * 5


# CORS


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key",
    }


@pytest.mark.reliability(
    "Security", "cross-origin request with CORS closed (default)", "no Access-Control-Allow-Origin; preflight refused"
)
async def test_cors_is_closed_by_default(offline_client: httpx.AsyncClient, observed: Observed) -> None:
    evil = "https://evil.example"
    simple = await offline_client.get("/healthz", headers={"Origin": evil})
    refused = await offline_client.post("/v1/sentiment", json=BODY, headers={"Origin": evil})
    flight = await offline_client.options("/v1/sentiment", headers=preflight(evil))
    for reply in (simple, refused, flight):
        assert not any(name.startswith("access-control-") for name in reply.headers), reply.headers
    assert flight.status_code == 405
    observed.record(
        f"GET {simple.status_code}, POST {refused.status_code}, preflight {flight.status_code}; no CORS headers"
    )


@pytest.mark.reliability(
    "Security", "cross-origin requests with CORS configured", "configured origin allowed; any other origin gets nothing"
)
async def test_cors_allows_only_the_configured_origins(observed: Observed) -> None:
    app_origin, evil = "https://app.example.com", "https://evil.example"
    settings, _ = unreachable_settings(cors_allow_origins=[app_origin], api_keys={"ci": hash_api_key(API_KEYS["ci"])})
    async for client in client_for(settings):
        allowed = await client.options("/v1/sentiment", headers=preflight(app_origin))
        refused = await client.options("/v1/sentiment", headers=preflight(evil))
        unauthorised = await client.post("/v1/sentiment", json=BODY, headers={"Origin": app_origin})
        other = await client.post("/v1/sentiment", json=BODY, headers={"Origin": evil})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == app_origin
    assert {"x-api-key", "content-type"} <= set(allowed.headers["access-control-allow-headers"].lower().split(", "))
    assert "access-control-allow-credentials" not in allowed.headers
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # The page on the allowed origin can read why it was refused; the other cannot.
    assert unauthorised.status_code == 401
    assert unauthorised.headers["access-control-allow-origin"] == app_origin
    assert "retry-after" in unauthorised.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ValidationError, match="not an origin"):
        GatewaySettings(cors_allow_origins=["https://app.example.com/"])
    observed.record(
        f"preflight {allowed.status_code} for {app_origin}, {refused.status_code} without CORS headers for another"
    )


# Security headers


def assert_security_headers(reply: httpx.Response) -> None:
    where = f"{reply.request.method} {reply.request.url.path}"
    assert reply.headers["x-content-type-options"] == "nosniff", where
    assert reply.headers["x-frame-options"] == "DENY", where
    assert reply.headers["referrer-policy"] == "no-referrer", where
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"], where
    assert "server" not in reply.headers, where


@pytest.mark.reliability(
    "Security",
    "page security headers",
    "CSP without 'unsafe-inline' on our pages; nosniff, DENY, no-referrer and no server header everywhere",
)
async def test_every_response_carries_security_headers(observed: Observed) -> None:
    settings, _ = unreachable_settings(otlp_receiver_port=0, max_body_bytes=100)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        pages = [await client.get(path) for path in PAGES]
        assets = [await client.get(f"/static/{name}") for name in ("explain.js", "traces.css", "nope.js")]
        others = [
            await client.get("/healthz"),
            await client.get("/openapi.json"),
            await client.post("/v1/sentiment", json=BODY),  # 503: the services are down
            await client.post("/v1/sentiment", content=b"x" * 200),  # 413 before the app reads it
            await client.get("/no/such/page"),
        ]
        docs = await client.get("/docs")
    for page in pages:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    # What the policy forbids, no page may need: no inline script, style or event handler
    # (the dashboard included, which needs Kafka to be served).
    for html in STATIC.glob("*.html"):
        assert not INLINE_CODE.search(html.read_text(encoding="utf-8")), html.name
    assert [reply.status_code for reply in assets] == [200, 200, 404]
    assert assets[0].headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert [reply.status_code for reply in others] == [200, 200, 503, 413, 404]
    # Swagger UI comes from a CDN with an inline start-up script; only /docs allows that.
    assert docs.status_code == 200 and "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]
    for reply in (*pages, *assets, *others, docs):
        assert_security_headers(reply)
    # API answers hold callers' texts and labels: never kept by a shared cache.
    assert [reply.headers.get("cache-control") for reply in others[2:4]] == ["no-store", "no-store"]
    assert "cache-control" not in pages[0].headers
    observed.record(f"{len(pages) + len(assets) + len(others) + 1} responses (pages, assets, errors, docs) checked")


@pytest.mark.reliability(
    "Security", "pages under their CSP in Chromium", "pages work; only an injected inline script is refused"
)
@needs_chromium
async def test_pages_run_under_their_policy_in_a_browser(observed: Observed) -> None:
    settings, _ = unreachable_settings(otlp_receiver_port=0)
    messages: list[str] = []
    async with serving(create_app(settings)) as url, chromium() as browser:
        page = await browser.new_page()
        page.on("console", lambda message: messages.append(message.text))
        await page.goto(f"{url}/traces")
        await page.wait_for_function("document.querySelector('#problem').hidden === true")
        await page.goto(f"{url}/explain")
        await page.click("button[type=submit]")  # the services are down: the page shows the problem
        await page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        shown = await page.inner_text("#error")
        assert await page.evaluate("getComputedStyle(document.body).maxWidth") == "860px"  # its stylesheet applied
        # A script injected into the page (as an XSS would) does not run.
        injected = await page.evaluate(
            """() => new Promise(resolve => {
                document.addEventListener("securitypolicyviolation", () => resolve("refused"), {once: true});
                window.injectedRan = () => resolve("ran");
                const script = document.createElement("script");
                script.textContent = "window.injectedRan()";
                document.body.appendChild(script);
                setTimeout(() => resolve("nothing happened"), 5000);
            })"""
        )
    assert shown.startswith("Service unavailable: a service this request needs is unavailable")
    assert injected == "refused"
    violations = [message for message in messages if "Content Security Policy" in message]
    assert len(violations) == 1 and "inline script" in violations[0], messages
    observed.record("/traces and /explain worked; the one violation: an injected inline script, refused")


# Errors


@pytest.mark.reliability(
    "Security",
    "downstream down: no internal address in body",
    "503 problem+json without addresses, ports, gRPC details or tracebacks",
)
async def test_errors_with_services_down_reveal_nothing_internal(observed: Observed) -> None:
    settings, ports = unreachable_settings()
    tensor = {"name": "input_ids", "shape": [1], "datatype": "INT64", "data": [1]}
    calls: list[tuple[str, str, object]] = [
        ("POST", "/v1/sentiment", BODY),
        ("POST", "/v1/explain", {"text": "Acme beats estimates"}),
        ("GET", "/v2/health/live", None),
        ("GET", "/v2", None),
        ("GET", "/v2/models/finance-sentiment", None),
        ("POST", "/v2/models/finance-sentiment/infer", {"inputs": [tensor]}),
    ]
    forbidden = ["127.0.0.1", "ipv4", "Traceback", "failed to connect", "last error", "grpc", "Connection refused"]
    bodies: list[str] = []
    async for client in client_for(settings):
        for method, path, body in calls:
            reply = await client.request(method, path, json=body)
            assert reply.status_code == 503, (path, reply.text)
            assert reply.headers["content-type"] == "application/problem+json"
            assert reply.headers["retry-after"] == "1"
            problem = reply.json()
            assert problem["detail"] == "a service this request needs is unavailable; retry later"
            del problem["trace_id"]  # hex digits, which could spell a port by chance
            bodies.append(json.dumps(problem))
        readiness = await client.get("/readyz")
        assert readiness.status_code == 503
        bodies.append(readiness.text)
        # The gateway's own gRPC service maps the same failure the same way.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{client.headers['x-test-grpc-port']}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pipeline_grpc.PipelineStub(channel).Classify(pipeline_pb.ClassifyRequest(texts=["Acme"]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        bodies.append(caught.value.details() or "")
    for text in bodies:
        for needle in [*forbidden, *(str(port) for port in ports)]:
            assert needle.lower() not in text.lower(), (needle, text)
    observed.record(f"{len(bodies)} answers (6 REST, /readyz, gRPC Classify): 503/UNAVAILABLE, nothing internal")


@pytest.mark.reliability(
    "Security",
    "the gateway's gRPC Pipeline service without an API key, or with a wrong one",
    "UNAUTHENTICATED; a configured key in `x-api-key` or `authorization: Bearer` metadata is served",
)
async def test_the_grpc_pipeline_service_needs_a_key_too(keyed_client: httpx.AsyncClient, observed: Observed) -> None:
    request = pipeline_pb.ClassifyRequest(texts=["Acme beats estimates"])
    codes: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keyed_client.headers['x-test-grpc-port']}") as opened:
        stub = pipeline_grpc.PipelineStub(opened)
        for metadata in ((), (("x-api-key", "not-a-key"),), (("authorization", "Bearer not-a-key"),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Classify(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            codes.append(caught.value.code().name)
        for metadata in ((("x-api-key", API_KEYS["ci"]),), (("authorization", f"Bearer {API_KEYS['ops']}"),)):
            reply = await stub.Classify(request, metadata=metadata)
            assert reply.results[0].label == "positive"
    observed.record(f"no key, wrong key, wrong bearer: {', '.join(codes)}; both configured keys served")
