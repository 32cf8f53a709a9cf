"""`infermesh.pipeline.v1.Pipeline`: the gateway's gRPC face for gRPC clients, a thin
shell over the same PipelineClient and explainer the REST routes use."""

from __future__ import annotations

import grpc

from shared.errors import ModelNotFound, from_grpc_error
from shared.grpc_server import ServicerContext
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pb import pipeline_pb2 as pb
from shared.pb import pipeline_pb2_grpc as pb_grpc
from shared.pipeline import PipelineClient

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Pipeline"].full_name


class PipelineServicer(pb_grpc.PipelineServicer):
    def __init__(
        self, client: PipelineClient, explainer: explainer_grpc.ExplainerServiceAsyncStub, timeout_seconds: float
    ) -> None:
        self._client = client
        self._explainer = explainer
        self._timeout = timeout_seconds

    async def Classify(self, request: pb.ClassifyRequest, context: ServicerContext) -> pb.ClassifyResponse:
        if request.model_name and request.model_name != self._client.model_name:
            raise ModelNotFound.named(request.model_name)
        result = await self._client.classify(
            list(request.texts),
            model_version=request.model_version,
            thresholds=dict(request.thresholds),
            timeout_seconds=_deadline(context, self._timeout),
        )
        return pb.ClassifyResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            results=[
                pb.Classification(
                    label=r.label,
                    probabilities=r.probabilities,
                    abstained=r.abstained,
                    num_chunks=r.num_chunks,
                    num_tokens=r.num_tokens,
                )
                for r in result.results
            ],
        )

    async def Explain(
        self, request: explainer_pb.ExplainRequest, context: ServicerContext
    ) -> explainer_pb.ExplainResponse:
        try:
            return await self._explainer.Explain(request, timeout=_deadline(context, self._timeout))
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None


def _deadline(context: ServicerContext, default: float) -> float:
    """The caller's remaining deadline, passed on to every hop."""
    remaining = context.time_remaining()
    return min(default, remaining) if remaining is not None else default
