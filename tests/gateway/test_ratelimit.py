"""The token buckets behind the gateway's rate limits, on a clock the test moves."""

from __future__ import annotations

import pytest

from gateway.ratelimit import TokenBuckets, retry_after_header
from tests.reliability import Observed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_gets_its_burst_then_waits_for_the_refill() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_second=2.0, burst=3, clock=clock)
    assert [buckets.take("ci") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("ci") == pytest.approx(0.5)
    clock.now += 0.25
    assert buckets.take("ci") == pytest.approx(0.25)  # a refusal spends nothing
    clock.now += 0.25
    assert buckets.take("ci") == 0.0
    assert buckets.take("ci") == pytest.approx(0.5)


def test_an_idle_caller_refills_to_its_burst_and_no_further() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_second=1.0, burst=2, clock=clock)
    assert buckets.take("ci") == 0.0 and buckets.take("ci") == 0.0
    clock.now += 3600
    assert [buckets.take("ci") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_callers_have_buckets_of_their_own() -> None:
    buckets = TokenBuckets(rate_per_second=0.1, burst=1, clock=Clock())
    assert buckets.take("ci") == 0.0
    assert buckets.take("ci") == pytest.approx(10.0)
    assert buckets.take("ops") == 0.0


def test_a_clock_stepping_back_neither_drains_nor_fills_a_bucket() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_second=1.0, burst=1, clock=clock)
    assert buckets.take("ci") == 0.0
    clock.now -= 50
    assert buckets.take("ci") == pytest.approx(1.0)
    clock.now += 1
    assert buckets.take("ci") == 0.0


@pytest.mark.reliability(
    "Security", "per-address limit under a flood of client addresses", "buckets tracked stay at ip_rate_max_clients"
)
def test_tracked_callers_stay_within_the_cap(observed: Observed) -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_second=1.0, burst=1, max_callers=100, clock=clock)
    for n in range(10_000):
        buckets.take(f"10.0.{n // 256}.{n % 256}")
    assert len(buckets) == 100
    # The least recently seen were dropped; the newest are still limited.
    assert buckets.take("10.0.39.15") == pytest.approx(1.0)
    assert buckets.take("10.0.0.0") == 0.0
    observed.record(f"10000 addresses, {len(buckets)} buckets kept; the newest still limited")


@pytest.mark.parametrize(("wait", "header"), [(0.001, "1"), (0.5, "1"), (1.0, "1"), (1.01, "2"), (99.2, "100")])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: str) -> None:
    assert retry_after_header(wait) == header


@pytest.mark.parametrize(("rate", "burst", "max_callers"), [(0.0, 1, None), (-1.0, 1, None), (1.0, 0, None), (1, 1, 0)])
def test_a_limit_that_could_never_admit_anyone_is_refused(rate: float, burst: int, max_callers: int | None) -> None:
    with pytest.raises(ValueError, match="at least 1|above 0"):
        TokenBuckets(rate, burst, max_callers)
