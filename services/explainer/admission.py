"""Admission control of the explainer: how many Explain calls are worked on at once and
how many may wait for a turn. Plain asyncio, no gRPC."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from shared.errors import DeadlineExceeded, Overloaded


class ExplainAdmission:
    """At most `max_running` explanations at once and `max_waiting` more waiting, first
    come first served. Past that a call is refused at once with Overloaded: integrated
    gradients take seconds of CPU each, so an unbounded queue would only hand callers
    their deadline later (TEI's permits in `core/src/infer.rs`). A call whose deadline
    passes while it waits gets DeadlineExceeded and never starts."""

    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        queue_depth: Gauge | None = None,
        running: Gauge | None = None,
        rejected: Counter | None = None,
    ) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running must be >= 1 and max_waiting >= 0 (got {max_running}, {max_waiting})")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._free = max_running
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._queue_depth = queue_depth
        self._running = running
        self._rejected = rejected

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def running(self) -> int:
        return self.max_running - self._free

    @contextlib.asynccontextmanager
    async def turn(self, timeout: float | None) -> AsyncIterator[None]:
        """Holds one of the `max_running` places for the body. `timeout`: the caller's
        remaining time (None: no deadline); waiting for a place ends with it."""
        if timeout is not None and timeout <= 0:
            self._reject("expired")
            raise DeadlineExceeded("the caller's deadline had passed before the explanation could start")
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            if len(self._waiters) >= self.max_waiting:
                self._reject("queue_full")
                raise Overloaded(
                    f"the explainer is busy: {self.running} running, {len(self._waiters)} waiting; "
                    f"max is {self.max_waiting} waiting. Retry later"
                )
            await self._wait(timeout)
        self._report()
        try:
            yield
        finally:
            self._release()

    async def _wait(self, timeout: float | None) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._report()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the turn came just as the caller left: hand it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            self._report()
            if isinstance(error, asyncio.CancelledError):
                self._reject("cancelled")
            if isinstance(error, TimeoutError):
                self._reject("expired")
                raise DeadlineExceeded(
                    f"the deadline ran out after {time.monotonic() - started:.2f} s waiting for a turn "
                    f"({self.running} explanations running); nothing was started"
                ) from None
            raise

    def _release(self) -> None:
        """Hands the place to the longest waiter still waiting, else frees it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._report()
                return
        self._free += 1
        self._report()

    def _reject(self, reason: str) -> None:
        if self._rejected is not None:
            self._rejected.labels(reason).inc()

    def _report(self) -> None:
        if self._queue_depth is not None:
            self._queue_depth.set(len(self._waiters))
        if self._running is not None:
            self._running.set(self.running)
