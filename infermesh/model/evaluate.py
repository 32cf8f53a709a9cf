"""Scores the served ONNX variants on labelled data, with the serving tokenizer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from infermesh.model.data import (
    TOPIC_HEAD,
    TOPIC_LABELS,
    Example,
    read_labelled,
    read_tfns_csv,
    read_topic_csv,
    to_examples,
)
from infermesh.model.metrics import classification_report
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.tokenizer.core import Overflow, Tokenizer, TokenizerLimits
from shared.calibration import expected_calibration_error, softmax
from shared.model_repository import CONFIG_FILE, ModelConfig, ModelRepository
from shared.padding import pad_right


def _logits(backend: OnnxRuntimeBackend, ids: list[list[int]], batch_size: int = 64) -> npt.NDArray[np.float32]:
    out = []
    for start in range(0, len(ids), batch_size):
        out.append(backend.run(*pad_right(ids[start : start + batch_size])))
    return np.concatenate(out)


def evaluate_version(folder: Path, examples: Sequence[Example], data_name: str, head: str = "") -> dict[str, Any]:
    """Figures of every ONNX variant in a version folder on `examples` for one head (""
    the primary), tokenized and truncated as the services do, calibrated with the head's
    temperature. `examples` carry label ids in that head's label order."""
    config = ModelConfig.model_validate_json((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    scored = config.head_named(head)
    tokenizer = Tokenizer(
        folder / config.tokenizer,
        config.name,
        TokenizerLimits(config.max_sequence_length, 0, len(examples), 1 << 20),
    )
    tokenized = tokenizer.tokenize([e.text for e in examples], overflow=Overflow.TRUNCATE)
    ids = [t.chunks[0].input_ids for t in tokenized]
    labels = np.array([e.label for e in examples])
    variants: dict[str, Any] = {}
    probabilities: dict[str, npt.NDArray[np.float64]] = {}
    for variant, file in config.variants.items():
        backend = OnnxRuntimeBackend(folder / file)
        started = time.perf_counter()
        logits = _logits(backend, ids)[:, scored.start : scored.stop]
        seconds = time.perf_counter() - started
        backend.close()
        report = classification_report(logits.argmax(-1), labels, tuple(scored.labels))
        report["ece_uncalibrated"] = expected_calibration_error(softmax(logits), labels)
        report["ece_calibrated"] = expected_calibration_error(softmax(logits, scored.temperature), labels)
        report["seconds"] = round(seconds, 2)
        variants[variant] = report
        probabilities[variant] = softmax(logits, scored.temperature)
    result: dict[str, Any] = {
        "model": config.name,
        "version": config.version,
        "head": scored.name,
        "data": data_name,
        "examples": len(examples),
        "truncated": sum(t.truncated for t in tokenized),
        "temperature": scored.temperature,
        "default_variant": config.default_variant,
        "variants": variants,
    }
    if {"fp32", "int8"} <= probabilities.keys():
        fp32, int8 = probabilities["fp32"], probabilities["int8"]
        result["int8_fp32_label_agreement"] = float((fp32.argmax(-1) == int8.argmax(-1)).mean())
        result["int8_fp32_max_probability_diff"] = float(np.abs(fp32 - int8).max())
    return result


def evaluate_repository_model(
    repository_root: Path,
    name: str,
    version: str,
    data: Path,
    topic_data: Path | None = None,
    news_data: Path | None = None,
) -> dict[str, Any]:
    """`evaluate_version` of a built version's primary head on a TFNS-coded CSV; with
    `topic_data` (Twitter Financial News Topic coding), of its `topic` head under `heads`;
    with `news_data` (a `text,label` CSV with label names, e.g. FinEntity's news sentences),
    of its primary head on news rather than tweets, under `news`."""
    repository = ModelRepository(repository_root)
    config = repository.config(name, version)
    folder = repository.path(name, config.version)
    metrics = evaluate_version(folder, read_tfns_csv(data, tuple(config.labels)), data.name)
    if news_data is not None:
        news = to_examples(news_data, read_labelled(news_data), config.labels)
        metrics["news"] = evaluate_version(folder, news, news_data.parent.name + "/" + news_data.name)
    if topic_data is not None:
        topics = config.head_named(TOPIC_HEAD)
        if tuple(topics.labels) != TOPIC_LABELS:
            raise ValueError(f"head {TOPIC_HEAD!r} of {name} has labels {topics.labels}, not the data set's")
        topic_examples = read_topic_csv(topic_data)
        metrics["heads"] = {TOPIC_HEAD: evaluate_version(folder, topic_examples, topic_data.name, TOPIC_HEAD)}
    return metrics
