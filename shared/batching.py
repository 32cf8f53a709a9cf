"""Dynamic batching on plain asyncio: callers submit items, a loop groups them.

A batch closes when it holds `max_batch_size` items, when one more item would push its
cost past `max_batch_tokens`, or `max_queue_delay` after its first item was taken. The
cost is `longest item * count` for padded model inputs, or the plain sum of lengths.
With `length_buckets`, a batch takes only items of its oldest item's bucket, and its
cost is the bucket's edge times the count.
Up to `max_concurrent_batches` batches run at once, so the next batch forms while the
current one executes. The queue is bounded in items;
a submit that would overflow it fails with `Overloaded` instead of waiting.

Every submitted item is answered: `drain` runs everything already submitted, the batch
being collected included (it closes at once instead of waiting out `max_queue_delay`),
and `close` fails whatever it did not run with `ModelNotReady` (retryable), so no caller
is left waiting for its deadline.

Batches run in the batcher's task, not the callers': each batch span continues the
first caller's trace and links the others, and each caller's trace gets a `queue wait`
span covering the time its items waited for the batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from shared.errors import ModelNotReady, Overloaded
from shared.metrics import BatcherMetrics

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

#: What callers still waiting get from `close` (a version leaving service, a shutdown).
_CLOSED_DETAIL = "the batch queue closed before this request ran; retry"

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    """Items (sequences) per batch."""
    max_batch_tokens: int = 8192
    """Padded tokens per batch: the longest item's length times the item count."""
    max_queue_delay_seconds: float = 0.001
    """How long a batch may wait for more items once its first item is taken."""
    max_queue_size: int = 2048
    """Items waiting at most; beyond it submits fail with Overloaded."""
    max_concurrent_batches: int = 1
    """Batches executing at once."""
    padded_cost: bool = True
    """Cost a batch as `longest * count` (padded tensors); False: the sum of lengths."""
    length_buckets: tuple[int, ...] = ()
    """Ascending sequence-length edges. When set, a batch holds items of one bucket only
    (the oldest waiting item's), so short items are never padded to a long neighbour,
    and its cost is the bucket's edge times the count. Longer items than the last edge
    form a bucket of their own length."""

    def __post_init__(self) -> None:
        if list(self.length_buckets) != sorted(set(self.length_buckets)) or any(e <= 0 for e in self.length_buckets):
            raise ValueError(f"length_buckets must be positive and ascending, not {self.length_buckets}")

    def bucket_of(self, length: int) -> int:
        """The padded length an item of `length` gets: its bucket's edge (or itself)."""
        for edge in self.length_buckets:
            if length <= edge:
                return edge
        return length


@dataclass(frozen=True)
class _Submission:
    """What the items of one `submit` call share: when they were queued, whose trace."""

    queued_ns: int
    context: otel_context.Context


@dataclass
class _Entry(Generic[ItemT, ResultT]):
    item: ItemT
    length: int
    future: asyncio.Future[ResultT]
    submission: _Submission


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Groups items from concurrent callers into batches for `execute`.

    `execute(items)` must return exactly one result per item, in order. A result that is
    an exception fails that item alone; if `execute` raises, every item of the batch
    fails with that exception.
    """

    def __init__(
        self,
        execute: Callable[[list[ItemT]], Awaitable[list[ResultT | BaseException]]],
        length_of: Callable[[ItemT], int],
        policy: BatchPolicy,
        name: str = "batch",
        span_attributes: Mapping[str, AttributeValue] | None = None,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self._execute = execute
        self._length_of = length_of
        self.policy = policy
        self.name = name
        """Name of the span each executed batch gets."""
        self._span_attributes = dict(span_attributes or {})
        self._metrics = metrics
        self._queue: collections.deque[_Entry[ItemT, ResultT]] = collections.deque()
        # NOTE: asyncio primitives are created lazily, inside the running loop.
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._collecting: list[_Entry[ItemT, ResultT]] = []
        """The batch `_collect` is forming: taken off the queue, not yet running."""
        self._draining = False
        """No more items are expected: a forming batch closes without waiting."""
        self._closed = False
        self.dropped = 0
        """Items skipped because their caller had gone away (cancelled or timed out)."""

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Queues `items` together and waits for their results."""
        if self._closed:
            raise ModelNotReady(_CLOSED_DETAIL)
        if len(self._queue) + len(items) > self.policy.max_queue_size:
            if self._metrics is not None:
                self._metrics.rejected.inc(len(items))
            raise Overloaded(
                f"batch queue holds {len(self._queue)} sequences; adding {len(items)} would pass "
                f"the limit of {self.policy.max_queue_size}"
            )
        self._start()
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        submission = _Submission(time.time_ns(), otel_context.get_current())
        entries = [_Entry(item, self._length_of(item), loop.create_future(), submission) for item in items]
        self._queue.extend(entries)
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return list(await asyncio.gather(*(e.future for e in entries)))

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self.policy.max_concurrent_batches)
            self._loop_task = asyncio.create_task(self._batch_loop(), name="dynamic-batcher")

    async def drain(self) -> None:
        """Waits until everything submitted has run: the queue, the batch being collected
        and the batches executing. The caller stops new submissions first (a model version
        leaving service), so a forming batch closes now rather than after
        `max_queue_delay`: requests already here get answers, and promptly."""
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()  # a batch waiting out its delay closes now
        while self._queue or self._collecting or self._running:
            if self._running:
                await asyncio.wait(set(self._running))
            elif self._loop_task is None or self._loop_task.done():
                break  # nothing will run what is left; close() answers it
            else:
                await asyncio.sleep(0.001)  # the loop is handing the next batch over

    async def close(self) -> None:
        """Stops the batcher: batches executing finish; items not yet running (queued, or
        in a batch being collected) fail with ModelNotReady; later submits are refused."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        unrun = [*self._collecting, *self._queue]
        self._collecting = []
        self._queue.clear()
        for entry in unrun:
            if not entry.future.done():
                entry.future.set_exception(ModelNotReady(_CLOSED_DETAIL))
        if self._metrics is not None:
            self._metrics.queue_depth.set(0)
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _batch_loop(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            batch = await self._collect()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            self._collecting = []  # in the same step: the batch is always in one of the two
            task.add_done_callback(self._running.discard)

    def _take_live(self) -> _Entry[ItemT, ResultT] | None:
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                return entry
            self.dropped += 1
        return None

    def _fits(self, batch: list[_Entry[ItemT, ResultT]], cost: int, candidate: _Entry[ItemT, ResultT]) -> bool:
        if len(batch) >= self.policy.max_batch_size:
            return False
        return self._cost_with(batch, cost, candidate) <= self.policy.max_batch_tokens

    def _cost_with(self, batch: list[_Entry[ItemT, ResultT]], cost: int, candidate: _Entry[ItemT, ResultT]) -> int:
        """The batch's cost once `candidate` joins; `cost` is the padded length or the sum."""
        if self.policy.padded_cost:
            return self._new_cost(cost, candidate) * (len(batch) + 1)
        return cost + candidate.length

    def _new_cost(self, cost: int, entry: _Entry[ItemT, ResultT]) -> int:
        if self.policy.padded_cost:
            return max(cost, self.policy.bucket_of(entry.length))
        return cost + entry.length

    def _take_bucket(self, batch: list[_Entry[ItemT, ResultT]], cost: int) -> int:
        """Moves every waiting item of the batch's bucket that fits into it, oldest first;
        the others keep their places. Returns the batch's cost."""
        bucket = self.policy.bucket_of(batch[0].length)
        kept: collections.deque[_Entry[ItemT, ResultT]] = collections.deque()
        while self._queue and len(batch) < self.policy.max_batch_size:
            entry = self._queue.popleft()
            if entry.future.done():
                self.dropped += 1
            elif self.policy.bucket_of(entry.length) == bucket and self._fits(batch, cost, entry):
                cost = self._new_cost(cost, entry)
                batch.append(entry)
            else:
                kept.append(entry)
        self._queue.extendleft(reversed(kept))
        return cost

    async def _collect(self) -> list[_Entry[ItemT, ResultT]]:
        assert self._wakeup is not None
        first = self._take_live()
        if first is None:
            return []
        batch = [first]
        self._collecting = batch  # close() answers these if it cancels the loop mid-collect
        cost = self._new_cost(0, first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.max_queue_delay_seconds
        while True:
            if self.policy.length_buckets:
                cost = self._take_bucket(batch, cost)
            while not self.policy.length_buckets and self._queue and self._fits(batch, cost, self._queue[0]):
                entry = self._take_live()
                if entry is None:
                    break
                cost = self._new_cost(cost, entry)
                batch.append(entry)
            full = len(batch) >= self.policy.max_batch_size or bool(self._queue)
            remaining = deadline - loop.time()
            if full or remaining <= 0 or self._draining:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return batch

    def _observe(self, batch: list[_Entry[ItemT, ResultT]], started_ns: int) -> int:
        """Records the batch's size, cost and waits; returns its cost."""
        longest = self.policy.bucket_of(max(entry.length for entry in batch))
        cost = longest * len(batch) if self.policy.padded_cost else sum(entry.length for entry in batch)
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
            self._metrics.batch_size.observe(len(batch))
            self._metrics.batch_cost.observe(cost)
            for entry in batch:
                self._metrics.queue_wait.observe((started_ns - entry.submission.queued_ns) / 1e9)
        return cost

    def _start_span(self, batch: list[_Entry[ItemT, ResultT]], started_ns: int, cost: int) -> trace.Span:
        """The batch's span, child of the first caller's trace and linked to the others';
        plus one `queue wait` span per caller, ending when the batch starts."""
        submissions = list({id(entry.submission): entry.submission for entry in batch}.values())
        callers = [trace.get_current_span(s.context).get_span_context() for s in submissions]
        for submission, caller in zip(submissions, callers, strict=True):
            if caller.is_valid:
                _tracer.start_span("queue wait", context=submission.context, start_time=submission.queued_ns).end(
                    end_time=started_ns
                )
        return _tracer.start_span(
            self.name,
            context=submissions[0].context,
            links=[trace.Link(caller) for caller in callers[1:] if caller.is_valid],
            attributes={
                **self._span_attributes,
                "infermesh.batch.size": len(batch),
                "infermesh.batch.cost": cost,
                "infermesh.batch.callers": len(submissions),
            },
        )

    async def _run(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        assert self._slots is not None
        started_ns = time.time_ns()
        cost = self._observe(batch, started_ns)
        span = self._start_span(batch, started_ns, cost)
        try:
            with trace.use_span(span, end_on_exit=True):
                results = await self._execute([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)
        except Exception as error:
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(error)
        finally:
            self._slots.release()
