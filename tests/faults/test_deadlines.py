"""Deadlines under a slowed downstream: every hop gets the caller's remaining budget,
callers get DEADLINE_EXCEEDED / 504 within it, and nothing keeps waiting afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.app import create_app
from services.explainer.core import ExplainLimits
from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from shared.errors import DeadlineExceeded
from shared.grpc_server import RunningServer
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pipeline import PipelineClient, PipelineTargets
from tests.faults.proxy import DelayProxy
from tests.gateway.conftest import serving, settings_for
from tests.reliability import Observed

BUDGET = 0.5
DELAY = 2.0
#: gRPC sends a deadline as a timeout in whole units, rounded up, and each process reads it
#: against its own clock: a hop may see a few milliseconds more than its caller had left.
SLACK = 0.05


@pytest.mark.reliability(
    "Faults",
    f"Inference slowed by {DELAY:.0f} s (injected in a proxy); 20 concurrent REST calls with a {BUDGET} s budget",
    "every call 504 problem+json within its budget; the inference hop got at most the remaining budget; "
    "no request left waiting",
)
async def test_a_slow_downstream_gets_the_gateways_deadline_and_callers_get_504(
    servers: list[RunningServer], inference_server: RunningServer, observed: Observed
) -> None:
    async with DelayProxy(f"127.0.0.1:{inference_server.port}", DELAY) as slow_inference:
        settings = settings_for(servers, request_timeout_seconds=BUDGET)
        settings = settings.model_copy(update={"inference": slow_inference.address})
        async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def call(index: int) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                reply = await client.post("/v1/sentiment", json={"texts": [f"Shares slide {index}"]})
                return reply, time.monotonic() - started

            results = await asyncio.gather(*(call(i) for i in range(20)))
            # Once the delay is gone, the same gateway answers at once: nothing stuck in a queue.
            slow_inference.delay_seconds = 0
            after = await client.post("/v1/sentiment", json={"texts": ["Shares slide"]})
    statuses = sorted({reply.status_code for reply, _ in results})
    slowest = max(seconds for _, seconds in results)
    budgets = [b for b in slow_inference.budgets[:-1] if b is not None]
    observed.record(
        f"statuses {statuses}, slowest answer {slowest:.2f} s; {len(budgets)} inference call(s) "
        f"(the gateway coalesces) arrived with at most {max(budgets):.2f} s left; "
        f"{slow_inference.forwarded - 1} reached the model; afterwards: {after.status_code}"
    )
    assert statuses == [504]
    assert all(reply.headers["content-type"] == "application/problem+json" for reply, _ in results)
    assert slowest < BUDGET + 0.5
    assert len(budgets) == len(slow_inference.budgets) - 1 and max(budgets) <= BUDGET + SLACK
    assert after.status_code == 200


@pytest.mark.reliability(
    "Faults",
    f"Post-processor slowed by {DELAY:.0f} s; the worker's scoring call with a {BUDGET} s budget",
    "DeadlineExceeded within the budget (the worker then retries with backoff); the slow hop got the remaining budget",
)
async def test_the_scoring_deadline_reaches_the_last_hop(
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    observed: Observed,
) -> None:
    async with DelayProxy(f"127.0.0.1:{postprocessor_server.port}", DELAY) as slow_postprocessor:
        targets = PipelineTargets(
            f"127.0.0.1:{tokenizer_server.port}", f"127.0.0.1:{inference_server.port}", slow_postprocessor.address
        )
        async with PipelineClient(targets, model_name="finance-sentiment") as pipeline:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await pipeline.classify(["Shares slide"], timeout_seconds=BUDGET)
            elapsed = time.monotonic() - started
    (budget,) = slow_postprocessor.budgets
    observed.record(f"DeadlineExceeded after {elapsed:.2f} s; the post-processor call arrived with {budget:.2f} s left")
    assert elapsed < BUDGET + 0.3
    assert budget is not None and budget <= BUDGET + SLACK


@pytest.mark.reliability(
    "Faults",
    f"Inference slowed by {DELAY:.0f} s under the explainer; an Explain call with a 1 s gRPC deadline",
    "DEADLINE_EXCEEDED within the deadline; the explainer's inference call got the caller's remaining budget",
)
async def test_the_explainers_callers_deadline_reaches_inference(
    inference_server: RunningServer, model_repository: Path, observed: Observed
) -> None:
    async with DelayProxy(f"127.0.0.1:{inference_server.port}", DELAY) as slow_inference:
        settings = ExplainerSettings(grpc_port=0, model_repository=model_repository, inference=slow_inference.address)
        running, versions = await start_explainer(settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = explainer_grpc.ExplainerServiceStub(channel)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Explain(explainer_pb.ExplainRequest(texts=["Shares slide"]), timeout=1.0)
                elapsed = time.monotonic() - started
        finally:
            await running.stop(0)
            await versions.close()
    budgets = [b for b in slow_inference.budgets if b is not None]
    observed.record(
        f"{caught.value.code().name} after {elapsed:.2f} s; the inference call arrived with "
        f"{max(budgets):.2f} s left (the explainer's own cap is {ExplainLimits().timeout_seconds:.0f} s)"
    )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5
    assert budgets and max(budgets) <= 1.0 + SLACK
