"""The /v1 REST routes: thin adapters over the shared PipelineClient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from gateway.admission import admit_caller
from gateway.problems import Problem
from gateway.schemas import (
    ChunkExplanation,
    ClassifyRequest,
    ExplainRequest,
    ExplainResponse,
    FaithfulnessFigures,
    HeadEntry,
    HeadResult,
    ModelEntry,
    ModelsResponse,
    SentimentRequest,
    SentimentResponse,
    SentimentResult,
    TokenAttribution,
    WordAttribution,
)
from gateway.settings import GatewaySettings, check_text_count
from shared.classification import head_fields, response_fields, routed_fields
from shared.errors import from_grpc_error
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pipeline import ClassifyResult, PipelineClient

EXPLAIN_PAGE = Path(__file__).parent / "static" / "explain.html"

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": description}
    for status, description in {
        400: "Malformed request",
        401: "Missing or invalid API key",
        404: "Unknown model or version",
        413: "Too many texts, or a text or body too large",
        422: "Request does not match the schema, or names a head the model lacks",
        429: "Overloaded, or the caller is over its rate limit; retry after the Retry-After delay",
        503: "A service is unavailable",
        504: "The request's deadline ran out",
    }.items()
}


router = APIRouter(prefix="/v1", dependencies=[Depends(admit_caller)], responses=PROBLEMS)


def classify_response(result: ClassifyResult) -> SentimentResponse:
    return SentimentResponse(
        model_name=result.model_name,
        model_version=result.model_version,
        results=[
            SentimentResult(
                **response_fields(r),
                **routed_fields(r),
                num_tokens=r.num_tokens,
                heads={name: HeadResult(**head_fields(head)) for name, head in r.heads.items()},
            )
            for r in result.results
        ],
    )


@router.post("/sentiment", response_model=SentimentResponse, summary="Classify finance texts (the default model)")
async def sentiment(body: SentimentRequest, request: Request) -> SentimentResponse:
    settings: GatewaySettings = request.app.state.settings
    check_text_count(len(body.texts), settings.max_texts)
    client: PipelineClient = request.app.state.pipeline
    result = await client.classify(
        body.texts,
        model_version=body.model_version,
        thresholds=body.thresholds,
        timeout_seconds=settings.request_timeout_seconds,
    )
    return classify_response(result)


@router.post("/classify", response_model=SentimentResponse, summary="Classify texts with a named model")
async def classify(body: ClassifyRequest, request: Request) -> SentimentResponse:
    """Any model in the repository (`GET /v1/models`), each answering with its own labels;
    404 naming the models there are for one it lacks."""
    settings: GatewaySettings = request.app.state.settings
    check_text_count(len(body.texts), settings.max_texts)
    client: PipelineClient = request.app.state.pipeline
    result = await client.classify(
        body.texts,
        model_name=body.model,
        model_version=body.version,
        thresholds=body.thresholds,
        timeout_seconds=settings.request_timeout_seconds,
    )
    return classify_response(result)


@router.get("/models", response_model=ModelsResponse, summary="The models in the repository")
async def models(request: Request) -> ModelsResponse:
    """Names, versions and the serving version of each model, with that version's labels,
    activation, languages and score mapping, and its heads (each with its labels, activation
    and score mapping)."""
    settings: GatewaySettings = request.app.state.settings
    client: PipelineClient = request.app.state.pipeline
    listed = await client.models(timeout_seconds=settings.request_timeout_seconds)
    return ModelsResponse(
        default_model=client.model_name,
        models=[
            ModelEntry(
                name=m.name,
                versions=m.versions,
                serving_version=m.serving_version,
                labels=m.labels,
                activation="sigmoid" if m.activation == "sigmoid" else "softmax",
                languages=m.languages,
                scores=m.scores,
                heads=[
                    HeadEntry(
                        name=h.name,
                        labels=h.labels,
                        activation="sigmoid" if h.activation == "sigmoid" else "softmax",
                        scores=h.scores,
                    )
                    for h in m.heads
                ],
            )
            for m in listed
        ],
    )


_METHODS = {
    "integrated_gradients": explainer_pb.METHOD_INTEGRATED_GRADIENTS,
    "occlusion": explainer_pb.METHOD_OCCLUSION,
}


@router.post("/explain", response_model=ExplainResponse, summary="Explain why a text got its label")
async def explain(body: ExplainRequest, request: Request) -> ExplainResponse:
    settings: GatewaySettings = request.app.state.settings
    stub: explainer_grpc.ExplainerServiceAsyncStub = request.app.state.explainer
    try:
        reply = await stub.Explain(
            explainer_pb.ExplainRequest(
                texts=[body.text],
                method=_METHODS[body.method],
                target_label=body.target_label,
                steps=body.steps,
                model_version=body.model_version,
                model_name=body.model,
                head=body.head,
            ),
            timeout=settings.explain_timeout_seconds,
        )
    except grpc.aio.AioRpcError as error:
        raise from_grpc_error(error) from None
    (explanation,) = reply.explanations
    gradients = body.method == "integrated_gradients"
    return ExplainResponse(
        model_name=reply.model_name,
        model_version=reply.model_version,
        method=body.method,
        attribution_model=reply.attribution_model,
        served_variant=reply.served_variant,
        head=reply.head,
        activation="sigmoid" if reply.activation == "sigmoid" else "softmax",
        label=explanation.label,
        probabilities=dict(explanation.probabilities),
        target_label=explanation.target_label,
        gradient_label=explanation.gradient_label if gradients else None,
        gradient_probabilities=dict(explanation.gradient_probabilities) if gradients else None,
        gradients_disagree=explanation.gradients_disagree if gradients else None,
        deciding_chunk=explanation.deciding_chunk,
        chunks=[
            ChunkExplanation(
                char_start=chunk.char_start,
                char_end=chunk.char_end,
                target_probability=chunk.target_probability,
                completeness_gap=chunk.completeness_gap if gradients else None,
                gradient_target_probability=(
                    chunk.gradient_target_probability if chunk.HasField("gradient_target_probability") else None
                ),
                tokens=[
                    TokenAttribution(
                        text=t.text, start=t.start, end=t.end, word_index=t.word_index, attribution=t.attribution
                    )
                    for t in chunk.tokens
                ],
                words=[
                    WordAttribution(text=w.text, start=w.start, end=w.end, attribution=w.attribution)
                    for w in chunk.words
                ],
                faithfulness=[
                    FaithfulnessFigures(
                        top_percent=f.top_percent,
                        comprehensiveness=f.comprehensiveness,
                        sufficiency=f.sufficiency,
                        random_comprehensiveness=f.random_comprehensiveness,
                        random_sufficiency=f.random_sufficiency,
                    )
                    for f in chunk.faithfulness
                ],
            )
            for chunk in explanation.chunks
        ],
    )


pages = APIRouter(include_in_schema=False)


@pages.get("/explain", response_class=HTMLResponse)
async def explain_page() -> HTMLResponse:
    """A page where a person types a headline and sees its words coloured by attribution."""
    return HTMLResponse(EXPLAIN_PAGE.read_text(encoding="utf-8"))
