"""A gRPC proxy that forwards any unary call unchanged after an injected delay: a slow
network or a slow downstream, without touching the service behind it. It records the
deadline every call arrived with, so a test can see what budget each hop was given."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc


class DelayProxy:
    def __init__(self, target: str, delay_seconds: float) -> None:
        self.target = target
        self.delay_seconds = delay_seconds
        self.budgets: list[float | None] = []
        """Seconds each call had left on arrival (None: the caller set no deadline)."""
        self.forwarded = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.port = 0

    async def __aenter__(self) -> DelayProxy:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_Forward(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._channel is not None
        await self._server.stop(0)
        await self._channel.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        remaining = context.time_remaining()
        self.budgets.append(remaining)
        started = time.monotonic()
        await asyncio.sleep(self.delay_seconds)
        assert self._channel is not None
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)
        timeout = None if remaining is None else max(0.001, remaining - (time.monotonic() - started))
        try:
            reply: bytes = await call(request, timeout=timeout, metadata=context.invocation_metadata())
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
        self.forwarded += 1
        return reply


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: DelayProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method

        async def behavior(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return await self._proxy.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behavior)  # raw bytes: no (de)serializers
