"""`infermesh import`: a local transformers checkpoint for sequence classification in,
a complete model version out, like the ones `build-model` and `finetune` write.

    <repository>/<name>/<version>/
      config.json          labels, activation, thresholds, temperature, max length, languages
      model.fp32.onnx      the checkpoint exported with torch.onnx (opset 17)
      model.int8.onnx      dynamic 7-bit int8 (BERT fusion where ONNX Runtime has it)
      tokenizer.json       the checkpoint's fast tokenizer
      hf/                  the checkpoint in transformers format (the explainer's weights)
      metrics.json         the int8 check and, with labelled data, the figures
      model-card.md

Everything is checked before anything is written, and the version is assembled in a
hidden folder renamed into place whole (`build.staged_version`), so a refused import
leaves the repository as it was.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from infermesh.model.data import DatasetError, _decoded

logger = logging.getLogger(__name__)

#: ~50 finance sentences the int8 graph must label as fp32 does when no --data is given.
CHECK_SENTENCES = Path(__file__).with_name("check_sentences.txt")
#: Longest chunk served, whatever the checkpoint allows: attention cost grows with its square.
MAX_SERVING_LENGTH = 512
#: int8 is the default variant only if it decides as fp32 does on this share of the texts.
INT8_AGREEMENT_NEEDED = 0.99
#: Largest |ONNX fp32 - torch| calibrated probability accepted from the export.
EXPORT_TOLERANCE = 1e-3
#: Texts the exported graph is compared with torch on.
EXPORT_CHECK_TEXTS = 64
#: Multi-label data: one cell holds every label of a text, separated by this.
LABEL_SEPARATOR = "|"
#: A multi-label threshold for labels without labelled data.
DEFAULT_THRESHOLD = 0.5
#: Tokenizer files copied into hf/ next to the weights, where present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spm.model",
)
#: Model types whose position ids start after the padding id (RoBERTa's
#: `create_position_ids_from_input_ids`): max_position_embeddings - pad - 1 usable.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


class ImportRefused(ValueError):
    """A checkpoint that cannot become a model version; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder says about itself, checked, before its weights are read."""

    folder: Path
    config: Any
    """The transformers config."""
    architecture: str
    labels: list[str]
    activation: Literal["softmax", "sigmoid"]
    max_sequence_length: int
    generic_labels: bool
    """id2label holds transformers' placeholders (LABEL_0, LABEL_1, ...)."""


@dataclass(frozen=True)
class CheckData:
    """The texts int8 is checked on and, where labelled, temperature and thresholds fitted on."""

    source: str
    texts: list[str]
    targets: npt.NDArray[np.int64] | None
    """Single-label: [n] label ids. Multi-label: [n, labels] of 0/1. None: unlabelled."""


def inspect_checkpoint(folder: Path) -> Checkpoint:
    """Checks the folder, its config.json, head, labels and fast tokenizer; raises
    ImportRefused naming the first problem."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoConfig

    if not folder.is_dir():
        raise ImportRefused(f"{folder} is not a folder; give a transformers checkpoint folder (save_pretrained)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ImportRefused(f"{folder} has no config.json; it is not a transformers checkpoint")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise ImportRefused(f"{config_file} cannot be read as a transformers config: {_first_line(error)}") from None
    architectures = list(raw.get("architectures") or [])
    heads = [name for name in architectures if name.endswith("ForSequenceClassification")]
    if not heads:
        raise ImportRefused(
            f"{folder} has no sequence-classification head (architectures: {', '.join(architectures) or 'none'});"
            " save a *ForSequenceClassification model"
        )
    id2label = raw.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ImportRefused(f"{config_file} has no id2label: name the labels of the head's outputs")
    try:
        labels_by_id = {int(key): str(value) for key, value in id2label.items()}
    except ValueError:
        raise ImportRefused(f"{config_file}: id2label keys must be output indices 0..n-1") from None
    if sorted(labels_by_id) != list(range(len(labels_by_id))):
        raise ImportRefused(f"{config_file}: id2label must name outputs 0..{len(labels_by_id) - 1}, each once")
    labels = [labels_by_id[index] for index in range(len(labels_by_id))]
    declared = raw.get("num_labels")
    if declared is not None and declared != len(labels):
        raise ImportRefused(f"{config_file}: num_labels is {declared} but id2label names {len(labels)} labels")
    if len(set(labels)) != len(labels):
        raise ImportRefused(f"{config_file}: id2label repeats a label name ({', '.join(labels)})")
    problem_type = raw.get("problem_type")
    if problem_type == "regression":
        raise ImportRefused(f"{folder} is a regression model (problem_type regression); import classifiers only")
    activation: Literal["softmax", "sigmoid"] = "sigmoid" if problem_type == "multi_label_classification" else "softmax"
    if activation == "softmax" and len(labels) < 2:
        raise ImportRefused(f"{config_file}: a single-label classifier needs at least two labels in id2label")

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ImportRefused(
            f"{folder} has no tokenizer.json: infermesh needs a fast tokenizer (load the tokenizer with"
            " AutoTokenizer.from_pretrained(..., use_fast=True) and save_pretrained it into the folder)"
        )
    try:
        tokenizer = RustTokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the Rust library raises plain Exception on a bad file
        raise ImportRefused(f"{tokenizer_file} cannot be read by the tokenizers library: {error}") from None
    special = tokenizer.encode("a").special_tokens_mask
    if sum(special) != 2 or not (special[0] and special[-1]):
        raise ImportRefused(
            f"{tokenizer_file} adds {sum(special)} special tokens around a text; infermesh's chunking expects"
            " exactly two (a start and an end token, as [CLS] ... [SEP] or <s> ... </s>)"
        )
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokens > config.vocab_size:
        raise ImportRefused(
            f"{tokenizer_file} has {tokens} tokens but the model's embeddings hold {config.vocab_size}:"
            " the tokenizer belongs to another model"
        )
    return Checkpoint(
        folder=folder,
        config=config,
        architecture=heads[0],
        labels=labels,
        activation=activation,
        max_sequence_length=serving_length(config, folder),
        generic_labels=all(label == f"LABEL_{index}" for index, label in enumerate(labels)),
    )


def serving_length(config: Any, folder: Path) -> int:
    """Tokens per chunk: the least of the positions the model has, the tokenizer's
    model_max_length (where it states a real one) and MAX_SERVING_LENGTH."""
    limits = [MAX_SERVING_LENGTH]
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if config.model_type in _OFFSET_POSITIONS:
            positions -= (config.pad_token_id or 0) + 1
        limits.append(positions)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        stated = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("model_max_length")
        # transformers writes a huge sentinel (1e30) when no length is known.
        if isinstance(stated, int) and 2 < stated < 1_000_000:
            limits.append(stated)
    return min(limits)


def read_check_data(path: Path | None, labels: Sequence[str], multi_label: bool) -> CheckData:
    """`path`: a CSV with a header and a `text` column, optionally `label` (a label name
    or output index; multi-label: names joined by `|`, empty for none). None: the bundled
    check sentences, unlabelled."""
    if path is None:
        bundled = [line.strip() for line in CHECK_SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
        return CheckData("bundled check sentences", bundled, None)
    reader = csv.DictReader(io.StringIO(_decoded(path)))
    header = reader.fieldnames or []
    if "text" not in header:
        raise DatasetError(path, [f"no 'text' column in the header ({', '.join(header) or 'empty'})"])
    labelled = "label" in header
    index = {name: i for i, name in enumerate(labels)} | {str(i): i for i in range(len(labels))}
    texts: list[str] = []
    targets: list[Any] = []
    problems: list[str] = []
    for row, record in enumerate(reader, start=2):
        text = (record.get("text") or "").strip()
        if not text:
            problems.append(f"line {row}: empty text")
            continue
        texts.append(text)
        if not labelled:
            continue
        cell = (record.get("label") or "").strip()
        names = [name.strip() for name in cell.split(LABEL_SEPARATOR) if name.strip()] if multi_label else [cell]
        unknown = [name for name in names if name not in index]
        if unknown or (not multi_label and not cell):
            problems.append(f"line {row}: unknown label {cell!r} (labels: {', '.join(labels)})")
            continue
        if multi_label:
            row_targets = np.zeros(len(labels), dtype=np.int64)
            row_targets[[index[name] for name in names]] = 1
            targets.append(row_targets)
        else:
            targets.append(index[names[0]])
    if problems:
        raise DatasetError(path, problems)
    if not texts:
        raise DatasetError(path, ["no rows"])
    return CheckData(path.name, texts, np.array(targets, dtype=np.int64) if labelled else None)


def load_classifier(checkpoint: Checkpoint) -> Any:
    """The checkpoint's model in eval mode; refuses one whose head weights are missing or
    whose head size differs from its labels."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint.folder, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as error:
        raise ImportRefused(
            f"{checkpoint.folder}: the weights do not load as {checkpoint.architecture} with"
            f" {len(checkpoint.labels)} labels (missing labels?): {_first_line(error)}"
        ) from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ImportRefused(
            f"{checkpoint.folder}: weights missing for {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; the checkpoint has no trained classification head"
        )
    model.eval()
    with torch.no_grad():
        outputs = model(input_ids=torch.tensor([[checkpoint.config.pad_token_id or 0] * 3])).logits.shape[-1]
    if outputs != len(checkpoint.labels):
        raise ImportRefused(
            f"{checkpoint.folder}: the head has {outputs} outputs but id2label names {len(checkpoint.labels)} labels"
        )
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decisions(probabilities: npt.NDArray[np.float64], thresholds: npt.NDArray[np.float64] | None) -> Any:
    """Per text, what the post-processor would answer: the top label id (softmax, no
    thresholds) or the 0/1 row of labels at or above their thresholds (sigmoid)."""
    if thresholds is None:
        return probabilities.argmax(axis=-1)
    return (probabilities >= thresholds).astype(np.int64)


def fit_thresholds(probabilities: npt.NDArray[np.float64], targets: npt.NDArray[np.int64]) -> list[float]:
    """Per label, the threshold (0.05..0.95 by 0.05) with the best F1 on labelled data;
    ties go to the one nearest 0.5. A label no text carries keeps 0.5."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    chosen = []
    for label in range(targets.shape[1]):
        truth = targets[:, label] == 1
        if not truth.any():
            chosen.append(DEFAULT_THRESHOLD)
            continue
        scores = []
        for threshold in grid:
            predicted = probabilities[:, label] >= threshold
            true_positive = int((predicted & truth).sum())
            denominator = int(predicted.sum()) + int(truth.sum())
            scores.append((2 * true_positive / denominator if denominator else 0.0, -abs(threshold - 0.5)))
        chosen.append(float(grid[max(range(len(grid)), key=lambda i: scores[i])]))
    return chosen


def import_checkpoint(
    source: Path,
    repository: Path,
    name: str,
    version: str = "",
    data: Path | None = None,
    languages: Sequence[str] = ("en",),
) -> Path:
    """Imports `source` as `repository/name/version` (the next free version by default);
    returns the version folder. Raises ImportRefused (or DatasetError for a bad --data
    file, FileExistsError for a taken version) with nothing written."""
    import torch
    import transformers

    from infermesh.model.build import export_onnx, quantize_int8, serving_config, staged_version
    from infermesh.model.card import render_import_card
    from infermesh.model.finetune import CARD_FILE, METRICS_FILE, next_version
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend
    from services.tokenizer.core import Overflow, Tokenizer, TokenizerLimits
    from shared.calibration import fit_sigmoid_temperature, fit_temperature, sigmoid, softmax
    from shared.classification import sentiment_scores
    from shared.model_repository import ModelConfig
    from shared.padding import pad_right

    if not name or "/" in name or name.startswith("."):
        raise ImportRefused(f"model name {name!r} must be a plain folder name")
    if version and not (version.isdigit() and int(version) > 0):
        raise ImportRefused(f"version {version!r} must be a positive integer")
    if not languages:
        raise ImportRefused("give at least one language (--languages en,de)")
    checkpoint = inspect_checkpoint(source)
    multi_label = checkpoint.activation == "sigmoid"
    check = read_check_data(data, checkpoint.labels, multi_label)
    model = load_classifier(checkpoint)
    tokenizer = Tokenizer(
        source / "tokenizer.json",
        name,
        TokenizerLimits(checkpoint.max_sequence_length, 0, len(check.texts), 1 << 20),
    )
    # Tokenized and truncated as the services do, so the check scores what would serve.
    tokenized = tokenizer.tokenize(check.texts, overflow=Overflow.TRUNCATE)
    ids = [t.chunks[0].input_ids for t in tokenized]
    activate = sigmoid if multi_label else softmax

    def onnx_logits(path: Path) -> npt.NDArray[np.float32]:
        backend = OnnxRuntimeBackend(path)
        try:
            return np.concatenate([backend.run(*pad_right(ids[i : i + 32])) for i in range(0, len(ids), 32)])
        finally:
            backend.close()

    version = version or next_version(repository, name)
    with staged_version(repository, name, version) as staging:
        model.save_pretrained(staging / "hf")
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copy(source / file, staging / "hf" / file)
        shutil.copy(source / "tokenizer.json", staging / "tokenizer.json")
        logger.info("exporting %s to ONNX fp32", checkpoint.architecture)
        try:
            # The tracer's warnings (Python branches on shapes, index ops) are what the
            # numerical check below settles for this graph; users need not read them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(model, staging / "model.fp32.onnx")
        except Exception as error:  # torch.onnx raises many types; all mean "does not export"
            raise ImportRefused(
                f"{checkpoint.architecture} does not export to ONNX here (torch.onnx.export, opset 17,"
                f" transformers {transformers.__version__}): {_first_line(error)}"
            ) from None
        fp32 = onnx_logits(staging / "model.fp32.onnx")
        sample = pad_right(ids[:EXPORT_CHECK_TEXTS])
        with torch.no_grad():
            reference = model(
                input_ids=torch.from_numpy(sample[0]), attention_mask=torch.from_numpy(sample[1])
            ).logits.numpy()
        export_gap = float(np.abs(activate(fp32[: len(reference)]) - activate(reference)).max())
        if export_gap > EXPORT_TOLERANCE:
            raise ImportRefused(
                f"{checkpoint.architecture}'s ONNX graph disagrees with transformers by {export_gap:.2g} in"
                f" probability (more than {EXPORT_TOLERANCE}); it does not export faithfully here"
            )
        logger.info("quantising to int8")
        quantize_int8(staging / "model.fp32.onnx", staging / "model.int8.onnx", checkpoint.config)
        int8 = onnx_logits(staging / "model.int8.onnx")

        temperature = 1.0
        if check.targets is not None:
            if multi_label:
                temperature = fit_sigmoid_temperature(fp32, check.targets)
            else:
                temperature = fit_temperature(fp32, check.targets)
        calibrated_fp32, calibrated_int8 = activate(fp32, temperature), activate(int8, temperature)
        thresholds: dict[str, float] = {}
        limits = None
        if multi_label:
            fitted = (
                fit_thresholds(calibrated_fp32, check.targets)
                if check.targets is not None
                else [DEFAULT_THRESHOLD] * len(checkpoint.labels)
            )
            thresholds = dict(zip(checkpoint.labels, fitted, strict=True))
            limits = np.array(fitted)
        same = decisions(calibrated_fp32, limits) == decisions(calibrated_int8, limits)
        agreement = float((same.all(axis=1) if multi_label else same).mean())
        default_variant = "int8" if agreement >= INT8_AGREEMENT_NEEDED else "fp32"

        config = serving_config(
            staging,
            name,
            version,
            checkpoint.labels,
            max_sequence_length=checkpoint.max_sequence_length,
            vocab_size=checkpoint.config.vocab_size,
            temperature=temperature,
            default_variant=default_variant,
            base_model=f"{checkpoint.architecture} imported from {source.name}",
            activation=checkpoint.activation,
            thresholds=thresholds,
            languages=list(languages),
            pad_token_id=checkpoint.config.pad_token_id or 0,
            scores=sentiment_scores(checkpoint.labels),
        )
        ModelConfig.model_validate(config)  # what every service will read must load
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        metrics: dict[str, Any] = {
            "model": name,
            "version": version,
            "architecture": checkpoint.architecture,
            "model_type": checkpoint.config.model_type,
            "activation": checkpoint.activation,
            "data": check.source,
            "examples": len(check.texts),
            "labelled": check.targets is not None,
            "truncated": sum(t.truncated for t in tokenized),
            "temperature": temperature,
            "thresholds": thresholds,
            "default_variant": default_variant,
            "int8_fp32_label_agreement": agreement,
            "int8_agreement_needed": INT8_AGREEMENT_NEEDED,
            "int8_fp32_max_probability_diff": float(np.abs(calibrated_fp32 - calibrated_int8).max()),
            "onnx_torch_max_probability_diff": export_gap,
            "variants": {},
        }
        if check.targets is not None:
            from infermesh.model.metrics import classification_report, multi_label_report
            from shared.calibration import expected_calibration_error

            for variant, logits, probabilities in (
                ("fp32", fp32, calibrated_fp32),
                ("int8", int8, calibrated_int8),
            ):
                if multi_label:
                    report = multi_label_report(decisions(probabilities, limits), check.targets, checkpoint.labels)
                else:
                    report = classification_report(probabilities.argmax(-1), check.targets, tuple(checkpoint.labels))
                    report["ece_uncalibrated"] = expected_calibration_error(softmax(logits), check.targets)
                    report["ece_calibrated"] = expected_calibration_error(probabilities, check.targets)
                metrics["variants"][variant] = report
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_import_card(config, metrics, generic_labels=checkpoint.generic_labels))
    return repository / name / version
