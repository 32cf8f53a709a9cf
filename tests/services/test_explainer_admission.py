"""Admission control of the explainer (a bounded queue, deadlines that stop integrated
gradients, a cost bound), the bound on concurrent calls every gRPC server has, and what an
explanation says about the weights it was computed on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from services.explainer.admission import ExplainAdmission
from services.explainer.core import Explainer, Method
from services.explainer.gradients import STEPS_PER_PASS, Abandoned, IntegratedGradients
from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from services.explainer.versions import UNKNOWN, ExplainerVersions, describe_served
from services.inference.converters import BACKEND_METADATA_KEY, VARIANT_METADATA_KEY
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.tokenizer.api import Tokenizer, version_tokenizer
from shared.errors import DeadlineExceeded, Overloaded
from shared.grpc_server import RunningServer, start_server
from shared.model_repository import Head, ModelConfig, ModelRepository
from shared.pb import explainer_pb2 as pb
from shared.pb import explainer_pb2_grpc as pb_grpc
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.settings import BaseServiceSettings
from tests.conftest import VERSION_2_TEMPERATURE
from tests.gateway.conftest import client_for, settings_for_targets
from tests.reliability import Observed

NEGATIVE = "Acme shares plunge after the company slashes its profit forecast"
#: One chunk of 121 tokens: at 256 steps, 30976 token-steps, just under the default bound.
LONG = "The company will hold its annual meeting in Boston in May, as in previous years. " * 7
LABELS = ["negative", "neutral", "positive"]
SAYS_POSITIVE = [0.05, 0.05, 0.9]
SAYS_NEGATIVE = [0.9, 0.05, 0.05]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(condition: Any, seconds: float = 10.0) -> None:
    """Waits for `condition()` to hold: what the server does after answering is async."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


# --- the core, without a network ----------------------------------------------------------


@pytest.fixture(scope="module")
def heads(built_model: Path) -> list[Head]:
    return ModelConfig.model_validate_json((built_model / "config.json").read_text()).heads


@pytest.fixture(scope="module")
def gradients(built_model: Path) -> IntegratedGradients:
    return IntegratedGradients(built_model / "hf")


@pytest.fixture(scope="module")
def tokenizer(built_model: Path) -> Tokenizer:
    return version_tokenizer(ModelRepository(built_model.parent.parent), built_model.parent.name, "1", 8, 20_000)


class FixedModel:
    """A served model that answers the same probabilities for every sequence."""

    def __init__(self, row: list[float]) -> None:
        self.row = np.array(row, dtype=np.float64)
        self.calls = 0

    async def probabilities(
        self, sequences: Sequence[Sequence[int]], timeout: float, head: Head
    ) -> npt.NDArray[np.float64]:
        self.calls += 1
        assert len(self.row) == len(head.labels)
        return np.tile(self.row, (len(sequences), 1))


@pytest.mark.parametrize(
    ("served", "label", "disagree"),
    [(SAYS_POSITIVE, "positive", True), (SAYS_NEGATIVE, "negative", False)],
    ids=["served model says positive", "served model says negative"],
)
async def test_integrated_gradients_flag_a_served_label_their_weights_disagree_with(
    tokenizer: Tokenizer,
    gradients: IntegratedGradients,
    heads: list[Head],
    served: list[float],
    label: str,
    disagree: bool,
) -> None:
    explainer = Explainer(tokenizer, FixedModel(served), gradients, heads)
    (explanation,) = await explainer.explain([NEGATIVE], Method.INTEGRATED_GRADIENTS, steps=32)
    assert explanation.label == label
    assert explanation.gradient_label == "negative", explanation.gradient_probabilities
    assert explanation.gradients_disagree is disagree
    assert explanation.gradient_probabilities["negative"] > 0.5
    (chunk,) = explanation.chunks
    assert chunk.target_probability == pytest.approx(served[LABELS.index(label)])
    assert chunk.gradient_target_probability == pytest.approx(explanation.gradient_probabilities[label], abs=1e-6)
    assert explainer.attribution_model(Method.INTEGRATED_GRADIENTS, "int8") == "torch fp32 (hf/)"


async def test_occlusion_reports_the_served_model_and_no_gradient_figures(
    tokenizer: Tokenizer, gradients: IntegratedGradients, heads: list[Head]
) -> None:
    explainer = Explainer(tokenizer, FixedModel(SAYS_POSITIVE), gradients, heads)
    (explanation,) = await explainer.explain([NEGATIVE], Method.OCCLUSION)
    assert explanation.gradient_label == "" and explanation.gradient_probabilities == {}
    assert not explanation.gradients_disagree and explanation.chunks[0].gradient_target_probability is None
    assert explainer.attribution_model(Method.OCCLUSION, "int8") == "served int8 (inference service)"


async def test_work_whose_deadline_is_gone_does_not_start(
    tokenizer: Tokenizer, gradients: IntegratedGradients, heads: list[Head]
) -> None:
    model = FixedModel(SAYS_NEGATIVE)
    explainer = Explainer(tokenizer, model, gradients, heads)
    plan = await explainer.prepare([NEGATIVE], Method.INTEGRATED_GRADIENTS)
    with pytest.raises(DeadlineExceeded, match="had passed before the explanation started"):
        await explainer.run(plan, timeout_seconds=0)
    assert model.calls == 0


@dataclass
class GradientCall:
    """One `IntegratedGradients.attribute` call, as it runs in its thread."""

    passes: int = 0
    raised: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def gradient_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[GradientCall]]:
    """Every `attribute` call while the test runs, with the gradient passes it ran."""
    calls: list[GradientCall] = []
    original_probability = IntegratedGradients._target_probability
    original_attribute = IntegratedGradients.attribute

    def counting(self: IntegratedGradients, embeddings: Any, head: Head, target: int) -> Any:
        if embeddings.requires_grad:
            calls[-1].passes += 1
        return original_probability(self, embeddings, head, target)

    def attribute(self: IntegratedGradients, *args: Any, **kwargs: Any) -> Any:
        call = GradientCall()
        calls.append(call)
        try:
            return original_attribute(self, *args, **kwargs)
        except BaseException:
            call.raised = True
            raise
        finally:
            call.done.set()

    monkeypatch.setattr(IntegratedGradients, "_target_probability", counting)
    monkeypatch.setattr(IntegratedGradients, "attribute", attribute)
    yield calls


def test_integrated_gradients_stop_at_the_deadline_or_when_told(
    gradients: IntegratedGradients, heads: list[Head], gradient_calls: list[GradientCall]
) -> None:
    ids = [101, 2000, 2001, 2002, 102]
    special = [True, False, False, False, True]
    head = heads[0]
    with pytest.raises(DeadlineExceeded, match="during integrated gradients"):
        gradients.attribute(ids, special, head, 0, 256, deadline=time.monotonic() - 1)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Abandoned):
        gradients.attribute(ids, special, head, 0, 256, stop=stop)
    # A call waiting for the model while another holds it gives up at its deadline too.
    with gradients._lock, pytest.raises(DeadlineExceeded):
        gradients.attribute(ids, special, head, 0, 256, deadline=time.monotonic() + 0.2)
    assert [(call.passes, call.raised) for call in gradient_calls] == [(0, True)] * 3


# --- the admission queue --------------------------------------------------------------------


def fresh_admission(max_running: int, max_waiting: int) -> tuple[ExplainAdmission, Gauge, Counter]:
    registry = CollectorRegistry()
    depth = Gauge("depth", "waiting", registry=registry)
    rejected = Counter("rejected", "refused", ["reason"], registry=registry)
    admission = ExplainAdmission(max_running, max_waiting, queue_depth=depth, rejected=rejected)
    return admission, depth, rejected


async def test_a_full_explainer_queue_refuses_at_once_and_serves_in_order() -> None:
    admission, depth, rejected = fresh_admission(max_running=1, max_waiting=2)
    release = asyncio.Event()
    order: list[str] = []

    async def call(name: str) -> None:
        async with admission.turn(timeout=None):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(call("a"))
    await eventually(lambda: order == ["a"])
    waiting = [asyncio.create_task(call(name)) for name in ("b", "c")]
    await eventually(lambda: admission.waiting == 2)
    assert depth._value.get() == 2
    with pytest.raises(Overloaded, match="max is 2 waiting"):
        async with admission.turn(timeout=30):
            pytest.fail("a call past the queue bound must not run")
    assert rejected.labels("queue_full")._value.get() == 1
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["a", "b", "c"] and admission.running == 0 and depth._value.get() == 0


async def test_a_call_whose_deadline_passes_while_it_waits_never_starts() -> None:
    admission, depth, rejected = fresh_admission(max_running=1, max_waiting=4)
    release = asyncio.Event()
    ran: list[str] = []

    async def call(name: str, timeout: float | None) -> None:
        async with admission.turn(timeout=timeout):
            ran.append(name)
            await release.wait()

    holder = asyncio.create_task(call("holder", None))
    await eventually(lambda: ran == ["holder"])
    behind = asyncio.create_task(call("patient", None))
    with pytest.raises(DeadlineExceeded, match="waiting for a turn"):
        await call("hasty", 0.05)
    cancelled = asyncio.create_task(call("cancelled", None))
    await eventually(lambda: admission.waiting == 2)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    with pytest.raises(DeadlineExceeded, match="had passed"):
        await call("late", 0)
    release.set()
    await asyncio.gather(holder, behind)
    assert ran == ["holder", "patient"]
    assert rejected.labels("expired")._value.get() == 2 and rejected.labels("cancelled")._value.get() == 1
    assert admission.running == 0 and admission.waiting == 0 and depth._value.get() == 0


# --- over gRPC ---------------------------------------------------------------------------


class FakeInference:
    """An inference service that answers fixed probabilities once `gate` is open (and, for
    `logits`, logits that calibrate to them at `temperature`, the default version's), and
    ModelMetadata with the headers ours sends naming what serves (`served`; None: answers
    no ModelMetadata at all)."""

    def __init__(
        self,
        row: list[float],
        served: tuple[tuple[str, str], ...] | None = None,
        temperature: float = VERSION_2_TEMPERATURE,
    ) -> None:
        self.row = np.array(row, dtype=np.float32)
        self.temperature = temperature
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.served = (
            ((BACKEND_METADATA_KEY, "onnxruntime"), (VARIANT_METADATA_KEY, "int8")) if served is None else served
        )
        self.metadata_calls = 0

    async def ModelMetadata(
        self, request: infer_pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> infer_pb.ModelMetadataResponse:
        self.metadata_calls += 1
        await context.send_initial_metadata(self.served)
        return infer_pb.ModelMetadataResponse(
            name=request.name, versions=[request.version], platform="onnxruntime_onnx"
        )

    async def ModelInfer(
        self, request: infer_pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> infer_pb.ModelInferResponse:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        rows = int(request.inputs[0].shape[0])
        (asked,) = [output.name for output in request.outputs] or ["probabilities"]
        row = np.log(self.row) * self.temperature if asked == "logits" else self.row
        out = np.tile(row, (rows, 1))
        return infer_pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=request.model_version,
            outputs=[infer_pb.ModelInferResponse.InferOutputTensor(name=asked, datatype="FP32", shape=list(out.shape))],
            raw_output_contents=[out.astype("<f4").tobytes()],
        )

    def register(self, server: grpc.aio.Server) -> None:
        method = grpc.unary_unary_rpc_method_handler(
            self.ModelInfer,
            request_deserializer=infer_pb.ModelInferRequest.FromString,
            response_serializer=infer_pb.ModelInferResponse.SerializeToString,
        )
        metadata = grpc.unary_unary_rpc_method_handler(
            self.ModelMetadata,
            request_deserializer=infer_pb.ModelMetadataRequest.FromString,
            response_serializer=infer_pb.ModelMetadataResponse.SerializeToString,
        )
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {"ModelInfer": method, "ModelMetadata": metadata}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
        )


@asynccontextmanager
async def explainer_over(
    model_repository: Path, inference: FakeInference, **settings: Any
) -> AsyncIterator[tuple[pb_grpc.ExplainerServiceAsyncStub, RunningServer]]:
    """An explainer whose inference service is `inference`."""
    fake = await start_server(BaseServiceSettings(grpc_port=0), inference.register, [])
    await fake.set_serving(True)
    running, versions = await start_explainer(
        ExplainerSettings(
            grpc_port=0, model_repository=model_repository, inference=f"127.0.0.1:{fake.port}", **settings
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.ExplainerServiceStub(channel), running
    finally:
        await running.stop(0)
        await versions.close()
        await fake.stop(0)


@pytest.mark.reliability(
    "Faults",
    "Explainer full: 1 Explain call running, 1 waiting (the queue bound), a third arrives",
    "the third RESOURCE_EXHAUSTED at once naming the bound; queue depth and rejections exported; "
    "the other two answered",
)
async def test_a_full_explainer_queue_answers_resource_exhausted_at_once(
    model_repository: Path, observed: Observed
) -> None:
    inference = FakeInference(SAYS_NEGATIVE)
    inference.gate.clear()
    rejected_before = sample("infermesh_explainer_rejected_requests_total", reason="queue_full")
    async with explainer_over(model_repository, inference, max_running_requests=1, max_queued_requests=1) as (
        stub,
        _,
    ):
        request = pb.ExplainRequest(texts=["Shares slide"], method=pb.METHOD_OCCLUSION)

        async def explain() -> pb.ExplainResponse:
            return await stub.Explain(request, timeout=60)

        running = asyncio.create_task(explain())
        await eventually(lambda: inference.waiting == 1)
        queued = asyncio.create_task(explain())
        await eventually(lambda: sample("infermesh_explainer_queue_depth_requests") == 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Explain(request, timeout=60)
        depth = sample("infermesh_explainer_queue_depth_requests")
        inference.gate.set()
        answers = await asyncio.gather(running, queued)
    rejected = sample("infermesh_explainer_rejected_requests_total", reason="queue_full") - rejected_before
    labels = [a.explanations[0].label for a in answers]
    observed.record(
        f"{caught.value.code().name}: {caught.value.details()}; queue depth {depth:.0f}, "
        f"{rejected:.0f} rejection counted; the running and waiting calls answered {labels}"
    )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max is 1 waiting" in (caught.value.details() or "")
    assert depth == 1 and rejected == 1
    assert labels == ["negative", "negative"]
    assert sample("infermesh_explainer_queue_depth_requests") == 0


def abandoned() -> float:
    return sum(sample("infermesh_explainer_abandoned_requests_total", reason=r) for r in ("deadline", "cancelled"))


@pytest.mark.reliability(
    "Faults",
    "Explain with integrated gradients (121 tokens x 256 steps, 8 passes) and a 2 s gRPC deadline",
    "DEADLINE_EXCEEDED; the gradient thread stops at its next pass instead of finishing all 8; counted as abandoned",
)
async def test_integrated_gradients_stop_when_the_callers_deadline_passes(
    explainer_server: RunningServer, gradient_calls: list[GradientCall], observed: Observed
) -> None:
    steps = 256
    abandoned_before = abandoned()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{explainer_server.port}") as channel:
        stub = pb_grpc.ExplainerServiceStub(channel)
        deadline = time.monotonic() + 2.0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Explain(
                pb.ExplainRequest(texts=[LONG], method=pb.METHOD_INTEGRATED_GRADIENTS, steps=steps), timeout=2.0
            )
    assert gradient_calls, "integrated gradients never started"
    (call,) = gradient_calls
    finished = await asyncio.to_thread(call.done.wait, 120)
    stopped_after = time.monotonic() - deadline
    await eventually(lambda: abandoned() > abandoned_before)
    observed.record(
        f"{caught.value.code().name}; the gradient thread ran {call.passes} of {steps // STEPS_PER_PASS} passes, "
        f"{'stopped' if call.raised else 'finished'} {stopped_after:.1f} s after the deadline; counted as abandoned"
    )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert finished and call.raised
    assert call.passes < steps // STEPS_PER_PASS


@pytest.mark.reliability(
    "Limits",
    "Explain with integrated gradients over 2 texts of 121 tokens x 256 steps",
    "INVALID_ARGUMENT naming the token-steps and the limit; nothing queued or computed",
)
async def test_an_explanation_over_the_cost_bound_is_refused_naming_the_limit(
    explainer_server: RunningServer, gradient_calls: list[GradientCall], observed: Observed
) -> None:
    before = sample("infermesh_explainer_rejected_requests_total", reason="over_budget")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{explainer_server.port}") as channel:
        stub = pb_grpc.ExplainerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Explain(
                pb.ExplainRequest(texts=[LONG, LONG], method=pb.METHOD_INTEGRATED_GRADIENTS, steps=256), timeout=30
            )
    observed.record(f"{caught.value.code().name}: {caught.value.details()}")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "242 tokens (2 chunks) x 256 steps = 61952 token-steps; max is 32768" in (caught.value.details() or "")
    assert sample("infermesh_explainer_rejected_requests_total", reason="over_budget") == before + 1
    assert gradient_calls == []


async def test_an_explanation_says_which_weights_it_used(explainer_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{explainer_server.port}") as channel:
        stub = pb_grpc.ExplainerServiceStub(channel)
        gradients = await stub.Explain(pb.ExplainRequest(texts=[NEGATIVE], method=pb.METHOD_INTEGRATED_GRADIENTS))
        occlusion = await stub.Explain(pb.ExplainRequest(texts=[NEGATIVE], method=pb.METHOD_OCCLUSION))
    assert (gradients.attribution_model, gradients.served_variant) == ("torch fp32 (hf/)", "int8")
    (explanation,) = gradients.explanations
    assert explanation.gradient_label == explanation.label == "negative" and not explanation.gradients_disagree
    # fp32 in torch and the served int8 graph agree closely on a clear headline.
    assert abs(explanation.gradient_probabilities["negative"] - explanation.probabilities["negative"]) < 0.15
    assert explanation.chunks[0].HasField("gradient_target_probability")
    assert (occlusion.attribution_model, occlusion.served_variant) == ("served int8 (inference service)", "int8")
    assert occlusion.explanations[0].gradient_label == "" and not occlusion.explanations[0].gradients_disagree
    assert not occlusion.explanations[0].chunks[0].HasField("gradient_target_probability")


async def test_the_rest_explanation_flags_gradients_that_disagree_with_the_served_label(
    model_repository: Path,
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
) -> None:
    """The served model (a stand-in inference service) says positive; the fp32 weights
    the gradients run on say negative: the REST answer says so."""
    async with explainer_over(model_repository, FakeInference(SAYS_POSITIVE)) as (_, explainer):
        targets = [f"127.0.0.1:{s.port}" for s in (tokenizer_server, inference_server, postprocessor_server, explainer)]
        async for client in client_for(settings_for_targets(targets)):
            reply = await client.post("/v1/explain", json={"text": NEGATIVE, "method": "integrated_gradients"})
            occlusion = await client.post("/v1/explain", json={"text": NEGATIVE, "method": "occlusion"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["attribution_model"] == "torch fp32 (hf/)" and body["served_variant"] == "int8"
    assert body["label"] == "positive" and body["gradient_label"] == "negative"
    assert body["gradients_disagree"] is True
    assert body["gradient_probabilities"]["negative"] > 0.5
    (chunk,) = body["chunks"]
    assert chunk["target_probability"] == pytest.approx(0.9, abs=1e-6)
    assert chunk["gradient_target_probability"] < 0.5
    assert occlusion.status_code == 200, occlusion.text
    plain = occlusion.json()
    assert plain["attribution_model"] == "served int8 (inference service)"
    assert plain["gradients_disagree"] is None and plain["gradient_label"] is None
    assert plain["chunks"][0]["gradient_target_probability"] is None


# --- what the inference service serves ---------------------------------------------------


@pytest.mark.parametrize(
    ("inference_settings", "served"),
    [({"variant": "fp32"}, "fp32"), ({"backend": "torch", "device": "cpu", "torch_dtype": "fp32"}, "torch fp32")],
    ids=["onnxruntime fp32 variant", "torch backend"],
)
async def test_an_explanation_names_what_the_inference_service_actually_serves(
    model_repository: Path, inference_settings: dict[str, Any], served: str
) -> None:
    """The models' config.json says int8 by default; the inference service runs otherwise,
    and the explainer reports what it runs, not what configuration suggests."""
    inference, core = await start_inference(
        InferenceSettings(grpc_port=0, model_repository=model_repository, **inference_settings)
    )
    running, versions = await start_explainer(
        ExplainerSettings(grpc_port=0, model_repository=model_repository, inference=f"127.0.0.1:{inference.port}")
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerServiceStub(channel)
            occlusion = await stub.Explain(pb.ExplainRequest(texts=[NEGATIVE], method=pb.METHOD_OCCLUSION), timeout=60)
            gradients = await stub.Explain(
                pb.ExplainRequest(texts=[NEGATIVE], method=pb.METHOD_INTEGRATED_GRADIENTS, steps=8), timeout=60
            )
    finally:
        await running.stop(0)
        await versions.close()
        await inference.stop(0)
        await core.close()
    assert (occlusion.served_variant, occlusion.attribution_model) == (served, f"served {served} (inference service)")
    assert (gradients.served_variant, gradients.attribution_model) == (served, "torch fp32 (hf/)")


async def test_what_serves_a_version_is_asked_once_and_unknown_when_it_cannot_be(model_repository: Path) -> None:
    unreachable = ExplainerVersions(ExplainerSettings(model_repository=model_repository, inference="127.0.0.1:1"))
    try:
        assert await unreachable.served_variant("1", timeout=1) == UNKNOWN
    finally:
        await unreachable.close()
    for inference, expected in ((FakeInference(SAYS_NEGATIVE), "int8"), (FakeInference(SAYS_NEGATIVE, ()), UNKNOWN)):
        fake = await start_server(BaseServiceSettings(grpc_port=0), inference.register, [])
        versions = ExplainerVersions(
            ExplainerSettings(model_repository=model_repository, inference=f"127.0.0.1:{fake.port}")
        )
        try:
            answers = [await versions.served_variant("1"), await versions.served_variant("1")]
        finally:
            await versions.close()
            await fake.stop(0)
        assert answers == [expected, expected] and inference.metadata_calls == 1


@pytest.mark.parametrize(
    ("headers", "described"),
    [
        ((("infermesh-backend", "onnxruntime"), ("infermesh-variant", "int8")), "int8"),
        ((("infermesh-backend", "torch"), ("infermesh-variant", "bf16")), "torch bf16"),
        ((("infermesh-backend", "tensorrt"),), "tensorrt"),
        ((("infermesh-variant", "int8"),), "unknown"),
        ((), "unknown"),
    ],
)
def test_what_serves_is_described_from_model_metadatas_headers(
    headers: tuple[tuple[str, str], ...], described: str
) -> None:
    assert describe_served(headers) == described


def test_every_explainer_refusal_and_abandonment_reason_is_exported_from_the_start() -> None:
    """At 0 before anything happened (a fresh process: in this one other tests counted some),
    so rate() and alerts see every series from the start, as the worker's counters do."""
    script = (
        "import shared.metrics\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "print(generate_latest(REGISTRY).decode())"
    )
    exported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    for reason in ("queue_full", "over_budget", "expired", "cancelled"):
        assert f'infermesh_explainer_rejected_requests_total{{reason="{reason}"}} 0.0' in exported, reason
    for reason in ("deadline", "cancelled"):
        assert f'infermesh_explainer_abandoned_requests_total{{reason="{reason}"}} 0.0' in exported, reason


# --- every gRPC server ---------------------------------------------------------------------


@pytest.mark.reliability(
    "Limits",
    "A gRPC server with max_concurrent_rpcs=2 holding 2 calls; a third arrives, and a health check",
    "the third RESOURCE_EXHAUSTED at once naming the limit; the health check answered; the held calls and the "
    "next one answer",
)
async def test_a_server_refuses_calls_beyond_max_concurrent_rpcs(observed: Observed) -> None:
    release = asyncio.Event()
    arrived = 0

    async def hold(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return request

    handler = grpc.method_handlers_generic_handler("test.Hold", {"Hold": grpc.unary_unary_rpc_method_handler(hold)})
    running = await start_server(
        BaseServiceSettings(grpc_port=0, max_concurrent_rpcs=2),
        lambda server: server.add_generic_rpc_handlers((handler,)),
        [],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Hold/Hold")

            async def held_call() -> bytes:
                return await call(b"x", timeout=30)

            held = [asyncio.create_task(held_call()) for _ in range(2)]
            await eventually(lambda: arrived == 2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"y", timeout=5)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            release.set()
            answers = await asyncio.gather(*held)
            after = await call(b"z", timeout=5)
    finally:
        await running.stop(0)
    observed.record(
        f"third call {caught.value.code().name}: {caught.value.details()}; a health check meanwhile answered "
        f"{health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}; then {len(answers)} + 1 OK"
    )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max is 2 at once" in (caught.value.details() or "")
    assert answers == [b"x", b"x"] and after == b"z" and arrived == 3


def test_every_server_has_a_concurrency_bound_by_default() -> None:
    assert BaseServiceSettings().max_concurrent_rpcs == 256
    assert ExplainerSettings().max_concurrent_rpcs == 256
