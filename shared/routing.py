"""Which model reads which text: the language-to-model table and the unknown-token limit,
in one place and transport-free. `shared.pipeline.PipelineClient` applies it for the
gateway (REST and gRPC) and the sentiment worker alike.

A text goes to the model its detected language is routed to; one that no served model can
read gets the status `unsupported_language` instead of a label, because a model given text
it cannot read still answers with confidence (issue 19: Chinese headlines came back
`neutral` at 0.99 from the English model, ~80% of their tokens `[UNK]`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field
from pydantic_settings import BaseSettings


class TextStatus(enum.StrEnum):
    OK = "ok"
    UNSUPPORTED_LANGUAGE = "unsupported_language"


class Refusal(enum.StrEnum):
    """Why a text got `unsupported_language` (the metric's `reason` label)."""

    NO_MODEL = "no_model"
    """No model is routed for its language."""
    UNKNOWN_TOKENS = "unknown_tokens"
    """Its model's tokenizer does not know too much of it."""


@dataclass(frozen=True)
class LanguageRouting:
    """The routing rule, as the gateway's and worker's settings give it."""

    routes: Mapping[str, str] = field(default_factory=dict)
    """Language (ISO 639-1) -> model. Added to the default: every language the default model
    declares (its config's `languages`) goes to the default model."""
    max_unknown_token_share: float = 0.3
    """A text whose share of unknown tokens under its model's tokenizer is above this is
    unreadable to that model."""
    min_language_confidence: float = 0.5
    """A detection less sure than this is not routed by: the text goes to the default (or
    requested) model, and only the unknown-token limit can refuse it. Short headlines are
    often detected at low confidence, and refusing an English one would be worse."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_unknown_token_share <= 1.0:
            raise ValueError(f"max_unknown_token_share is {self.max_unknown_token_share}; it must be in [0, 1]")
        if not 0.0 <= self.min_language_confidence <= 1.0:
            raise ValueError(f"min_language_confidence is {self.min_language_confidence}; it must be in [0, 1]")

    def table(self, default_model: str, default_languages: Sequence[str]) -> dict[str, str]:
        """Language -> model: the default model's declared languages, then `routes` over them.
        A BCP 47 tag ("zh-Hans", "en-GB") counts as its primary language."""
        table = {primary_language(language): default_model for language in default_languages}
        table.update({primary_language(language): model for language, model in self.routes.items()})
        return table


@dataclass(frozen=True)
class Detection:
    """What the tokenizer service reported for one text."""

    language: str
    confidence: float


def primary_language(tag: str) -> str:
    """ "zh-Hans" -> "zh", "EN" -> "en": detections are ISO 639-1, declarations BCP 47."""
    return tag.split("-", 1)[0].split("_", 1)[0].lower()


def route(
    detection: Detection,
    table: Mapping[str, str],
    default_model: str,
    min_confidence: float,
    requested_model: str = "",
) -> str | None:
    """The model that gets a text, or None when none is routed for its language. A requested
    model bypasses the table (it still has to read the text: `readable`); an unsure or
    undetermined detection goes to the default model."""
    if requested_model:
        return requested_model
    language = primary_language(detection.language)
    if not language or language == "und" or detection.confidence < min_confidence:
        return default_model
    return table.get(language)


def readable(unknown_token_share: float, limit: float) -> bool:
    """Whether a model whose tokenizer left this share of the text unknown can read it."""
    return unknown_token_share <= limit


class RoutingSettings(BaseSettings):
    """The routing fields the gateway's and worker's settings share (under their own env
    prefixes: INFERMESH_GATEWAY_LANGUAGE_ROUTES, INFERMESH_WORKER_LANGUAGE_ROUTES, ...)."""

    route_by_language: bool = True
    """Send each text to the model for its detected language and answer
    `unsupported_language` for text no served model can read. Off: every text goes to the
    default (or requested) model, whatever its language."""

    language_routes: dict[str, str] = {}
    """Language (ISO 639-1) -> model, as JSON: `{"zh": "finance-zh"}`. Added to the default:
    every language the default model declares goes to it."""

    max_unknown_token_share: float = Field(default=0.3, ge=0.0, le=1.0)
    """A text with more of its tokens unknown to its model's tokenizer than this is
    `unsupported_language` (a requested model too)."""

    min_language_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """Detections less sure than this are not routed by: the text goes to the default model,
    and only `max_unknown_token_share` can refuse it."""

    def language_routing(self) -> LanguageRouting | None:
        if not self.route_by_language:
            return None
        return LanguageRouting(self.language_routes, self.max_unknown_token_share, self.min_language_confidence)
