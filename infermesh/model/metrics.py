"""Classification figures used by training, evaluation and the model card."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def classification_report(
    predicted: npt.NDArray[np.integer], expected: npt.NDArray[np.integer], labels: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support."""
    per_class: dict[str, dict[str, float]] = {}
    f1_scores = []
    for index, name in enumerate(labels):
        true_positive = int(((predicted == index) & (expected == index)).sum())
        predicted_count = int((predicted == index).sum())
        support = int((expected == index).sum())
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_scores.append(f1)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "accuracy": float((predicted == expected).mean()),
        "macro_f1": float(np.mean(f1_scores)),
        "per_class": per_class,
        "examples": int(len(expected)),
    }


def multi_label_report(
    predicted: npt.NDArray[np.integer], expected: npt.NDArray[np.integer], labels: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Multi-label figures from 0/1 [texts, labels] matrices: exact-match accuracy (every
    label of a text right), micro- and macro-F1, and per-label precision/recall/F1/support."""
    per_class: dict[str, dict[str, float]] = {}
    f1_scores = []
    for index, name in enumerate(labels):
        guess, truth = predicted[:, index] == 1, expected[:, index] == 1
        true_positive = int((guess & truth).sum())
        precision = true_positive / int(guess.sum()) if guess.any() else 0.0
        recall = true_positive / int(truth.sum()) if truth.any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_scores.append(f1)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(truth.sum())}
    true_positive = int(((predicted == 1) & (expected == 1)).sum())
    denominator = int((predicted == 1).sum()) + int((expected == 1).sum())
    return {
        "accuracy": float((predicted == expected).all(axis=1).mean()),
        "micro_f1": 2 * true_positive / denominator if denominator else 0.0,
        "macro_f1": float(np.mean(f1_scores)),
        "per_class": per_class,
        "examples": int(len(expected)),
    }
