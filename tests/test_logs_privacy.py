"""Texts are the users' data: no service writes them to its log, at any level."""

from __future__ import annotations

import logging

import pytest

from shared.errors import InputTooLarge, InvalidInput
from shared.pipeline import PipelineClient
from tests.reliability import Observed

SECRET = "Quixotrade Holdings privately warns of covenant breach"
BAD_SECRET = "Zymurgex Capital insider memo"


def everything_logged(record: logging.LogRecord) -> str:
    """The message, its traceback and every extra attribute a JSON formatter would write."""
    formatted = logging.Formatter("%(message)s").format(record)
    return f"{formatted} {record.__dict__!r}"


@pytest.mark.reliability(
    "Privacy",
    "Classification through the real tokenizer, inference and post-processor, and two rejected requests, "
    "with every logger at DEBUG",
    "no log record holds the texts",
)
async def test_logs_never_contain_the_texts(
    pipeline: PipelineClient, caplog: pytest.LogCaptureFixture, observed: Observed
) -> None:
    caplog.set_level(logging.DEBUG)
    result = await pipeline.classify([SECRET])
    assert len(result.results) == 1
    with pytest.raises(InputTooLarge):
        await pipeline.classify([f"{BAD_SECRET} " * 2000])  # past the tokenizer's 20,000 bytes
    with pytest.raises(InvalidInput):
        await pipeline.classify(["", BAD_SECRET])
    records = caplog.records
    leaking = [
        record for record in records if SECRET in everything_logged(record) or "Zymurgex" in everything_logged(record)
    ]
    observed.record(f"{len(records)} log records at DEBUG; {len(leaking)} held a text")
    assert not leaking, [record.getMessage() for record in leaking]
