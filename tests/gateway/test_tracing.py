"""One request, one trace: a REST call through the gateway and every service it reaches."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import SPANS

HOPS = {
    "/infermesh.tokenizer.v1.TokenizerService/Tokenize",
    "/inference.GRPCInferenceService/ModelInfer",
    "/infermesh.postprocess.v1.PostprocessService/Postprocess",
}


def _by_trace(trace_id: int) -> list[ReadableSpan]:
    return [s for s in SPANS.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


async def _traced_sentiment_call(client: httpx.AsyncClient) -> ReadableSpan:
    """POSTs one headline with a fresh span store; returns the gateway's HTTP server span."""
    SPANS.clear()
    reply = await client.post("/v1/sentiment", json={"texts": ["Acme shares plunge after profit warning"]})
    assert reply.status_code == 200
    return next(
        s for s in SPANS.get_finished_spans() if s.kind == SpanKind.SERVER and s.name.startswith("POST /v1/sentiment")
    )


async def test_one_rest_call_is_one_trace_across_every_hop(client: httpx.AsyncClient) -> None:
    http = await _traced_sentiment_call(client)
    assert http.context is not None
    trace_id = http.context.trace_id
    for _ in range(50):  # server spans end just after their response is sent
        spans = _by_trace(trace_id)
        if {s.name for s in spans if s.kind == SpanKind.SERVER} >= HOPS:
            break
        await asyncio.sleep(0.02)
    spans = _by_trace(trace_id)
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    def ancestors(span: ReadableSpan) -> list[ReadableSpan]:
        chain = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            chain.append(span)
        return chain

    for hop in HOPS:
        server = next(s for s in spans if s.kind == SpanKind.SERVER and s.name == hop)
        assert server.parent is not None
        caller = by_id[server.parent.span_id]
        assert caller.kind == SpanKind.CLIENT and caller.name == hop
        assert http in ancestors(server), f"{hop} is not under the HTTP request's span"
        assert server.resource.attributes["service.name"] == "infermesh-tests"


def _child(spans: list[ReadableSpan], parent: ReadableSpan, name: str) -> ReadableSpan:
    assert parent.context is not None
    children = [
        s for s in spans if s.name == name and s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    assert children, f"no {name!r} span under {parent.name!r}; spans: {sorted(s.name for s in spans)}"
    return children[0]


async def test_the_trace_shows_where_the_time_went_inside_each_service(client: httpx.AsyncClient) -> None:
    http = await _traced_sentiment_call(client)
    assert http.context is not None
    tokenize_name = "/infermesh.tokenizer.v1.TokenizerService/Tokenize"
    postprocess_name = "/infermesh.postprocess.v1.PostprocessService/Postprocess"
    for _ in range(50):
        spans = _by_trace(http.context.trace_id)
        servers = {s.name: s for s in spans if s.kind == SpanKind.SERVER}
        if {"model execute", tokenize_name, postprocess_name} <= {s.name for s in spans} | set(servers):
            break
        await asyncio.sleep(0.02)

    # One span per hop where the hop is all one step: the server span carries its figures.
    tokenize = servers[tokenize_name]
    assert int((tokenize.attributes or {})["infermesh.tokens"]) > 0  # type: ignore[arg-type]

    model_infer = servers["/inference.GRPCInferenceService/ModelInfer"]
    waited = _child(spans, model_infer, "queue wait")
    execute = _child(spans, model_infer, "model execute")
    assert waited.end_time is not None and execute.start_time is not None and waited.end_time <= execute.start_time
    attributes = execute.attributes or {}
    assert attributes["infermesh.model.name"] == "finance-sentiment"
    assert attributes["infermesh.model.version"] == "2"
    assert attributes["infermesh.batch.size"] == 1
    assert int(attributes["infermesh.batch.tokens"]) > 0  # type: ignore[arg-type]
    assert int(attributes["infermesh.batch.padded_length"]) > 0  # type: ignore[arg-type]

    postprocess = servers[postprocess_name]
    assert (postprocess.attributes or {})["infermesh.model.version"] == "2"


async def test_a_failed_call_is_an_error_span_without_the_callers_text(client: httpx.AsyncClient) -> None:
    SPANS.clear()
    # The text passes the tokenizer and inference; the post-processor refuses the threshold.
    secret = "Confidential merger of Foo and Bar"
    reply = await client.post("/v1/sentiment", json={"texts": [secret], "thresholds": {"bogus": 0.5}})
    assert reply.status_code == 400, reply.text
    await asyncio.sleep(0.1)
    spans = SPANS.get_finished_spans()
    failed = {s.name for s in spans if s.status.status_code == StatusCode.ERROR}
    assert "/infermesh.postprocess.v1.PostprocessService/Postprocess" in failed
    for span in spans:
        recorded = repr(dict(span.attributes or {})) + repr([(e.name, dict(e.attributes or {})) for e in span.events])
        assert "Confidential merger" not in recorded, f"span {span.name!r} leaks the input text"
