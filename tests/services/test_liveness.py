"""Liveness and readiness are separate gRPC health signals (the Kubernetes probes ask them,
tests/k8s/test_policy.py): "liveness" answers whether the process is alive, "" whether it
can serve. A downstream outage must make a service unready, never "dead" (restarted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.explainer.server import SERVICE_NAME
from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from shared.grpc_server import LIVENESS_SERVICE, RunningServer
from tests.conftest import free_port
from tests.reliability import Observed

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.reliability(
    "Faults",
    "Explainer running with its inference service down",
    "readiness NOT_SERVING (no traffic); liveness SERVING (no restart, no torch reload)",
)
async def test_liveness_stays_serving_while_a_downstream_is_down(model_repository: Path, observed: Observed) -> None:
    # Nothing listens where the explainer's inference service should be.
    settings = ExplainerSettings(grpc_port=0, model_repository=model_repository, inference=f"127.0.0.1:{free_port()}")
    running, versions = await start_explainer(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                return int((await health.Check(health_pb2.HealthCheckRequest(service=service))).status)

            readiness, by_name, liveness = await asyncio.gather(
                status(""), status(SERVICE_NAME), status(LIVENESS_SERVICE)
            )
            assert (readiness, by_name) == (NOT_SERVING, NOT_SERVING)
            assert liveness == SERVING
            # The downstream watcher re-checks every 2 s: liveness stays where it is.
            await asyncio.sleep(2.5)
            assert await status("") == NOT_SERVING
            assert await status(LIVENESS_SERVICE) == SERVING
            observed.record(
                f"readiness {health_pb2.HealthCheckResponse.ServingStatus.Name(readiness)}, "
                f"liveness {health_pb2.HealthCheckResponse.ServingStatus.Name(liveness)}"
            )
    finally:
        await running.stop(0)
        await versions.close()


async def test_every_service_answers_liveness(
    tokenizer_server: RunningServer,
    inference_server: RunningServer,
    postprocessor_server: RunningServer,
    explainer_server: RunningServer,
) -> None:
    for server in (tokenizer_server, inference_server, postprocessor_server, explainer_server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in (LIVENESS_SERVICE, ""):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == SERVING, (server.service_names, service)
