"""One request, one trace: a REST call through the gateway and every service it reaches."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from tests.conftest import SPANS

HOPS = {
    "/infermesh.tokenizer.v1.TokenizerService/Tokenize",
    "/inference.GRPCInferenceService/ModelInfer",
    "/infermesh.postprocess.v1.PostprocessService/Postprocess",
}


def _by_trace(trace_id: int) -> list[ReadableSpan]:
    return [s for s in SPANS.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


async def test_one_rest_call_is_one_trace_across_every_hop(client: httpx.AsyncClient) -> None:
    SPANS.clear()
    reply = await client.post("/v1/sentiment", json={"texts": ["Acme shares plunge after profit warning"]})
    assert reply.status_code == 200
    http = next(
        s for s in SPANS.get_finished_spans() if s.kind == SpanKind.SERVER and s.name.startswith("POST /v1/sentiment")
    )
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
