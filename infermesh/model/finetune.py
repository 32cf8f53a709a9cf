"""`infermesh finetune`: a user's labelled files in, a new servable model version out.

The new version lands in the model repository next to what is serving, complete (ONNX
fp32 and int8, tokenizer, labels, temperature, the LoRA adapter, `metrics.json`, a model
card) before it becomes visible; whether it serves is the rollout's decision, not this one's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infermesh.model.data import DatasetError, Example, LabelledRow, read_labelled, to_examples
from shared.model_repository import ModelRepository

if TYPE_CHECKING:
    from infermesh.model.train import TrainConfig

#: A version's figures, written next to its artifacts; `promote` reads them.
METRICS_FILE = "metrics.json"
TRAINING_FILE = "training.json"
CARD_FILE = "model-card.md"
ADAPTER_FOLDER = "adapter"


@dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]
    train: list[Example]
    valid: list[Example]


@dataclass(frozen=True)
class DataSpec:
    """Where the labelled files are and how to read them."""

    train: Path
    valid: Path
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    """The label set in logit order; empty means the training file's labels, sorted."""
    label_map: Mapping[str, str] = field(default_factory=dict)
    """File values to label names (`0=negative`), applied before checking labels."""


def load_dataset(spec: DataSpec) -> Dataset:
    """Reads and checks both files; raises DatasetError naming every bad row."""
    train_rows = read_labelled(spec.train, spec.text_column, spec.label_column)
    valid_rows = read_labelled(spec.valid, spec.text_column, spec.label_column)
    labels = spec.labels or tuple(sorted({spec.label_map.get(row.label, row.label) for row in train_rows}))
    if len(set(labels)) != len(labels):
        raise DatasetError(spec.train, [f"labels {', '.join(labels)} repeat a name"])
    if len(labels) < 2:
        raise DatasetError(spec.train, [f"a classifier needs at least two labels; found {', '.join(labels) or 'none'}"])
    train = to_examples(spec.train, train_rows, labels, spec.label_map)
    valid = to_examples(spec.valid, valid_rows, labels, spec.label_map)
    counts = Counter(example.label for example in train)
    missing = [name for index, name in enumerate(labels) if counts[index] == 0]
    if missing:
        raise DatasetError(spec.train, [f"label {name!r} has no training rows" for name in missing])
    return Dataset(labels, train, valid)


def next_version(repository: Path, name: str) -> str:
    """One above the highest version folder of `name` (built or not), or 1."""
    folder = repository / name
    taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return str(max(taken, default=0) + 1)


def _file_facts(path: Path, rows: Sequence[LabelledRow] | Sequence[Example]) -> dict[str, Any]:
    return {"file": path.name, "examples": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def finetune(
    spec: DataSpec,
    repository: Path,
    name: str,
    version: str = "",
    config: TrainConfig | None = None,
    languages: Sequence[str] = ("en",),
) -> Path:
    """Trains LoRA adapters and a head for `spec`'s labels, builds the serving artifacts and
    publishes them as `repository/name/version` (the next free version by default).
    `languages`: what the version declares it reads (routing sends those texts to it)."""
    from infermesh.model.build import build_model_repository
    from infermesh.model.card import render_version_card
    from infermesh.model.evaluate import evaluate_version
    from infermesh.model.rollout import current_rule, pin_serving
    from infermesh.model.train import TrainConfig, calibrate_and_report, fit, save_adapter, training_summary

    dataset = load_dataset(spec)
    version = version or next_version(repository, name)
    if (repository / name / version).exists():
        raise FileExistsError(f"{repository / name / version} exists; versions are never overwritten")
    config = replace(config or TrainConfig(), labels=dataset.labels)
    fitted = fit(dataset.train, dataset.valid, config)
    temperature, report = calibrate_and_report(fitted, dataset.valid, dataset.valid, config)
    summary = training_summary(
        fitted,
        config,
        temperature,
        report,
        train_examples=len(dataset.train),
        dev_examples=0,
        data={"train": _file_facts(spec.train, dataset.train), "valid": _file_facts(spec.valid, dataset.valid)},
    )

    def add_figures(staging: Path) -> None:
        shutil.copytree(adapter, staging / ADAPTER_FOLDER)
        (staging / TRAINING_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        metrics = evaluate_version(staging, dataset.valid, spec.valid.name)
        metrics["training"] = {
            "trainable_parameters": fitted.trainable_parameters,
            "total_parameters": fitted.total_parameters,
            "trainable_share": fitted.trainable_parameters / fitted.total_parameters,
            "training_seconds": round(fitted.seconds, 1),
            "best_epoch": fitted.best_epoch,
            "epochs_run": len(fitted.history),
        }
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_version_card(summary, metrics))

    existing = ModelRepository(repository).versions(name)
    if existing:
        # What serves now keeps serving until this version is rolled out.
        pin_serving(ModelRepository(repository), name, current_rule(ModelRepository(repository), name).serving)
    with tempfile.TemporaryDirectory() as scratch:
        adapter = Path(scratch) / ADAPTER_FOLDER
        save_adapter(fitted.model, adapter)
        (adapter / TRAINING_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return build_model_repository(
            adapter, repository, name, version, before_publish=add_figures, languages=languages
        )
