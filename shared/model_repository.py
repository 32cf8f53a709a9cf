"""The on-disk model repository every service reads: `<root>/<name>/<version>/config.json`.

Versions are positive integers, as in Triton; the highest one is the latest. The
tokenizer takes the tokenizer file from here, the inference service the ONNX graphs,
the post-processor the labels and temperature, so all follow one version's artifacts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.batching import BatchPolicy
from shared.errors import ModelNotFound

CONFIG_FILE = "config.json"
ROLLOUT_FILE = "rollout.json"


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    datatype: str
    shape: list[int]


class BatchingConfig(BaseModel):
    """`dynamic_batching` in a version's config.json: this model's batching, where it
    differs from the inference service's settings (a large model wants smaller batches
    than a small one sharing the service). Unset fields keep the service's values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int | None = Field(default=None, gt=0)
    max_batch_tokens: int | None = Field(default=None, gt=0)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)
    length_buckets: list[int] | None = None

    def apply(self, policy: BatchPolicy) -> BatchPolicy:
        """The service's policy with this model's overrides."""
        changes: dict[str, object] = {}
        if self.max_batch_size is not None:
            changes["max_batch_size"] = self.max_batch_size
        if self.max_batch_tokens is not None:
            changes["max_batch_tokens"] = self.max_batch_tokens
        if self.max_queue_delay_ms is not None:
            changes["max_queue_delay_seconds"] = self.max_queue_delay_ms / 1000
        if self.length_buckets is not None:
            changes["length_buckets"] = tuple(self.length_buckets)
        return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]


HEAD_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
"""A head's name: it prefixes the head's OIP outputs (`topic_logits`), so plain identifiers."""


def _check_label_maps(labels: list[str], thresholds: dict[str, float], scores: dict[str, float]) -> None:
    for label, value in thresholds.items():
        if label not in labels:
            raise ValueError(f"threshold for unknown label {label!r}; labels are {labels}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold for {label!r} is {value}; it must be within [0, 1]")
    for label in scores:
        if label not in labels:
            raise ValueError(f"score for unknown label {label!r}; labels are {labels}")


class HeadConfig(BaseModel):
    """A further classification head over the version's encoder (`extra_heads` in
    config.json): its own labels, activation, temperature, thresholds and score mapping.
    The graph's `logits` carry every head's columns side by side, the version's own
    (primary) head first, then these in order: one forward pass answers all of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=HEAD_NAME_PATTERN)
    labels: list[str] = Field(min_length=1)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    temperature: float = Field(default=1.0, gt=0)
    thresholds: dict[str, float] = Field(default_factory=dict)
    scores: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _maps_name_labels(self) -> HeadConfig:
        _check_label_maps(self.labels, self.thresholds, self.scores)
        return self


@dataclasses.dataclass(frozen=True)
class Head:
    """One head as the services use it: its description and where its columns sit in the
    graph's `logits`. The primary head answers the plain OIP outputs (`logits`,
    `probabilities`, `label`); a further head answers `<name>_logits` and so on."""

    name: str
    labels: list[str]
    activation: Literal["softmax", "sigmoid"]
    temperature: float
    thresholds: dict[str, float]
    scores: dict[str, float]
    start: int
    primary: bool

    @property
    def stop(self) -> int:
        return self.start + len(self.labels)

    def output_name(self, output: str) -> str:
        """The OIP output name of this head's `output` (logits, probabilities, label)."""
        return output if self.primary else f"{self.name}_{output}"


class ModelConfig(BaseModel):
    """One version's `config.json`, written by `infermesh build-model`.

    The top-level `labels`, `activation`, `temperature`, `thresholds` and `scores` describe
    the version's primary head (named `head`); `extra_heads` adds heads over the same
    encoder. `heads` lists them all, in column order."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str
    version: str
    platform: str
    labels: list[str]
    max_sequence_length: int = Field(gt=2)
    vocab_size: int = Field(gt=0)
    temperature: float = Field(gt=0)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: dict[str, str]
    default_variant: str
    tokenizer: str = "tokenizer.json"
    base_model: str = ""
    sha256: dict[str, str] = Field(default_factory=dict)
    dynamic_batching: BatchingConfig = Field(default_factory=BatchingConfig)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    """softmax: one label per text (single-label); sigmoid: each label scored on its own,
    several may hold at once (transformers' `problem_type: multi_label_classification`)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """sigmoid: per label, the calibrated probability at or above which the label holds
    (0.5 for labels not named). softmax: the least probability the top label needs, else
    the post-processor abstains. A request's thresholds override these."""
    languages: list[str] = Field(default_factory=lambda: ["en"])
    """Languages the version is meant for (BCP 47 codes), as its maker declared them."""
    pad_token_id: int = Field(default=0, ge=0)
    """The tokenizer's padding id: the explainer's baseline token."""
    scores: dict[str, float] = Field(default_factory=dict)
    """Label -> its weight in the monitor's score, score = sum of p(label) * weight
    ({"negative": -1, "positive": 1} for sentiment); empty: the version has no score. The
    post-processor computes it (`shared.classification.score`)."""

    head: str = Field(default="label", pattern=HEAD_NAME_PATTERN)
    """The primary head's name (`sentiment`), the key of its result among a response's heads."""
    extra_heads: list[HeadConfig] = Field(default_factory=list)
    """Further heads over the same encoder, in column order after the primary head's."""

    @model_validator(mode="after")
    def _heads_are_consistent(self) -> ModelConfig:
        _check_label_maps(self.labels, self.thresholds, self.scores)
        names = [self.head, *(extra.name for extra in self.extra_heads)]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"head {duplicated[0]!r} is named twice; head names are {names}")
        return self

    @property
    def heads(self) -> list[Head]:
        """Every head, primary first, with its columns in the graph's `logits`."""
        heads = [Head(self.head, self.labels, self.activation, self.temperature, self.thresholds, self.scores, 0, True)]
        for extra in self.extra_heads:
            heads.append(
                Head(
                    extra.name,
                    extra.labels,
                    extra.activation,
                    extra.temperature,
                    extra.thresholds,
                    extra.scores,
                    heads[-1].stop,
                    False,
                )
            )
        return heads

    @property
    def num_logits(self) -> int:
        """Columns of the graph's `logits`: every head's labels."""
        return self.heads[-1].stop

    def head_named(self, name: str) -> Head:
        """The head called `name` ("" is the primary head); ModelNotFound-free: a ValueError
        naming the heads there are, for the caller to turn into its own error."""
        for head in self.heads:
            if head.name == name or (not name and head.primary):
                return head
        raise ValueError(f"model {self.name!r} has no head {name!r}; heads are {[h.name for h in self.heads]}")


class RolloutRule(BaseModel):
    """`<name>/rollout.json`: which version answers requests that pin none. Written by
    `infermesh rollout`, `promote` and `rollback`; applied by the inference service."""

    model_config = ConfigDict(frozen=True)

    serving: str
    candidate: str | None = None
    mode: Literal["canary", "shadow"] = "canary"
    """canary: `canary_share` of unpinned requests go to the candidate; shadow: the
    candidate scores every unpinned request too, but only the serving answer returns."""
    canary_share: float = Field(default=0.0, ge=0.0, le=1.0)
    history: list[str] = Field(default_factory=list)
    """Versions that served before, oldest first: where `rollback` returns to."""

    @model_validator(mode="after")
    def _candidate_differs(self) -> RolloutRule:
        if self.candidate == self.serving:
            raise ValueError(f"candidate {self.candidate} is already the serving version")
        return self

    @property
    def versions(self) -> list[str]:
        return [self.serving] + ([self.candidate] if self.candidate else [])


class ModelRepository:
    """Reads model folders; knows nothing about how models are run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions with a config file, oldest first; none for a name that is not one
        folder's name (names come from callers: "../x" must not leave the repository)."""
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            return []
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.name.isdigit() and (p / CONFIG_FILE).is_file()]
        return sorted(found, key=int)

    def resolve(self, name: str, version: str | None = None) -> str:
        """The version to use: the one asked for, else the latest."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound.named(name, available=self.model_names())
        if not version:
            return versions[-1]
        if version not in versions:
            raise ModelNotFound.named(name, version)
        return version

    def serving_version(self, name: str) -> str:
        """The version answering unpinned requests: the rollout rule's, else the latest."""
        latest = self.resolve(name)
        rule = self.rollout(name)
        return rule.serving if rule is not None else latest

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        resolved = self.resolve(name, version)
        text = (self.path(name, resolved) / CONFIG_FILE).read_text(encoding="utf-8")
        return ModelConfig.model_validate_json(text)

    def rollout(self, name: str) -> RolloutRule | None:
        path = self.root / name / ROLLOUT_FILE
        if not path.is_file():
            return None
        return RolloutRule.model_validate_json(path.read_text(encoding="utf-8"))

    def write_rollout(self, name: str, rule: RolloutRule) -> None:
        """Replaces the rule in one rename, so a reader sees the old rule or the new one."""
        missing = [v for v in rule.versions if v not in self.versions(name)]
        if missing:
            raise ModelNotFound.named(name, missing[0])
        path = self.root / name / ROLLOUT_FILE
        staging = path.with_name(f".{ROLLOUT_FILE}.writing")
        staging.write_text(rule.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(staging, path)
