"""Rollout decisions over a model repository: which version serves, which is the candidate,
whether a candidate is good enough to promote, and where a rollback returns to.

Everything here edits `<name>/rollout.json` (see `RolloutRule`); the inference service
applies it when told to reload (`apply_rule`) or when it next polls the repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermesh.model.data import read_labelled, to_examples
from shared.model_repository import ModelRepository, RolloutRule


class RolloutRefused(ValueError):
    """A rollout step that would make things worse or does not make sense; says why."""


@dataclass(frozen=True)
class LabelledFile:
    """Labelled data to compare versions on, read as `infermesh finetune` reads its files."""

    path: Path
    text_column: str = "text"
    label_column: str = "label"
    label_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """The serving version and a candidate scored on the same labelled data."""

    data: str
    examples: int
    serving: dict[str, Any]
    candidate: dict[str, Any]

    @property
    def macro_f1_change(self) -> float:
        return float(self.candidate["macro_f1"] - self.serving["macro_f1"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "examples": self.examples,
            "serving": self.serving,
            "candidate": self.candidate,
            "macro_f1_change": round(self.macro_f1_change, 4),
        }


def current_rule(repository: ModelRepository, name: str) -> RolloutRule:
    """The model's rule; without one, the newest version is what serves (the default policy)."""
    rule = repository.rollout(name)
    if rule is not None:
        return rule
    versions = repository.versions(name)
    if not versions:
        raise RolloutRefused(f"no versions of {name!r} in {repository.root}")
    return RolloutRule(serving=versions[-1])


def pin_serving(repository: ModelRepository, name: str, serving: str) -> None:
    """Writes a rule naming `serving` if the model has none, so a version added later
    (a fine-tune) waits to be rolled out instead of taking over at the next reload."""
    if repository.rollout(name) is None:
        repository.write_rollout(name, RolloutRule(serving=serving))


def start_candidate(
    repository: ModelRepository, name: str, candidate: str, mode: str, canary_share: float
) -> RolloutRule:
    rule = current_rule(repository, name)
    if candidate == rule.serving:
        raise RolloutRefused(f"version {candidate} is already serving")
    updated = RolloutRule(
        serving=rule.serving,
        candidate=candidate,
        mode="shadow" if mode == "shadow" else "canary",
        canary_share=canary_share if mode == "canary" else 0.0,
        history=rule.history,
    )
    repository.write_rollout(name, updated)
    return updated


def stop_candidate(repository: ModelRepository, name: str) -> RolloutRule:
    rule = current_rule(repository, name)
    updated = RolloutRule(serving=rule.serving, history=rule.history)
    repository.write_rollout(name, updated)
    return updated


def compare(repository: ModelRepository, name: str, candidate: str, data: LabelledFile) -> Comparison:
    """Scores the serving version and `candidate` (their default variants) on `data`."""
    from infermesh.model.evaluate import evaluate_version

    rule = current_rule(repository, name)
    serving_config = repository.config(name, rule.serving)
    candidate_config = repository.config(name, candidate)
    if set(serving_config.labels) != set(candidate_config.labels):
        raise RolloutRefused(
            f"version {candidate} labels {candidate_config.labels} differ from serving version {rule.serving}'s "
            f"{serving_config.labels}: one data set cannot score both (use --force to promote without a comparison)"
        )
    rows = read_labelled(data.path, data.text_column, data.label_column)
    figures = {}
    for version, config in ((rule.serving, serving_config), (candidate, candidate_config)):
        # Label ids follow each version's own label order.
        examples = to_examples(data.path, rows, config.labels, data.label_map)
        report = evaluate_version(repository.path(name, version), examples, data.path.name)
        default = report["variants"][report["default_variant"]]
        figures[version] = {
            "version": version,
            "variant": report["default_variant"],
            "accuracy": round(default["accuracy"], 4),
            "macro_f1": round(default["macro_f1"], 4),
            "ece_calibrated": round(default["ece_calibrated"], 4),
        }
    return Comparison(data.path.name, len(rows), figures[rule.serving], figures[candidate])


def promote(
    repository: ModelRepository,
    name: str,
    candidate: str,
    comparison: Comparison | None,
    tolerance: float,
    force: bool = False,
) -> RolloutRule:
    """Makes `candidate` the serving version, unless its macro-F1 falls more than
    `tolerance` below the serving version's (or there is no comparison) and not `force`."""
    rule = current_rule(repository, name)
    if candidate == rule.serving:
        raise RolloutRefused(f"version {candidate} is already serving")
    if not force:
        if comparison is None:
            raise RolloutRefused("no comparison on labelled data; give --data, or --force")
        if comparison.macro_f1_change < -tolerance:
            raise RolloutRefused(
                f"refused: version {candidate} macro-F1 {comparison.candidate['macro_f1']:.4f} is "
                f"{-comparison.macro_f1_change:.4f} below serving version {rule.serving}'s "
                f"{comparison.serving['macro_f1']:.4f} on {comparison.data} (tolerance {tolerance}); "
                "--force promotes anyway"
            )
    updated = RolloutRule(serving=candidate, history=[*rule.history, rule.serving])
    repository.write_rollout(name, updated)
    return updated


def rollback(repository: ModelRepository, name: str) -> RolloutRule:
    """Returns to the version that served before the last promotion."""
    rule = current_rule(repository, name)
    if not rule.history:
        raise RolloutRefused(f"{name} version {rule.serving} has no earlier serving version to return to")
    updated = RolloutRule(serving=rule.history[-1], history=rule.history[:-1])
    repository.write_rollout(name, updated)
    return updated


async def apply_rule(inference: str, name: str, admin_token: str = "", timeout: float = 60.0) -> None:
    """Tells a running inference service to reload `name` under its new rule. The service
    must run with model control `explicit`; `admin_token` is its INFERMESH_INFERENCE_ADMIN_TOKEN."""
    from shared.grpc_client import channel
    from shared.pb import grpc_predict_v2_pb2 as pb
    from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

    admin_token = admin_token.strip()  # as the server strips its own copy
    metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
    async with channel(inference) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=name), timeout=timeout, metadata=metadata
        )
