"""gRPC shell over `Postprocessor`."""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from services.postprocessor.core import Aggregation, ModelFacts, Postprocessor, PostprocessResult
from shared.classification import head_fields, response_fields
from shared.grpc_server import ServicerContext
from shared.metrics import POSTPROCESS_DOCUMENTS
from shared.pb import postprocess_pb2 as pb
from shared.pb import postprocess_pb2_grpc as pb_grpc

_AGGREGATION = {
    pb.AGGREGATION_UNSPECIFIED: Aggregation.MEAN,
    pb.AGGREGATION_MEAN: Aggregation.MEAN,
    pb.AGGREGATION_MAX_CONFIDENCE: Aggregation.MAX_CONFIDENCE,
}


def result_to_pb(result: PostprocessResult) -> pb.PostprocessResponse:
    return pb.PostprocessResponse(
        labels=result.labels,
        results=[
            pb.DocumentResult(
                **response_fields(r),
                deciding_chunk=r.deciding_chunk,
                heads=[pb.HeadResult(name=head.name, **head_fields(head)) for head in r.heads],
            )
            for r in result.results
        ],
        model_name=result.model_name,
        model_version=result.model_version,
        temperature=result.temperature,
        abstain_label=result.abstain_label,
    )


def models_to_pb(models: list[ModelFacts], default_model: str) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        default_model=default_model,
        models=[
            pb.ModelDescription(
                name=m.name,
                versions=m.versions,
                serving_version=m.serving.version,
                labels=m.serving.labels,
                activation=m.serving.activation,
                languages=m.serving.languages,
                scores=m.scores,
                heads=[
                    pb.HeadDescription(
                        name=head.name,
                        labels=head.labels,
                        activation=head.activation,
                        scores=m.scores if head.primary else head.scores,
                    )
                    for head in m.serving.heads
                ],
            )
            for m in models
        ],
    )


class PostprocessorServicer(pb_grpc.PostprocessServiceServicer):
    def __init__(self, postprocessor: Postprocessor) -> None:
        self._postprocessor = postprocessor

    async def Postprocess(self, request: pb.PostprocessRequest, context: ServicerContext) -> pb.PostprocessResponse:
        # The server span is the post-processing span: it gets the model and size.
        trace.get_current_span().set_attributes(
            {
                "infermesh.model.name": request.model_name,
                "infermesh.model.version": request.model_version,
                "infermesh.rows": len(request.document_index) or len(request.logits) // max(1, request.num_labels),
            }
        )
        result = self._postprocessor.process(
            request.model_name,
            request.model_version,
            request.logits,
            request.num_labels,
            document_index=request.document_index,
            row_weights=request.row_weights,
            thresholds=dict(request.thresholds),
            aggregation=_AGGREGATION.get(request.aggregation, Aggregation.MEAN),
        )
        for document in result.results:
            POSTPROCESS_DOCUMENTS.labels(result.model_name, result.model_version, document.label).inc()
        return result_to_pb(result)

    async def ListModels(self, request: pb.ListModelsRequest, context: ServicerContext) -> pb.ListModelsResponse:
        models = await asyncio.to_thread(self._postprocessor.models)
        return models_to_pb(models, self._postprocessor.default_model)
