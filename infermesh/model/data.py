"""Labelled text files for training and evaluation: CSV or JSON Lines, validated row by row.

Every problem names its file and row (the CSV line or the JSONL line), and a file with
problems is rejected whole, listing them, rather than trained on in part.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Our label order; the served model's logits follow it.
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

#: The default model's heads: sentiment is the primary one (the plain OIP outputs).
SENTIMENT_HEAD = "sentiment"
TOPIC_HEAD = "topic"

#: Twitter Financial News Topic's 20 labels, in the data set's code order (0..19).
TOPIC_LABELS: tuple[str, ...] = (
    "Analyst Update",
    "Fed | Central Banks",
    "Company | Product News",
    "Treasuries | Corporate Debt",
    "Dividend",
    "Earnings",
    "Energy | Oil",
    "Financials",
    "Currencies",
    "General News | Opinion",
    "Gold | Metals | Materials",
    "IPO",
    "Legal | Regulation",
    "M&A | Investments",
    "Macro",
    "Markets",
    "Politics",
    "Personnel Change",
    "Stock Commentary",
    "Stock Movement",
)

#: Twitter Financial News Sentiment codes: 0 bearish, 1 bullish, 2 neutral.
TFNS_TO_LABEL: dict[str, str] = {"0": "negative", "1": "positive", "2": "neutral"}

#: Problems listed before the rest are summarised as a count.
MAX_PROBLEMS_LISTED = 20

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class LabelledRow:
    """One row as read: where it came from, its text and its label before mapping."""

    row: int
    text: str
    label: str


class DatasetError(ValueError):
    """A labelled file that cannot be used, with every problem found (file:row: problem)."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        listed = self.problems[:MAX_PROBLEMS_LISTED]
        more = len(self.problems) - len(listed)
        lines = [f"{path}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}:"]
        lines += [f"  {problem}" for problem in listed]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


def _decoded(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(path, [f"cannot read the file: {error.strerror or error}"]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(
            path, [f"line {line}: not UTF-8 (byte 0x{data[error.start]:02x}); save the file as UTF-8"]
        ) from None


def read_labelled(path: Path, text_column: str = "text", label_column: str = "label") -> list[LabelledRow]:
    """Reads `path` (.csv with a header row, or .jsonl with one object per line); rejects
    it with every problem listed if any row lacks a text or a label."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise DatasetError(path, [f"unknown format {suffix or '(no suffix)'!r}: use .csv or .jsonl"])
    text = _decoded(path)
    reader = _read_csv if suffix in CSV_SUFFIXES else _read_jsonl
    rows, problems = reader(text, text_column, label_column)
    if not problems and not rows:
        problems.append("no rows")
    if problems:
        raise DatasetError(path, problems)
    return rows


def _read_csv(text: str, text_column: str, label_column: str) -> tuple[list[LabelledRow], list[str]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    missing = [column for column in (text_column, label_column) if column not in header]
    if missing:
        return [], [f"line 1: no column {', '.join(map(repr, missing))} in the header (columns: {', '.join(header)})"]
    rows: list[LabelledRow] = []
    problems: list[str] = []
    start = reader.line_num + 1
    try:
        for record in reader:
            row, start = start, reader.line_num + 1
            if None in record:
                problems.append(f"line {row}: more fields than the header has")
                continue
            _check(row, record.get(text_column), record.get(label_column), rows, problems)
    except csv.Error as error:
        problems.append(f"line {reader.line_num}: {error}")
    return rows, problems


def _read_jsonl(text: str, text_column: str, label_column: str) -> tuple[list[LabelledRow], list[str]]:
    rows: list[LabelledRow] = []
    problems: list[str] = []
    for row, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {row}: not JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {row}: expected an object with {text_column!r} and {label_column!r}")
            continue
        absent = [key for key in (text_column, label_column) if key not in record]
        if absent:
            keys = ", ".join(map(repr, absent))
            problems.append(f"line {row}: no {keys} (keys: {', '.join(record) or 'none'})")
            continue
        label = record.get(label_column)
        if isinstance(label, bool) or not isinstance(label, str | int | None):
            problems.append(f"line {row}: label must be a string or an integer, not {type(label).__name__}")
            continue
        value = record.get(text_column)
        if value is not None and not isinstance(value, str):
            problems.append(f"line {row}: text must be a string, not {type(value).__name__}")
            continue
        _check(row, value, None if label is None else str(label), rows, problems)
    return rows, problems


def _check(row: int, text: str | None, label: str | None, rows: list[LabelledRow], problems: list[str]) -> None:
    text = (text or "").strip()
    label = (label or "").strip()
    if not text:
        problems.append(f"line {row}: empty text")
    elif not label:
        problems.append(f"line {row}: empty label")
    else:
        rows.append(LabelledRow(row, text, label))


def parse_label_map(spec: str) -> dict[str, str]:
    """`0=negative,1=positive` as a mapping from the file's label values to label names."""
    mapping: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        raw, sep, name = pair.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise ValueError(f"label map entry {pair!r} is not VALUE=LABEL")
        mapping[raw.strip()] = name.strip()
    return mapping


def to_examples(
    path: Path, rows: Sequence[LabelledRow], labels: Sequence[str], label_map: Mapping[str, str] | None = None
) -> list[Example]:
    """Rows with label ids in `labels` order; rejects the file, naming each row, if a
    label (after `label_map`) is not one of `labels`."""
    index = {name: i for i, name in enumerate(labels)}
    examples: list[Example] = []
    problems: list[str] = []
    for row in rows:
        name = (label_map or {}).get(row.label, row.label)
        if name not in index:
            problems.append(f"line {row.row}: unknown label {row.label!r} (labels: {', '.join(labels)})")
        else:
            examples.append(Example(row.text, index[name]))
    if problems:
        raise DatasetError(path, problems)
    return examples


def read_tfns_csv(path: Path, labels: tuple[str, ...] = LABELS) -> list[Example]:
    """A `text,label` CSV in the TFNS coding (0 bearish, 1 bullish, 2 neutral)."""
    return to_examples(path, read_labelled(path), labels, TFNS_TO_LABEL)


def read_topic_csv(path: Path) -> list[Example]:
    """A `text,label` CSV in the Twitter Financial News Topic coding (0..19, TOPIC_LABELS)."""
    codes = {str(code): name for code, name in enumerate(TOPIC_LABELS)}
    return to_examples(path, read_labelled(path), TOPIC_LABELS, codes)
