"""Temperature scaling: logits to calibrated probabilities, and how to fit and judge it.

Used by training (fit on held-out data), by the post-processor and by the inference
service (apply), so the numbers a caller sees are the numbers the model card reports.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

FloatArray = npt.NDArray[np.floating]


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
