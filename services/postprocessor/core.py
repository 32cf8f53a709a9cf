"""Logits to calibrated labels: temperature scaling, thresholds with abstention, and
aggregation of a long document's chunks into one result. Plain numpy; no transport.

A single-label (softmax) version answers its top label, or abstains below that label's
threshold. A multi-label (sigmoid) version answers every label at or above its threshold
(the version's, 0.5 by default, or the request's), the most probable first; with none, it
abstains.

A version with several heads over one encoder (`ModelConfig.heads`) is answered head by
head, each with its own labels, activation, temperature, thresholds and score mapping,
from its own columns of the logits; the document's top-level fields are the primary
head's. A request's thresholds apply to the primary head."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shared.calibration import calibrated, holding
from shared.classification import score
from shared.errors import InputTooLarge, InvalidInput
from shared.model_repository import Head, ModelConfig, ModelRepository


class Aggregation(enum.Enum):
    MEAN = "mean"
    """Token-weighted mean of the chunks' calibrated probabilities."""
    MAX_CONFIDENCE = "max_confidence"
    """The chunk with the most confident prediction decides."""


@dataclass(frozen=True)
class HeadResult:
    """One head's answer for one document."""

    name: str
    label: str
    """The head's top label, or the abstain label."""
    labels: list[str]
    """The head's labels that hold; empty when it abstained."""
    probabilities: dict[str, float]
    """Calibrated with the head's activation and temperature, label -> probability."""
    abstained: bool
    score: float | None = None
    """The head's score from its label -> weight mapping; None when it has none."""


@dataclass(frozen=True)
class DocumentResult:
    label: str
    """The top label, or the abstain label."""
    probabilities: list[float]
    """Calibrated, in the order of `PostprocessResult.labels`."""
    abstained: bool
    num_chunks: int
    deciding_chunk: int
    """Index within the document of the chunk most in favour of the top label."""
    labels: list[str]
    """The labels that hold: [label] for a single-label version, every label at or above
    its threshold (most probable first) for a multi-label one; empty when abstained."""
    score: float | None = None
    """The version's score (`shared.classification.score`); None when it has no mapping."""
    heads: list[HeadResult] = field(default_factory=list)
    """Every head the request's logits carry, in the version's head order (primary first;
    only the primary head for logits holding its columns alone). The fields above repeat
    the primary head's."""


@dataclass(frozen=True)
class PostprocessResult:
    labels: list[str]
    results: list[DocumentResult]
    model_name: str
    model_version: str
    temperature: float
    abstain_label: str


@dataclass(frozen=True)
class ModelFacts:
    """One model as ListModels describes it: its versions and its serving version's config."""

    name: str
    versions: list[str]
    serving: ModelConfig
    scores: dict[str, float]
    """The serving version's score mapping (the service's override, if any, else the config's)."""


class Postprocessor:
    """Reads each model version's labels, temperature and score mapping from the model
    repository; a request naming no model gets `default_model`."""

    def __init__(
        self,
        repository: ModelRepository,
        abstain_label: str = "abstain",
        max_rows: int = 65536,
        default_model: str = "finance-sentiment",
        scores: Mapping[str, Mapping[str, float]] | None = None,
        max_configs: int = 64,
    ) -> None:
        self.repository = repository
        self.abstain_label = abstain_label
        self.max_rows = max_rows
        self.default_model = default_model
        self.score_overrides = {name: dict(mapping) for name, mapping in (scores or {}).items()}
        self.max_configs = max_configs
        self._configs: OrderedDict[tuple[str, str], ModelConfig] = OrderedDict()

    def _config(self, name: str, version: str) -> ModelConfig:
        # A pinned version is immutable once built: no need to list the repository again.
        config = self._configs.get((name, version))
        if config is not None:
            self._configs.move_to_end((name, version))
            return config
        resolved = self.repository.resolve(name, version) if version else self.repository.serving_version(name)
        key = (name, resolved)
        config = self._configs.get(key) or self.repository.config(name, resolved)
        self._configs[key] = config
        self._configs.move_to_end(key)
        while len(self._configs) > self.max_configs:
            self._configs.popitem(last=False)
        return config

    def scores(self, config: ModelConfig) -> dict[str, float]:
        """The label -> weight mapping of the primary head's score: the service's override
        for the model, else the version's config."""
        override = self.score_overrides.get(config.name)
        return dict(override) if override is not None else dict(config.scores)

    def head_scores(self, config: ModelConfig, head: Head) -> dict[str, float]:
        """A head's label -> weight mapping: `scores` for the primary head, the head's own
        for the others."""
        return self.scores(config) if head.primary else dict(head.scores)

    def models(self) -> list[ModelFacts]:
        """Every model in the repository, described by its serving version."""
        facts = []
        for name in self.repository.model_names():
            serving = self._config(name, self.repository.serving_version(name))
            facts.append(ModelFacts(name, self.repository.versions(name), serving, self.scores(serving)))
        return facts

    def process(
        self,
        model_name: str,
        model_version: str,
        logits: Sequence[float] | npt.NDArray[np.floating],
        num_labels: int,
        document_index: Sequence[int] = (),
        row_weights: Sequence[float] = (),
        thresholds: Mapping[str, float] | None = None,
        aggregation: Aggregation = Aggregation.MEAN,
    ) -> PostprocessResult:
        model_name = model_name or self.default_model
        config = self._config(model_name, model_version)
        labels = config.labels
        heads = config.heads
        if num_labels != config.num_logits:
            if num_labels != len(labels):
                raise InvalidInput(
                    f"num_labels is {num_labels}; model {model_name!r} version {config.version} has "
                    f"{config.num_logits} labels over its heads {[h.name for h in heads]}, "
                    f"{len(labels)} in its primary head {config.head!r} (either will do)"
                    if len(heads) > 1
                    else f"num_labels is {num_labels}; model {model_name!r} has {len(labels)} labels"
                )
            heads = heads[:1]  # an older caller's logits: the primary head's columns alone
        flat = np.asarray(logits, dtype=np.float64)
        if flat.size == 0:
            raise InvalidInput("logits is empty")
        if flat.size % num_labels:
            raise InvalidInput(f"logits has {flat.size} values, not a multiple of num_labels ({num_labels})")
        matrix = flat.reshape(-1, num_labels)
        rows = len(matrix)
        if rows > self.max_rows:
            raise InputTooLarge(f"request has {rows} rows; max is {self.max_rows}")
        bad_rows = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if bad_rows.size:
            raise InvalidInput(f"logits row {int(bad_rows[0])} holds a NaN or infinite value")
        documents = self._document_index(document_index, rows)
        weights = self._weights(row_weights, rows)
        request_limits = self._thresholds(thresholds or {}, labels)

        answers = [
            self._head_answers(
                head,
                matrix[:, head.start : head.stop],
                documents,
                weights,
                head.thresholds | request_limits if head.primary else dict(head.thresholds),
                self.head_scores(config, head),
                aggregation,
            )
            for head in heads
        ]
        results = [
            DocumentResult(
                label=primary.label,
                labels=primary.labels,
                probabilities=list(primary.probabilities.values()),
                abstained=primary.abstained,
                num_chunks=num_chunks,
                deciding_chunk=deciding_chunk,
                score=primary.score,
                heads=[answer[document][0] for answer in answers],
            )
            for document, (primary, num_chunks, deciding_chunk) in enumerate(answers[0])
        ]
        return PostprocessResult(
            labels=list(labels),
            results=results,
            model_name=model_name,
            model_version=config.version,
            temperature=config.temperature,
            abstain_label=self.abstain_label,
        )

    def _head_answers(
        self,
        head: Head,
        matrix: npt.NDArray[np.float64],
        documents: npt.NDArray[np.int64],
        weights: npt.NDArray[np.float64],
        limits: Mapping[str, float],
        scores: Mapping[str, float],
        aggregation: Aggregation,
    ) -> list[tuple[HeadResult, int, int]]:
        """Per document: the head's answer from its columns `matrix`, the document's chunk
        count, and its chunk most in favour of the head's top label."""
        labels = head.labels
        probabilities = calibrated(matrix, head)
        answers: list[tuple[HeadResult, int, int]] = []
        for document in range(int(documents.max()) + 1):
            rows_of_document = np.flatnonzero(documents == document)
            chunk_probabilities = probabilities[rows_of_document]
            if aggregation is Aggregation.MAX_CONFIDENCE:
                combined = chunk_probabilities[int(chunk_probabilities.max(axis=1).argmax())]
            else:
                # Relative to the document's largest: 1e300-sized weights would overflow
                # the weighted sum, 1e-320-sized ones underflow it to 0.
                chunk_weights = weights[rows_of_document] / weights[rows_of_document].max()
                combined = (chunk_probabilities * chunk_weights[:, None]).sum(axis=0) / chunk_weights.sum()
            top = int(combined.argmax())
            holds = holding(combined[None, :], head.activation, labels, limits)[0]
            on = [labels[i] for i in np.argsort(-combined, kind="stable") if holds[i]]  # the most probable first
            abstained = not on
            by_label = dict(zip(labels, (float(p) for p in combined), strict=True))
            answer = HeadResult(
                name=head.name,
                label=self.abstain_label if abstained else labels[top],
                labels=on,
                probabilities=by_label,
                abstained=abstained,
                score=score(by_label, scores),
            )
            answers.append((answer, len(rows_of_document), int(chunk_probabilities[:, top].argmax())))
        return answers

    @staticmethod
    def _document_index(document_index: Sequence[int], rows: int) -> npt.NDArray[np.int64]:
        if not document_index:
            return np.arange(rows, dtype=np.int64)
        if len(document_index) != rows:
            raise InvalidInput(f"document_index has {len(document_index)} entries; logits have {rows} rows")
        try:
            documents = np.asarray(document_index, dtype=np.int64)
        except OverflowError:
            raise InvalidInput(f"document_index holds a number beyond {rows - 1}") from None
        if int(documents.min()) < 0:
            raise InvalidInput(f"document_index holds {int(documents.min())}; document numbers start at 0")
        if int(documents.max()) >= rows:
            raise InvalidInput(f"document_index holds {int(documents.max())}; with {rows} rows it must be below {rows}")
        count = int(documents.max()) + 1
        missing = np.setdiff1d(np.arange(count), documents)
        if missing.size:
            raise InvalidInput(f"document {int(missing[0])} has no rows; document_index must cover 0..{count - 1}")
        return documents

    @staticmethod
    def _weights(row_weights: Sequence[float], rows: int) -> npt.NDArray[np.float64]:
        if not row_weights:
            return np.ones(rows)
        if len(row_weights) != rows:
            raise InvalidInput(f"row_weights has {len(row_weights)} entries; logits have {rows} rows")
        weights = np.asarray(row_weights, dtype=np.float64)
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise InvalidInput("row_weights must be finite and above 0")
        return weights

    @staticmethod
    def _thresholds(thresholds: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
        for label, value in thresholds.items():
            if label not in labels:
                raise InvalidInput(f"threshold for unknown label {label!r}; labels are {list(labels)}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidInput(f"threshold for {label!r} is {value}; it must be within [0, 1]")
        return dict(thresholds)
