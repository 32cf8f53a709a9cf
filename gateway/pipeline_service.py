"""`infermesh.pipeline.v1.Pipeline`: the gateway's gRPC face for gRPC clients, a thin
shell over the same PipelineClient and explainer the REST routes use, behind the same
API keys and rate limits (`authorization: Bearer <key>` or `x-api-key` metadata) and the
same MAX_TEXTS limit (`gateway.settings.check_text_count`)."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.admission import Admission
from gateway.settings import check_text_count
from shared.classification import head_fields, response_fields, routed_fields
from shared.errors import from_grpc_error
from shared.grpc_server import ServicerContext
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pb import pipeline_pb2 as pb
from shared.pb import pipeline_pb2_grpc as pb_grpc
from shared.pipeline import Classification, PipelineClient

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Pipeline"].full_name


class PipelineServicer(pb_grpc.PipelineServicer):
    def __init__(
        self,
        client: PipelineClient,
        explainer: explainer_grpc.ExplainerServiceAsyncStub,
        admission: Admission,
        classify_timeout_seconds: float,
        explain_timeout_seconds: float,
        max_texts: int,
    ) -> None:
        self._client = client
        self._explainer = explainer
        self._admission = admission
        self._classify_timeout = classify_timeout_seconds
        self._explain_timeout = explain_timeout_seconds
        self._max_texts = max_texts

    def _admit(self, context: ServicerContext) -> None:
        """The REST routes' check: UNAUTHENTICATED without a valid key, RESOURCE_EXHAUSTED
        over the caller's rate."""
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        authorization = metadata.get("authorization", "")
        bearer = authorization[7:] if authorization[:7].lower() == "bearer " else None
        self._admission.admit(metadata.get("x-api-key") or bearer, _peer_host(context.peer()))

    async def Classify(self, request: pb.ClassifyRequest, context: ServicerContext) -> pb.ClassifyResponse:
        self._admit(context)
        check_text_count(len(request.texts), self._max_texts)
        result = await self._client.classify(
            list(request.texts),
            model_name=request.model_name,
            model_version=request.model_version,
            thresholds=dict(request.thresholds),
            timeout_seconds=_deadline(context, self._classify_timeout),
        )
        return pb.ClassifyResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            results=[
                pb.Classification(
                    **response_fields(r),
                    **_routed(r),
                    num_tokens=r.num_tokens,
                    heads=[pb.HeadResult(name=name, **head_fields(head)) for name, head in r.heads.items()],
                )
                for r in result.results
            ],
        )

    async def Explain(
        self, request: explainer_pb.ExplainRequest, context: ServicerContext
    ) -> explainer_pb.ExplainResponse:
        self._admit(context)
        try:
            return await self._explainer.Explain(request, timeout=_deadline(context, self._explain_timeout))
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None


def _routed(result: Classification) -> dict[str, Any]:
    fields = routed_fields(result)
    fields["status"] = pb.ResultStatus.Value(f"RESULT_STATUS_{fields['status'].upper()}")
    return fields


def _deadline(context: ServicerContext, default: float) -> float:
    """The caller's remaining deadline, passed on to every hop."""
    remaining = context.time_remaining()
    return min(default, remaining) if remaining is not None else default


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:53412` or `ipv6:[::1]:53412` to the caller's host."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address.rsplit(":", 1)[0].strip("[]")
