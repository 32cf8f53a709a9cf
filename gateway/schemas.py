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


class HeadResult(BaseModel):
    """One head's answer for one text."""

    label: str = Field(description="The head's top label, or `abstain`.")
    labels: list[str] = Field(
        description="The head's labels that hold: its one label, or for a multi-label (sigmoid) head each label at"
        " or above its threshold, most probable first; empty when the head abstained."
    )
    probabilities: dict[str, float] = Field(
        description="Label -> calibrated probability, with the head's own activation and temperature."
    )
    abstained: bool
    score: float | None = Field(
        None, description="sum of p(label) * weight over the head's label-to-score mapping; null when it has none."
    )


class SentimentResult(BaseModel):
    label: str
    labels: list[str] = Field(
        default_factory=list,
        description="Every label that holds: the one label, or for a multi-label model each label at or above"
        " its threshold, most probable first; empty when abstained.",
    )
    probabilities: dict[str, float]
    abstained: bool
    num_chunks: int
    num_tokens: int
    score: float | None = Field(
        None,
        description="sum of p(label) * weight over the version's label-to-score mapping (its config's `scores`,"
        " e.g. P(positive) - P(negative)); null when the version has none.",
    )
    status: Literal["ok", "unsupported_language"] = Field(
        "ok",
        description="`unsupported_language`: no served model can read this text (no model for its `language`, or"
        " too many of its tokens unknown to its model); then `label` is `abstain`, `labels` and `probabilities`"
        " are empty. Never a confident label.",
    )
    language: str = Field("", description="The detected language (ISO 639-1; `und` when undetermined).")
    language_confidence: float = Field(0.0, description="The language identifier's probability of `language`.")
    unknown_token_share: float = Field(
        0.0,
        description="Share of the text's tokens unknown to its model's tokenizer (0 for byte-level BPE tokenizers).",
    )
    model_name: str = Field(
        "", description="The model that classified this text (routed by language); empty when unsupported."
    )
    model_version: str = ""
    heads: dict[str, HeadResult] = Field(
        default_factory=dict,
        description="Every head of the version that read the text, by head name, primary head first (a version may"
        " classify several ways in one pass, e.g. `sentiment` and `topic`); the fields above repeat the primary"
        " head's. Empty when `status` is `unsupported_language`.",
    )


class SentimentResponse(BaseModel):
    model_name: str
    model_version: str
    results: list[SentimentResult]


#: A model's name as the repository holds it: one folder name.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ClassifyRequest(BaseModel):
    model: str = Field(
        min_length=1,
        max_length=128,
        pattern=MODEL_NAME_PATTERN,
        description="A model in the repository (`GET /v1/models`); another: 404 naming the models there are.",
    )
    version: str = Field("", max_length=32, description="Pin a version; empty: the version the rollout serves.")
    texts: list[str] = Field(min_length=1, description="Texts; long ones are chunked and aggregated.")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per-label minimum probability over the version's own thresholds (see the model's `activation`).",
    )


class HeadEntry(BaseModel):
    name: str = Field(description="The key of this head's answer in a result's `heads`.")
    labels: list[str]
    activation: Literal["softmax", "sigmoid"] = Field(
        description="softmax: one label per text; sigmoid: multi-label, each label at or above its threshold holds."
    )
    scores: dict[str, float] = Field(
        default_factory=dict, description="Label -> weight in the head's `score`; empty: the head has no score."
    )


class ModelEntry(BaseModel):
    name: str
    versions: list[str] = Field(description="Oldest first.")
    serving_version: str = Field(description="The version answering unpinned requests; the fields below are its.")
    labels: list[str]
    activation: Literal["softmax", "sigmoid"] = Field(
        description="softmax: one label per text; sigmoid: multi-label, each label at or above its threshold holds."
    )
    languages: list[str]
    scores: dict[str, float] = Field(description="Label -> weight in `score`; empty: results carry no score.")
    heads: list[HeadEntry] = Field(
        default_factory=list,
        description="Every head of the serving version, primary first (`labels`, `activation` and `scores` above"
        " are the primary head's); each answers under its name in a result's `heads`.",
    )


class ModelsResponse(BaseModel):
    default_model: str = Field(description="The model `/v1/sentiment` and requests naming none use.")
    models: list[ModelEntry]


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
    model: str = Field(
        "",
        max_length=128,
        pattern=r"^$|" + MODEL_NAME_PATTERN[1:],
        description="A model in the repository (`GET /v1/models`); empty: the default model.",
    )
    head: str = Field(
        "",
        max_length=64,
        description="The head to explain, for a model with several (`heads` in `GET /v1/models`); empty: its "
        "primary head. Everything in the answer is that head's, and `target_label` must be one of its labels; a "
        "head the model lacks: 422 naming its heads.",
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
    target_probability: float = Field(description="The served model's probability of the target label.")
    completeness_gap: float | None
    gradient_target_probability: float | None = Field(
        None,
        description="Integrated gradients only: the target probability under the weights the gradients ran on "
        "(`attribution_model`).",
    )
    tokens: list[TokenAttribution]
    words: list[WordAttribution]
    faithfulness: list[FaithfulnessFigures]


class ExplainResponse(BaseModel):
    model_name: str
    model_version: str
    method: str
    attribution_model: str = Field(
        description='The weights the attributions were computed on: "torch fp32 (hf/)" for integrated gradients, '
        'the served model for occlusion ("served int8 (inference service)").'
    )
    served_variant: str = Field(
        description="What the inference service serves (e.g. int8): `label`, `probabilities` and the faithfulness "
        "figures come from it."
    )
    head: str = Field(description="The head explained (the primary head's name when the request named none).")
    activation: Literal["softmax", "sigmoid"] = Field(
        description="That head's activation: softmax, its probabilities sum to 1; sigmoid, each label's stands alone."
    )
    label: str = Field(description="The head's predicted label (for a sigmoid head, its most probable one).")
    probabilities: dict[str, float] = Field(description="The head's labels' probabilities.")
    target_label: str
    gradient_label: str | None = Field(
        None,
        description="Integrated gradients only: the label of the weights the gradients ran on (`attribution_model`).",
    )
    gradient_probabilities: dict[str, float] | None = Field(
        None, description="Integrated gradients only: those weights' probabilities, chunks combined as for `label`."
    )
    gradients_disagree: bool | None = Field(
        None,
        description="Integrated gradients only: true when `gradient_label` differs from the served `label`, so the "
        "attributions explain a model that decides otherwise than the one that answered.",
    )
    deciding_chunk: int
    chunks: list[ChunkExplanation]
