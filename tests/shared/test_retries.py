"""The retry policy of shared.grpc_client channels, against a real server on loopback that
fails on purpose and counts every attempt it receives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from shared.grpc_client import RETRY_SERVICE_CONFIG, channel
from tests.reliability import Observed

METHOD = "/infermesh.test.v1.Flaky/Call"
RETRY_POLICY = RETRY_SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]  # type: ignore[index]
MAX_ATTEMPTS: int = RETRY_POLICY["maxAttempts"]


@dataclass
class Flaky:
    """Answers `code` to the first `failures` attempts, then OK; counts attempts."""

    target: str = ""
    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    attempts: int = 0

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.attempts += 1
        if self.attempts <= self.failures:
            await context.abort(self.code, f"attempt {self.attempts} fails on purpose")
        return b"ok"


@pytest.fixture
async def flaky() -> AsyncIterator[Flaky]:
    # Bytes in, bytes out: no serializers, so no proto is needed for a test service.
    fault = Flaky()
    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(fault.call)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("infermesh.test.v1.Flaky", {"Call": handler}),)
    )
    # A fresh port per test is also a fresh retry-throttle bucket: gRPC keys it by target.
    fault.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield fault
    finally:
        await server.stop(None)


async def call_once(opened: grpc.aio.Channel, request: bytes = b"hello") -> bytes:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = opened.unary_unary(METHOD)
    return await call(request, timeout=10)


@pytest.mark.reliability(
    "Faults",
    "gRPC retry policy: transient UNAVAILABLE",
    f"the call succeeds; retried up to {MAX_ATTEMPTS} attempts with backoff",
)
async def test_transient_unavailable_is_retried_until_it_succeeds(flaky: Flaky, observed: Observed) -> None:
    flaky.failures = MAX_ATTEMPTS - 1
    async with channel(flaky.target) as opened:
        assert await call_once(opened) == b"ok"
    assert flaky.attempts == MAX_ATTEMPTS
    observed.record(f"{flaky.failures} x UNAVAILABLE then OK: the call succeeded, server saw {flaky.attempts} attempts")


async def test_requests_larger_than_grpcs_default_retry_buffer_are_retried(flaky: Flaky) -> None:
    """A ModelInfer round is often over gRPC's default 256 KiB retry buffer, past which a
    call would be sent only once."""
    flaky.failures = 1
    async with channel(flaky.target) as opened:
        assert await call_once(opened, bytes(1024 * 1024)) == b"ok"
    assert flaky.attempts == 2


@pytest.mark.reliability(
    "Faults",
    "gRPC retry policy: server always UNAVAILABLE",
    f"UNAVAILABLE after exactly {MAX_ATTEMPTS} attempts (bounded)",
)
async def test_retries_are_bounded(flaky: Flaky, observed: Observed) -> None:
    flaky.failures = 1_000
    async with channel(flaky.target) as opened:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call_once(opened)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == f"attempt {MAX_ATTEMPTS} fails on purpose"
    assert flaky.attempts == MAX_ATTEMPTS
    observed.record(f"{failed.value.code().name} to the caller; server saw {flaky.attempts} attempts")


@pytest.mark.reliability(
    "Faults",
    "gRPC retry policy: overload, deadline, bad input",
    "RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, INVALID_ARGUMENT are not retried (overload sheds, not amplified)",
)
@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT],
    ids=lambda code: str(code.name),
)
async def test_other_failures_are_not_retried(flaky: Flaky, code: grpc.StatusCode, observed: Observed) -> None:
    flaky.failures, flaky.code = 1, code
    async with channel(flaky.target) as opened:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call_once(opened)
    assert failed.value.code() == code
    assert flaky.attempts == 1
    observed.record(f"{code.name} seen by the caller after {flaky.attempts} attempt")


@pytest.mark.reliability(
    "Faults",
    "gRPC retry policy: persistent failure (retry storm)",
    "retries throttled: the server soon sees one attempt per call, far fewer than 3 per call",
)
async def test_retries_are_throttled_under_persistent_failure(flaky: Flaky, observed: Observed) -> None:
    flaky.failures = 1_000
    calls = 10
    per_call = []
    async with channel(flaky.target) as opened:
        for _ in range(calls):
            before = flaky.attempts
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call_once(opened)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            per_call.append(flaky.attempts - before)
    # 10 tokens, each failed attempt takes one, no retry at or below 5: 3, 2, then 1 each.
    assert per_call == [3, 2] + [1] * (calls - 2)
    assert flaky.attempts < MAX_ATTEMPTS * calls
    observed.record(f"{calls} calls made {flaky.attempts} attempts (per call: {per_call})")


async def test_a_success_after_throttling_is_answered(flaky: Flaky) -> None:
    """Throttling stops retries, not calls: once the server recovers, calls go through."""
    flaky.failures = 6
    async with channel(flaky.target) as opened:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(opened)
        assert flaky.attempts == 6  # 3, 2, 1: the third call was not retried
        assert await call_once(opened) == b"ok"
