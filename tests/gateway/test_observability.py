"""What an operator sees of the gateway: /metrics by route, /readyz, access logs with
trace ids, and the trace view fed by a real OTLP exporter."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from gateway.app import create_app
from shared.grpc_server import RunningServer
from shared.telemetry import JsonFormatter
from tests.conftest import SPANS, free_port
from tests.gateway.conftest import chromium, client_for, needs_chromium, serving, settings_for

HEADLINE = "Acme shares plunge after profit warning"


async def test_metrics_count_requests_by_route_template_not_raw_path(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/sentiment", json={"texts": [HEADLINE]})).status_code == 200
    assert (await client.get("/v2/models/finance-sentiment/ready")).status_code == 200
    assert (await client.get("/v2/models/no-such-model/ready")).status_code == 404
    reply = await client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    lines = reply.text.splitlines()

    def count(method: str, route: str, status: int) -> float:
        prefix = f'infermesh_http_server_requests_total{{method="{method}",route="{route}",status="{status}"}} '
        return sum(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))

    assert count("POST", "/v1/sentiment", 200) >= 1
    assert count("GET", "/v2/models/{name}/ready", 200) >= 1
    assert count("GET", "/v2/models/{name}/ready", 404) >= 1
    assert not any("no-such-model" in line for line in lines)
    assert any(line.startswith("infermesh_http_server_duration_seconds_bucket") for line in lines)
    assert any(line.startswith("infermesh_pipeline_round_size_calls_count") for line in lines)


async def test_readyz_is_ready_only_when_the_classification_path_serves(servers: list[RunningServer]) -> None:
    async for client in client_for(settings_for(servers)):
        reply = await client.get("/readyz")
        assert reply.status_code == 200
        assert reply.json()["services"] == {
            "tokenizer": "SERVING",
            "inference": "SERVING",
            "postprocessor": "SERVING",
            "explainer": "SERVING",
        }
    nowhere = f"127.0.0.1:{free_port()}"
    async for client in client_for(settings_for(servers).model_copy(update={"tokenizer": nowhere})):
        assert (await client.get("/healthz")).status_code == 200  # alive, just not ready
        reply = await client.get("/readyz")
        assert reply.status_code == 503
        assert reply.json()["status"] == "not ready"
        assert reply.json()["services"]["tokenizer"] == "UNAVAILABLE"


async def test_access_log_lines_carry_the_trace_id_of_their_request(client: httpx.AsyncClient) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("gateway.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        reply = await client.post(
            "/v1/sentiment",
            json={"texts": [HEADLINE]},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    finally:
        access.removeHandler(handler)
    assert reply.status_code == 200
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["trace_id"] == trace_id
    assert line["message"].startswith("POST /v1/sentiment 200")
    assert HEADLINE not in stream.getvalue()


async def _export_one_request_trace(url: str, receiver_port: int) -> str:
    """Makes one REST call and ships its spans over OTLP/gRPC, as a process's exporter would."""
    SPANS.clear()
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.post("/v1/sentiment", json={"texts": [HEADLINE]})).status_code == 200
    await asyncio.sleep(0.1)  # server spans end just after their response
    spans = SPANS.get_finished_spans()
    root = next(s for s in spans if s.name.startswith("POST /v1/sentiment") and s.parent is None)
    assert root.context is not None
    in_trace = [s for s in spans if s.context is not None and s.context.trace_id == root.context.trace_id]
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver_port}", insecure=True)
    try:
        assert await asyncio.to_thread(exporter.export, in_trace) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    return format(root.context.trace_id, "032x")


async def test_the_trace_view_shows_what_the_otlp_receiver_got(servers: list[RunningServer], tmp_path: object) -> None:
    app = create_app(settings_for(servers, otlp_receiver_port=0))
    async with serving(app) as url:
        trace_id = await _export_one_request_trace(url, app.state.otlp_receiver_port)
        async with httpx.AsyncClient(base_url=url) as http:
            summaries = (await http.get("/traces/api/traces")).json()
            summary = next(s for s in summaries if s["trace_id"] == trace_id)
            assert summary["root"].startswith("POST /v1/sentiment") and summary["errors"] == 0
            spans = (await http.get(f"/traces/api/traces/{trace_id}")).json()
            missing = await http.get(f"/traces/api/traces/{'0' * 32}")
    names = {span["name"] for span in spans}
    assert {
        "classify round",
        "queue wait",
        "model execute",
        "/infermesh.tokenizer.v1.TokenizerService/Tokenize",
    } <= names
    assert summary["spans"] == len(spans)
    by_id = {span["span_id"]: span for span in spans}
    execute = next(span for span in spans if span["name"] == "model execute")
    assert by_id[execute["parent_span_id"]]["name"] == "/inference.GRPCInferenceService/ModelInfer"
    assert execute["attributes"]["infermesh.model.name"] == "finance-sentiment"
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


@needs_chromium
async def test_the_traces_page_draws_a_waterfall_of_a_request(servers: list[RunningServer]) -> None:
    app = create_app(settings_for(servers, otlp_receiver_port=0))
    async with serving(app) as url, chromium() as browser:
        trace_id = await _export_one_request_trace(url, app.state.otlp_receiver_port)
        page = await browser.new_page(viewport={"width": 1200, "height": 800})
        await page.goto(f"{url}/traces")
        await page.click(f"tr[data-trace-id='{trace_id}']")
        await page.wait_for_selector("#waterfall .row", timeout=10_000)
        names = await page.eval_on_selector_all("#waterfall .row", "rows => rows.map(r => r.dataset.spanName)")
        assert names[0].startswith("POST /v1/sentiment")
        assert "model execute" in names and "/infermesh.tokenizer.v1.TokenizerService/Tokenize" in names
        # A span sits below its parent: the model runs inside the inference call.
        assert names.index("/inference.GRPCInferenceService/ModelInfer") < names.index("model execute")
        await page.click("#waterfall .row[data-span-name='model execute']")
        details = await page.inner_text("#waterfall .details")
        assert "infermesh.batch.tokens" in details
