"""What a classification means beyond its labels, in one place: the monitor's score from a
version's label-to-score mapping, and the fields every classification response carries
(the post-processor's gRPC DocumentResult, the pipeline's gRPC Classification and the
gateway's REST results are all built with `response_fields`), each head's answer within
them (`head_fields`: a version may have several heads over one encoder), and what the
gateway's results add per text about its language and the model that read it
(`routed_fields`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

#: Label names read as the negative / positive end of a sentiment scale (lower case).
NEGATIVE_LABELS = frozenset({"negative", "neg", "bearish"})
POSITIVE_LABELS = frozenset({"positive", "pos", "bullish"})


def sentiment_scores(labels: Sequence[str]) -> dict[str, float]:
    """{negative label: -1, positive label: 1} when `labels` are recognisably sentiment
    (exactly one of each end, any case), else {}: a version's `scores` as the model builders
    write them."""
    negative = [label for label in labels if label.lower() in NEGATIVE_LABELS]
    positive = [label for label in labels if label.lower() in POSITIVE_LABELS]
    if len(negative) != 1 or len(positive) != 1:
        return {}
    return {negative[0]: -1.0, positive[0]: 1.0}


def score(probabilities: Mapping[str, float], scores: Mapping[str, float]) -> float | None:
    """sum of p(label) * weight over `scores` (a version's label -> weight mapping); None
    when the version has no mapping."""
    if not scores:
        return None
    return float(sum(probabilities.get(label, 0.0) * weight for label, weight in scores.items()))


class Classified(Protocol):
    """What every classification result has, whatever carries it."""

    @property
    def label(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def probabilities(self) -> Sequence[float] | Mapping[str, float]: ...
    @property
    def abstained(self) -> bool: ...
    @property
    def num_chunks(self) -> int: ...
    @property
    def score(self) -> float | None: ...


def response_fields(result: Classified) -> dict[str, Any]:
    """The fields a classification response carries, from one result: `label`, `labels`
    (every label that holds), `probabilities` (as the result holds them: a list in label
    order, or label -> probability), `abstained`, `num_chunks`, and `score` only when the
    version has one (an unset optional field on the wire, null on REST)."""
    fields: dict[str, Any] = {
        "label": result.label,
        "labels": list(result.labels),
        "probabilities": result.probabilities,
        "abstained": result.abstained,
        "num_chunks": result.num_chunks,
    }
    if result.score is not None:
        fields["score"] = result.score
    return fields


class HeadClassified(Protocol):
    """What one head's answer has, whatever carries it."""

    @property
    def label(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def probabilities(self) -> Mapping[str, float]: ...
    @property
    def abstained(self) -> bool: ...
    @property
    def score(self) -> float | None: ...


def head_fields(result: HeadClassified) -> dict[str, Any]:
    """The fields of one head's answer (the post-processor's and the Pipeline's gRPC
    HeadResult, beside its `name`; the value under the head's name in REST's `heads`):
    `label` (the head's top label, or abstain), `labels` (the head's labels that hold),
    `probabilities` (label -> probability), `abstained`, and `score` only when the head
    has a score mapping (an unset optional field on the wire, null on REST)."""
    fields: dict[str, Any] = {
        "label": result.label,
        "labels": list(result.labels),
        "probabilities": dict(result.probabilities),
        "abstained": result.abstained,
    }
    if result.score is not None:
        fields["score"] = result.score
    return fields


class Routed(Protocol):
    """A pipeline result: what routing by language decided for one text."""

    @property
    def status(self) -> str: ...
    @property
    def language(self) -> str: ...
    @property
    def language_confidence(self) -> float: ...
    @property
    def unknown_token_share(self) -> float: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...


def routed_fields(result: Routed) -> dict[str, Any]:
    """The gateway's per-text fields beside `response_fields` (REST and the gRPC Pipeline):
    `status` (`ok` or `unsupported_language`, as text; the Pipeline maps it to its enum),
    `language`, `language_confidence`, `unknown_token_share`, `model_name`, `model_version`."""
    return {
        "status": str(result.status),
        "language": result.language,
        "language_confidence": result.language_confidence,
        "unknown_token_share": result.unknown_token_share,
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
