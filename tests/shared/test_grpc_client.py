"""Client-side balancing, which the headless Services rely on: a channel from
shared.grpc_client spreads calls over every address its target resolves to (a headless
Service's DNS name answers each ready pod), where gRPC's default would send them all to
the first. Two real servers on loopback stand in for two pods."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.grpc_client import channel

Status = health_pb2.HealthCheckResponse.ServingStatus


@pytest.fixture
async def two_pods() -> AsyncIterator[str]:
    """Two health servers that answer differently (SERVING, NOT_SERVING), so each answer
    tells which one took the call; yields a target naming both addresses."""
    servers = []
    ports = []
    for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await servicer.set("", status)
        servers.append(server)
    try:
        yield "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        for server in servers:
            await server.stop(None)


async def answers(target: str, options: list[tuple[str, int | str]], calls: int = 40) -> Counter[str]:
    """Who answered `calls` calls, counted once the channel has settled (round robin is
    ready with its first connection; the second may take a few calls longer)."""
    async with channel(target, options) as opened:
        stub = health_pb2_grpc.HealthStub(opened)

        async def check() -> str:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
            return str(Status.Name(response.status))

        for _ in range(calls):
            await check()
        return Counter([await check() for _ in range(calls)])


async def test_calls_spread_over_every_address(two_pods: str) -> None:
    seen = await answers(two_pods, [])
    assert seen == {"SERVING": 20, "NOT_SERVING": 20}


async def test_a_caller_may_still_choose_its_policy(two_pods: str) -> None:
    """The check above means something: gRPC's default sends every call to one server."""
    seen = await answers(two_pods, [("grpc.lb_policy_name", "pick_first")])
    assert sorted(seen.values()) == [40]
