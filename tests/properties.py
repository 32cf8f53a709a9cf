"""One way to configure hypothesis for the property tests."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def hypothesis_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,  # the same inputs every run: CI must not fail by chance
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
