"""gRPC shell over `Explainer`."""

from __future__ import annotations

import asyncio
import time

from services.explainer.admission import ExplainAdmission
from services.explainer.core import Explanation, Method
from services.explainer.versions import ExplainerVersions
from shared.errors import DeadlineExceeded, InputTooLarge
from shared.grpc_server import ServicerContext
from shared.metrics import (
    EXPLAINER_ABANDONED,
    EXPLAINER_DURATION,
    EXPLAINER_EXPLANATIONS,
    EXPLAINER_REJECTED,
)
from shared.pb import explainer_pb2 as pb
from shared.pb import explainer_pb2_grpc as pb_grpc

_METHODS = {
    pb.METHOD_UNSPECIFIED: Method.INTEGRATED_GRADIENTS,
    pb.METHOD_INTEGRATED_GRADIENTS: Method.INTEGRATED_GRADIENTS,
    pb.METHOD_OCCLUSION: Method.OCCLUSION,
}


def explanation_to_pb(explanation: Explanation) -> pb.Explanation:
    message = pb.Explanation(
        label=explanation.label,
        probabilities=explanation.probabilities,
        target_label=explanation.target_label,
        deciding_chunk=explanation.deciding_chunk,
        gradient_label=explanation.gradient_label,
        gradient_probabilities=explanation.gradient_probabilities,
        gradients_disagree=explanation.gradients_disagree,
    )
    for chunk in explanation.chunks:
        out = message.chunks.add(
            char_start=chunk.char_start,
            char_end=chunk.char_end,
            target_probability=chunk.target_probability,
            completeness_gap=chunk.completeness_gap or 0.0,
            gradient_target_probability=chunk.gradient_target_probability,
        )
        for token in chunk.tokens:
            out.tokens.add(
                text=token.text,
                start=token.start,
                end=token.end,
                word_index=token.word_index,
                attribution=token.attribution,
            )
        for word in chunk.words:
            out.words.add(text=word.text, start=word.start, end=word.end, attribution=word.attribution)
        for figure in chunk.faithfulness:
            out.faithfulness.add(
                top_percent=figure.top_percent,
                comprehensiveness=figure.comprehensiveness,
                sufficiency=figure.sufficiency,
                random_comprehensiveness=figure.random_comprehensiveness,
                random_sufficiency=figure.random_sufficiency,
            )
    return message


class ExplainerServicer(pb_grpc.ExplainerServiceServicer):
    def __init__(self, versions: ExplainerVersions, admission: ExplainAdmission) -> None:
        self._versions = versions
        self._admission = admission

    async def Explain(self, request: pb.ExplainRequest, context: ServicerContext) -> pb.ExplainResponse:
        model_name = request.model_name or self._versions.settings.model_name
        version, explainer = await self._versions.get(request.model_version, model_name)
        method = _METHODS.get(request.method, Method.INTEGRATED_GRADIENTS)
        try:
            # Every limit, the cost one included, before the call takes a place in the queue.
            plan = await explainer.prepare(
                list(request.texts), method, request.target_label, request.steps, request.head
            )
        except InputTooLarge:
            EXPLAINER_REJECTED.labels("over_budget").inc()
            raise
        # One budget for waiting and working: the caller's deadline, capped by the explainer's.
        remaining = context.time_remaining()
        cap = explainer.limits.timeout_seconds
        deadline = time.monotonic() + (cap if remaining is None else min(remaining, cap))
        async with self._admission.turn(deadline - time.monotonic()):
            try:
                with EXPLAINER_DURATION.labels(method.value).time():
                    # The deadline reaches every hop and stops integrated gradients.
                    explanations = await explainer.run(plan, timeout_seconds=deadline - time.monotonic())
            except DeadlineExceeded:
                EXPLAINER_ABANDONED.labels("deadline").inc()
                raise
            except asyncio.CancelledError:
                EXPLAINER_ABANDONED.labels("cancelled").inc()
                raise
        EXPLAINER_EXPLANATIONS.labels(method.value).inc(len(explanations))
        # Asked of the inference service (cached per version), never taken from configuration.
        served = await self._versions.served_variant(version, deadline - time.monotonic(), model_name)
        return pb.ExplainResponse(
            explanations=[explanation_to_pb(e) for e in explanations],
            model_name=model_name,
            model_version=version,
            method=request.method or pb.METHOD_INTEGRATED_GRADIENTS,
            attribution_model=explainer.attribution_model(method, served),
            served_variant=served,
            head=plan.head.name,
            activation=plan.head.activation,
        )
