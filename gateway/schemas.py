"""Request and response bodies of the /v1 API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SentimentRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="Headlines or documents; long ones are chunked and aggregated.")
    model_version: str = Field("", description="Pin a model version; empty means the latest served.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-label minimum probability; below it the text gets `abstain`."
    )


class SentimentResult(BaseModel):
    label: str
    probabilities: dict[str, float]
    abstained: bool
    num_chunks: int
    num_tokens: int


class SentimentResponse(BaseModel):
    model_name: str
    model_version: str
    results: list[SentimentResult]
