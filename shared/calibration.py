"""Temperature scaling: logits to calibrated probabilities, and how to fit and judge it.

Used by training and import (fit on held-out data), and by the post-processor and the
inference service (apply, through `calibrated`), so the numbers a caller sees are the
numbers the model card reports. The explainer's torch side applies the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import expit

FloatArray = npt.NDArray[np.floating]


class Calibration(Protocol):
    """What calibration needs of a head: a version's config (its primary head) or a
    `shared.model_repository.Head`."""

    @property
    def activation(self) -> Literal["softmax", "sigmoid"]: ...
    @property
    def temperature(self) -> float: ...


def calibrated(logits: FloatArray, config: Calibration) -> npt.NDArray[np.float64]:
    """A head's calibrated probabilities: softmax(logits / T) over each row for a
    single-label head, sigmoid(logits / T) per label for a multi-label one. Finite for
    any finite logits, however large. `logits` are that head's columns only."""
    matrix = np.asarray(logits, dtype=np.float64)
    if config.activation == "sigmoid":
        return sigmoid(matrix, config.temperature)
    # Shifted first: a temperature below 1 would otherwise scale a finite 1e308 to inf,
    # and inf - inf is NaN. What overflows now is -inf, which is right: exp gives 0.
    with np.errstate(over="ignore"):
        return softmax(matrix - matrix.max(axis=-1, keepdims=True), config.temperature)


#: A multi-label head's threshold for a label neither the version nor the request names.
DEFAULT_SIGMOID_THRESHOLD = 0.5


def holding(
    probabilities: FloatArray,
    activation: Literal["softmax", "sigmoid"],
    labels: Sequence[str],
    thresholds: Mapping[str, float],
) -> npt.NDArray[np.bool_]:
    """Which labels a head answers, per row of calibrated probabilities: every label at or
    above its threshold (sigmoid; DEFAULT_SIGMOID_THRESHOLD for labels not named), or the
    top label when it reaches its threshold (softmax; 0 for labels not named). A row with
    none holding is an abstention. The post-processor's rule; what a version answers is
    compared by it too (`infermesh add-head`'s agreement with the base version)."""
    matrix = np.asarray(probabilities)
    if activation == "sigmoid":
        limits = np.array([thresholds.get(label, DEFAULT_SIGMOID_THRESHOLD) for label in labels])
        return np.asarray(matrix >= limits)
    rows = np.arange(len(matrix))
    top = matrix.argmax(axis=-1)
    limits = np.array([thresholds.get(label, 0.0) for label in labels])
    result = np.zeros(matrix.shape, dtype=bool)
    result[rows, top] = matrix[rows, top] >= limits[top]
    return result


def sigmoid(logits: FloatArray, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Element-wise sigmoid of `logits / temperature` (scipy's expit: no overflow)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with np.errstate(over="ignore"):
        result: npt.NDArray[np.float64] = expit(np.asarray(logits, dtype=np.float64) / temperature)
    return result


def softmax(logits: FloatArray, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Row-wise softmax of `logits / temperature`, stable for large magnitudes."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    result: npt.NDArray[np.float64] = exp / exp.sum(axis=-1, keepdims=True)
    return result


def negative_log_likelihood(logits: FloatArray, labels: npt.NDArray[np.integer], temperature: float) -> float:
    probabilities = softmax(logits, temperature)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def fit_temperature(logits: FloatArray, labels: npt.NDArray[np.integer]) -> float:
    """The temperature that minimises negative log-likelihood on held-out data."""
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def binary_negative_log_likelihood(logits: FloatArray, targets: npt.NDArray[np.integer], temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) against 0/1 `targets` (same shape)."""
    probabilities = np.clip(sigmoid(logits, temperature), 1e-12, 1 - 1e-12)
    return float(-(targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities)).mean())


def fit_sigmoid_temperature(logits: FloatArray, targets: npt.NDArray[np.integer]) -> float:
    """The multi-label temperature: one T for every label, minimising binary cross-entropy."""
    result = minimize_scalar(
        lambda log_t: binary_negative_log_likelihood(logits, targets, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def expected_calibration_error(probabilities: FloatArray, labels: npt.NDArray[np.integer], bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al., 2017)."""
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)
