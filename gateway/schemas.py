"""Request and response bodies of the /v1 API."""

from __future__ import annotations

from typing import Literal

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


class ExplainRequest(BaseModel):
    text: str = Field(min_length=1, description="One headline or document to explain.")
    method: Literal["integrated_gradients", "occlusion"] = "integrated_gradients"
    target_label: str = Field("", description="Label to explain; empty means the predicted one.")
    steps: int = Field(0, ge=0, le=1_000_000, description="Integrated-gradients steps; 0 means the service default.")
    model_version: str = Field(
        "",
        max_length=32,
        description="Explain with this version (the one the prediction came from); empty: the serving one.",
    )


class TokenAttribution(BaseModel):
    text: str
    start: int
    end: int
    word_index: int
    attribution: float


class WordAttribution(BaseModel):
    text: str
    start: int
    end: int
    attribution: float


class FaithfulnessFigures(BaseModel):
    top_percent: float
    comprehensiveness: float
    sufficiency: float
    random_comprehensiveness: float
    random_sufficiency: float


class ChunkExplanation(BaseModel):
    char_start: int
    char_end: int
    target_probability: float
    completeness_gap: float | None
    tokens: list[TokenAttribution]
    words: list[WordAttribution]
    faithfulness: list[FaithfulnessFigures]


class ExplainResponse(BaseModel):
    model_name: str
    model_version: str
    method: str
    label: str
    probabilities: dict[str, float]
    target_label: str
    deciding_chunk: int
    chunks: list[ChunkExplanation]
