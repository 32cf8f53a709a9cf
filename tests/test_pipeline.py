"""The whole path through real servers: tokenizer -> inference -> post-processor."""

from __future__ import annotations

import asyncio

import pytest

from shared.errors import InputTooLarge, InvalidInput, ModelNotFound
from shared.pipeline import PipelineClient

CLEAR_HEADLINES = {
    "Stocks plunge as recession fears grip Wall Street": "negative",
    "Acme shares tumble 20% after the company slashes its profit forecast": "negative",
    "Bank faces lawsuit over fraud allegations, shares drop sharply": "negative",
    "Acme shares soar after record quarterly profit beats estimates": "positive",
    "Company raises full-year guidance as revenue jumps 30%": "positive",
    "Analysts upgrade Acme to buy, citing strong growth": "positive",
    "Acme to hold its annual shareholder meeting on May 5": "neutral",
    "Company announces date of third-quarter earnings call": "neutral",
}


async def test_clear_headlines_are_classified_as_expected(pipeline: PipelineClient) -> None:
    result = await pipeline.classify(list(CLEAR_HEADLINES))
    assert result.model_name == "finance-sentiment" and result.model_version == "2"
    got = {text: r.label for text, r in zip(CLEAR_HEADLINES, result.results, strict=True)}
    assert got == CLEAR_HEADLINES
    for r in result.results:
        assert set(r.probabilities) == {"negative", "neutral", "positive"}
        assert abs(sum(r.probabilities.values()) - 1.0) < 1e-4
        assert r.num_chunks == 1 and not r.abstained


async def test_long_document_is_chunked_and_aggregated(pipeline: PipelineClient) -> None:
    negative = "Acme shares tumble after the company slashes its profit forecast and warns of layoffs. "
    neutral = "The company will hold its annual meeting in Boston in May, as in previous years. "
    document = negative * 3 + neutral * 30
    result = await pipeline.classify([document, "Acme shares soar after record profit"], model_version="1")
    long_result, short_result = result.results
    assert result.model_version == "1"
    assert long_result.num_chunks > 3
    assert long_result.num_tokens > 500  # far beyond one 128-token chunk, yet every token was scored
    # Mostly neutral text with a negative opening: aggregated neutral, the opening chunk most negative.
    assert long_result.label == "neutral"
    assert short_result.label == "positive" and short_result.num_chunks == 1


async def test_thresholds_make_the_pipeline_abstain(pipeline: PipelineClient) -> None:
    result = await pipeline.classify(
        ["Acme to hold its annual shareholder meeting on May 5"], thresholds={"neutral": 0.999}
    )
    assert result.results[0].abstained and result.results[0].label == "abstain"


async def test_errors_surface_as_the_shared_taxonomy(pipeline: PipelineClient) -> None:
    with pytest.raises(InvalidInput, match="text 1 is empty"):
        await pipeline.classify(["fine", ""])
    with pytest.raises(InputTooLarge, match="max is 64"):
        await pipeline.classify(["x"] * 65)
    with pytest.raises(ModelNotFound, match="version '9'"):
        await pipeline.classify(["fine"], model_version="9")
    # Past gRPC's message-size limit: too large, not "overloaded" (retrying cannot help).
    with pytest.raises(InputTooLarge, match="larger than max"):
        await pipeline.classify(["word " * 4_000_000])


async def test_concurrent_calls_are_coalesced_without_mixing_answers_or_errors(pipeline: PipelineClient) -> None:
    texts = list(CLEAR_HEADLINES)
    calls = [pipeline.classify([text]) for text in texts]
    calls.insert(3, pipeline.classify(["fine", " "]))  # one caller with a bad text
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    bad = outcomes.pop(3)
    assert isinstance(bad, InvalidInput) and "text 1 is empty" in bad.detail
    for text, outcome in zip(texts, outcomes, strict=True):
        assert not isinstance(outcome, BaseException), outcome
        assert [r.label for r in outcome.results] == [CLEAR_HEADLINES[text]]
