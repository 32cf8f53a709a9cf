"""Labelled text loading shared by training and evaluation."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

#: Our label order; the served model's logits follow it.
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

#: Twitter Financial News Sentiment codes: 0 bearish, 1 bullish, 2 neutral.
TFNS_TO_LABEL: dict[str, str] = {"0": "negative", "1": "positive", "2": "neutral"}


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def read_tfns_csv(path: Path, labels: tuple[str, ...] = LABELS) -> list[Example]:
    """Reads a `text,label` CSV in the TFNS coding into examples with our label ids."""
    index = {name: i for i, name in enumerate(labels)}
    examples: list[Example] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            text = (row.get("text") or "").strip()
            code = (row.get("label") or "").strip()
            if not text:
                raise ValueError(f"{path}:{row_number}: empty text")
            if code not in TFNS_TO_LABEL:
                raise ValueError(f"{path}:{row_number}: unknown label {code!r}")
            examples.append(Example(text=text, label=index[TFNS_TO_LABEL[code]]))
    return examples
