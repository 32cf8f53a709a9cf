"""Token buckets per caller, the gateway's rate limits: plain Python with an injectable
clock and no network, so the arithmetic is tested without a server or a sleep."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Refill arithmetic in floats can land a hair under a whole token at the very moment
# `take` said one would be there.
_EPSILON = 1e-9


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per caller name: each holds at most `burst` tokens, refills at
    `rate_per_second`, and a request spends one token.

    With `max_callers` set, the least recently seen caller's bucket is dropped to make room
    for a new one, so memory stays bounded however many callers (client addresses) appear.
    A dropped caller comes back with a full bucket, which is what it would have after
    being idle anyway; at worst a caller rotating through more than `max_callers`
    addresses gets more than its share, never less.

    Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        max_callers: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError(
                f"a rate limit needs a rate above 0 and a burst of 1 or more, not {rate_per_second}, {burst}"
            )
        if max_callers is not None and max_callers < 1:
            raise ValueError(f"max_callers must be at least 1, not {max_callers}")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self.max_callers = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Spends one of `caller`'s tokens and returns 0.0, or, when none is left, spends
        nothing and returns the seconds until the next token is there."""
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = _Bucket(tokens=float(self.burst), updated=now)
            if self.max_callers is not None and len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_second)
            bucket.updated = now
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_second


def retry_after_header(wait_seconds: float) -> str:
    """`Retry-After` for a refusal: whole seconds (RFC 9110 allows no fraction), rounded
    up so a client that obeys it finds a token, and at least 1."""
    return str(max(1, math.ceil(wait_seconds)))
