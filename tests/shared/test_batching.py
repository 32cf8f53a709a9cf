from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.batching import BatchPolicy, DynamicBatcher
from shared.errors import ModelNotReady, Overloaded


class Recorder:
    """A backend stand-in that records the batches it is given and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        await self.release.wait()
        if "boom" in items:
            raise RuntimeError("backend failed")
        return [item.upper() for item in items]


def batcher(recorder: Recorder, **policy: Any) -> DynamicBatcher[str, str]:
    return DynamicBatcher(recorder, len, BatchPolicy(**policy))  # type: ignore[arg-type]


async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    recorder.release.clear()
    b = batcher(recorder, max_batch_size=8, max_queue_delay_seconds=0)
    first = asyncio.create_task(b.submit(["a"]))
    await asyncio.sleep(0.01)  # the first batch ("a") is now executing and held
    rest = [asyncio.create_task(b.submit([w])) for w in ("bb", "cc", "dd")]
    await asyncio.sleep(0.01)
    recorder.release.set()
    assert await first == ["A"]
    assert [await t for t in rest] == [["BB"], ["CC"], ["DD"]]
    assert recorder.batches == [["a"], ["bb", "cc", "dd"]]
    await b.close()


async def test_batch_closes_on_size_and_token_budget() -> None:
    recorder = Recorder()
    b = batcher(recorder, max_batch_size=3, max_batch_tokens=12, max_queue_delay_seconds=0.01)
    # Lengths 4,4,4,4: the budget (12) allows 3 per batch; then 10+2: a 10-long item costs 20 with a partner.
    results = await b.submit(["aaaa", "bbbb", "cccc", "dddd", "eeeeeeeeee", "ff"])
    assert results == ["AAAA", "BBBB", "CCCC", "DDDD", "EEEEEEEEEE", "FF"]
    assert [len(batch) for batch in recorder.batches] == [3, 1, 1, 1]
    await b.close()


async def test_a_failed_batch_fails_every_caller_in_it_and_the_batcher_goes_on() -> None:
    recorder = Recorder()
    b = batcher(recorder, max_batch_size=4, max_queue_delay_seconds=0.01)
    with pytest.raises(RuntimeError, match="backend failed"):
        await b.submit(["x", "boom"])
    assert await b.submit(["fine"]) == ["FINE"]
    await b.close()


async def test_full_queue_is_overloaded_not_unbounded() -> None:
    recorder = Recorder()
    recorder.release.clear()
    b = batcher(recorder, max_batch_size=1, max_queue_size=3, max_queue_delay_seconds=0)
    running = asyncio.create_task(b.submit(["a"]))
    await asyncio.sleep(0.01)  # "a" executes (held); the queue is empty again
    queued = asyncio.create_task(b.submit(["b", "c", "d"]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="limit of 3"):
        await b.submit(["e"])
    recorder.release.set()
    assert await running == ["A"] and await queued == ["B", "C", "D"]
    await b.close()


async def test_cancelled_callers_are_skipped_and_counted() -> None:
    recorder = Recorder()
    recorder.release.clear()
    b = batcher(recorder, max_batch_size=1, max_queue_delay_seconds=0)
    running = asyncio.create_task(b.submit(["a"]))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(b.submit(["gone"]))
    await asyncio.sleep(0.01)
    gone.cancel()
    recorder.release.set()
    assert await running == ["A"]
    assert await b.submit(["z"]) == ["Z"]
    assert ["gone"] not in recorder.batches and b.dropped == 1
    await b.close()


async def test_an_item_can_fail_alone_and_sum_cost_counts_every_item() -> None:
    seen: list[list[str]] = []

    async def execute(items: list[str]) -> list[str | BaseException]:
        seen.append(items)
        return [ValueError(f"bad {item}") if item.startswith("x") else item.upper() for item in items]

    b: DynamicBatcher[str, str] = DynamicBatcher(
        execute,
        len,
        BatchPolicy(max_batch_size=10, max_batch_tokens=6, max_queue_delay_seconds=0.01, padded_cost=False),
    )
    good, bad = await asyncio.gather(b.submit(["aa", "bb"]), b.submit(["xx"]), return_exceptions=True)
    assert good == ["AA", "BB"]
    assert isinstance(bad, ValueError) and str(bad) == "bad xx"
    assert seen == [["aa", "bb", "xx"]]  # 2 + 2 + 2 = 6 fits the budget exactly
    assert await b.submit(["aaaa", "bbbb"]) == ["AAAA", "BBBB"]
    assert seen[-2:] == [["aaaa"], ["bbbb"]]  # 4 + 4 would pass 6
    await b.close()


async def test_length_buckets_keep_short_items_away_from_long_ones() -> None:
    """Edges 4 and 8: lengths 2,3,4 share a bucket (padded to 4), 6 and 7 another (padded
    to 8), 12 is its own; the oldest waiting item's bucket always goes next."""
    recorder = Recorder()
    recorder.release.clear()
    b = batcher(recorder, max_batch_size=8, max_queue_delay_seconds=0, length_buckets=(4, 8))
    first = asyncio.create_task(b.submit(["x"]))
    await asyncio.sleep(0.01)  # the first batch executes and is held while the rest queue up
    words = ["aaaaaaa", "bb", "cccccc", "ddd", "eeeeeeeeeeee", "ffff"]
    rest = [asyncio.create_task(b.submit([w])) for w in words]
    await asyncio.sleep(0.01)
    recorder.release.set()
    await first
    assert [(await t)[0] for t in rest] == [w.upper() for w in words]
    assert recorder.batches == [["x"], ["aaaaaaa", "cccccc"], ["bb", "ddd", "ffff"], ["eeeeeeeeeeee"]]
    await b.close()


async def test_bucketed_cost_is_the_edge_times_the_count() -> None:
    recorder = Recorder()
    recorder.release.clear()
    # Budget 16 at edge 8: two items per batch, though each is only 5 long.
    b = batcher(recorder, max_batch_size=8, max_batch_tokens=16, max_queue_delay_seconds=0, length_buckets=(8,))
    first = asyncio.create_task(b.submit(["x"]))
    await asyncio.sleep(0.01)
    rest = asyncio.create_task(b.submit(["aaaaa", "bbbbb", "ccccc"]))
    await asyncio.sleep(0.01)
    recorder.release.set()
    await first
    assert await rest == ["AAAAA", "BBBBB", "CCCCC"]
    assert recorder.batches == [["x"], ["aaaaa", "bbbbb"], ["ccccc"]]
    await b.close()


def test_bucket_edges_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascending"):
        BatchPolicy(length_buckets=(32, 16))
    assert BatchPolicy(length_buckets=(16, 32)).bucket_of(17) == 32
    assert BatchPolicy(length_buckets=(16, 32)).bucket_of(40) == 40


async def collecting(b: DynamicBatcher[str, str]) -> None:
    """Waits until the batcher has taken every queued item into the batch it is forming."""
    while b.queue_depth:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # the loop is now waiting out max_queue_delay


async def test_drain_answers_the_batch_being_collected_before_close() -> None:
    """A version swap drains then closes: items already taken into a batch still waiting
    out a long max_queue_delay are executed at once, not cancelled with their callers left
    to hang until their deadline."""
    recorder = Recorder()
    b = batcher(recorder, max_batch_size=8, max_queue_delay_seconds=60)
    callers = [asyncio.create_task(b.submit([text])) for text in ("a", "b", "c")]
    await collecting(b)
    assert not any(caller.done() for caller in callers)

    await asyncio.wait_for(b.drain(), timeout=5)
    await b.close()
    answers = await asyncio.wait_for(asyncio.gather(*callers), timeout=5)
    assert answers == [["A"], ["B"], ["C"]]
    assert recorder.batches == [["a", "b", "c"]], "one batch, flushed by the drain"


async def test_close_answers_everything_it_did_not_run_with_unavailable() -> None:
    """Closing without a drain (shutdown) answers every caller still waiting, queued or
    in the batch being collected, with a retryable error instead of a hang; a submit
    after close is refused the same way."""
    recorder = Recorder()
    recorder.release.clear()
    b = batcher(recorder, max_batch_size=1, max_queue_delay_seconds=60)
    running = asyncio.create_task(b.submit(["a"]))
    await asyncio.sleep(0.01)  # "a" executes (held); "b" and "c" wait for a slot
    waiting = asyncio.create_task(b.submit(["b", "c"]))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(b.close())
    with pytest.raises(ModelNotReady, match="closed before this request ran"):
        await asyncio.wait_for(waiting, timeout=5)
    recorder.release.set()
    await asyncio.wait_for(closing, timeout=5)
    assert await running == ["A"], "a batch already executing finishes"

    b = batcher(Recorder(), max_batch_size=8, max_queue_delay_seconds=60)
    collected = asyncio.create_task(b.submit(["x"]))
    await collecting(b)
    await asyncio.wait_for(b.close(), timeout=5)
    with pytest.raises(ModelNotReady, match="closed before this request ran"):
        await asyncio.wait_for(collected, timeout=5)
    with pytest.raises(ModelNotReady, match="closed"):
        await b.submit(["y"])
