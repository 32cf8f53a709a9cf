"""A property-based run over the gateway's OpenAPI document (schemathesis): valid and
invalid requests for every operation, against a real uvicorn server and real services.
No request may get a 5xx, and every error must be problem+json."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation import GenerationMode

from gateway.app import create_app
from shared.grpc_server import RunningServer
from tests.gateway.conftest import serving, settings_for
from tests.reliability import Observed


def fuzz(base_url: str, examples: int, statuses: Counter[int]) -> list[str]:
    """Failures, one line per operation and mode; `statuses` counts every answer."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"the OpenAPI document has an invalid operation: {result.err()}")
            continue
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,  # the same requests every run: CI must not fail by chance
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(base_url=base_url, timeout=60)
                statuses[response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400:
                    assert response.headers["content-type"] == ["application/problem+json"], response.text

            try:
                check()
            except Unsatisfiable:
                continue  # no invalid request exists for this operation in that form
            except Exception as error:  # collect every operation's failure, then fail once
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {error}")
    return failures


@pytest.mark.reliability(
    "Hostile input",
    "Schema-driven fuzz of the REST gateway from its OpenAPI document (schemathesis: valid and invalid requests "
    "for every operation)",
    "no 5xx; every error application/problem+json",
)
async def test_no_request_from_the_openapi_document_gets_a_5xx(
    servers: list[RunningServer],
    observed: Observed,
) -> None:
    app = create_app(settings_for(servers))
    async with serving(app) as url:
        # The services answer on this event loop, so the blocking fuzzer runs in a thread.
        statuses: Counter[int] = Counter()
        failures = await asyncio.to_thread(fuzz, url, 10, statuses)
    observed.record(
        f"{sum(statuses.values())} requests: " + ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items()))
    )
    assert not failures, "\n".join(failures)
