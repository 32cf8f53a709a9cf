"""Overload at twice the measured capacity, from a bounded open-loop load generator:
the inference service sheds with RESOURCE_EXHAUSTED (429 with Retry-After through the
gateway), its memory stays bounded, it never crashes, and it answers at once afterwards."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.app import create_app
from shared.grpc_server import RunningServer
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from tests.faults.processes import ServiceProcess, inference_process
from tests.gateway.conftest import serving, settings_for
from tests.reliability import Observed
from tests.services.test_inference import encode, raw_request

MEASURE_SECONDS = 2.0
OVERLOAD_SECONDS = 3.0
MAX_IN_FLIGHT = 2000
"""The generator's own bound: beyond it, it stops sending rather than grow without limit."""


@pytest.fixture
def inference(model_repository: Path) -> Iterator[ServiceProcess]:
    process = inference_process(model_repository, max_queue_size="128", max_sequences_per_request="8")
    process.start()
    yield process
    process.stop()


@pytest.mark.reliability(
    "Faults",
    "Overload: open-loop load at 2x the inference service's measured capacity for 3 s (queue bound 128 sequences)",
    "excess shed with RESOURCE_EXHAUSTED / 429 + Retry-After; no other error; memory bounded; no crash; "
    "answers at once when load drops",
)
async def test_overload_is_shed_and_recovered_from_at_once(
    inference: ServiceProcess,
    built_model: Path,
    servers: list[RunningServer],
    observed: Observed,
) -> None:
    ids, mask = encode(built_model, ["Chipmaker shares slump as export curbs tighten"] * 8)
    request = raw_request(ids, mask)
    outcomes: Counter[str] = Counter()
    ok_latencies: list[float] = []
    async with grpc.aio.insecure_channel(inference.target) as channel:
        stub = infer_grpc.GRPCInferenceServiceStub(channel)

        async def closed_loop(until: float) -> int:
            done = 0
            while time.monotonic() < until:
                await stub.ModelInfer(request, timeout=10)
                done += 1
            return done

        await stub.ModelInfer(request, timeout=10)  # warm
        until = time.monotonic() + MEASURE_SECONDS
        capacity = sum(await asyncio.gather(*(closed_loop(until) for _ in range(4)))) / MEASURE_SECONDS
        resident_before = inference.resident_mb()

        async def one() -> None:
            started = time.monotonic()
            try:
                await stub.ModelInfer(request, timeout=10)
                outcomes["OK"] += 1
                ok_latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1

        peak_resident = resident_before
        settings = settings_for(servers)
        settings = settings.model_copy(update={"inference": inference.target})
        rest: list[httpx.Response] = []
        async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=15) as client:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1 / (2 * capacity)
            started = time.monotonic()
            sent = 0
            while (now := time.monotonic()) - started < OVERLOAD_SECONDS:
                while sent < (now - started) / interval and len(tasks) < MAX_IN_FLIGHT:
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                if sent % 50 == 0:
                    peak_resident = max(peak_resident, inference.resident_mb())
                    # REST callers meanwhile: the same overload through the gateway.
                    rest.append(await client.post("/v1/sentiment", json={"texts": ["Shares slump"]}))
                await asyncio.sleep(interval / 2)
            await asyncio.gather(*tasks)
            peak_resident = max(peak_resident, inference.resident_mb())
            recovery_started = time.monotonic()
            await stub.ModelInfer(request, timeout=10)
            recovery = time.monotonic() - recovery_started
            after_rest = await client.post("/v1/sentiment", json={"texts": ["Shares slump"]})

    rest_statuses = Counter(reply.status_code for reply in rest)
    shed = [reply for reply in rest if reply.status_code == 429]
    p99 = sorted(ok_latencies)[int(0.99 * (len(ok_latencies) - 1))] if ok_latencies else 0.0
    observed.record(
        f"capacity {capacity * 8:.0f} sequences/s; sent {sent} requests of 8 at {2 * capacity:.0f}/s: "
        f"{dict(outcomes)}; accepted p99 {p99:.2f} s; REST meanwhile {dict(rest_statuses)}; "
        f"RSS {resident_before:.0f} -> peak {peak_resident:.0f} MB; alive; next call {recovery * 1000:.0f} ms"
    )
    assert outcomes["RESOURCE_EXHAUSTED"] > 0 and outcomes["OK"] > 0
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert inference.alive
    assert peak_resident - resident_before < 150
    assert recovery < 1.0
    assert set(rest_statuses) <= {200, 429} and shed, rest_statuses
    assert all(
        reply.headers.get("retry-after") and reply.headers["content-type"] == "application/problem+json"
        for reply in shed
    )
    assert after_rest.status_code == 200
