"""`infermesh add-head`: a new label set on an existing version's encoder, head only.

The encoder stays exactly as it is, so the version's existing heads answer exactly as
before and the new task costs no second forward pass: the new head is one more block of
columns in the same output layer. Its weights are a linear classifier fitted on the
features that layer already reads (the pooled encoder output for BERT-like models), from
the user's labelled files; its temperature is fitted on the validation file.

To change the encoder for a new task as well (LoRA), train the heads together instead
(`infermesh train` with several label sets, as `make train` does for the default model):
adapting the encoder moves every head's answers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from infermesh.model.data import Example
from infermesh.model.finetune import CARD_FILE, METRICS_FILE, DataSpec, load_dataset, next_version
from infermesh.model.importer import INT8_AGREEMENT_NEEDED, TOKENIZER_FILES, ImportRefused
from shared.model_repository import HEAD_NAME_PATTERN, ModelConfig, ModelRepository

logger = logging.getLogger(__name__)

#: ONNX fp32 must reproduce transformers' probabilities this closely (as for imports).
EXPORT_TOLERANCE = 1e-3


class HeadRefused(ImportRefused):
    """A head that cannot be added, with the reason (nothing written)."""


@dataclass(frozen=True)
class HeadTraining:
    """How the new head's linear layer is fitted (full batch, L-BFGS)."""

    weight_decay: float = 1e-3
    """L2 penalty on the weights, relative to the mean cross-entropy."""
    max_iterations: int = 300
    seed: int = 13


def output_layer(model: Any) -> Any:
    """The linear layer that writes the logits: `classifier` (BERT, DistilBERT, DeBERTa,
    ModernBERT) or `classifier.out_proj` (RoBERTa, XLM-R, ELECTRA)."""
    import torch

    classifier = getattr(model, "classifier", None)
    for candidate in (classifier, getattr(classifier, "out_proj", None)):
        if isinstance(candidate, torch.nn.Linear):
            return candidate
    raise HeadRefused(f"{type(model).__name__} has no linear output layer to add columns to")


def head_features(model: Any, ids: Sequence[Sequence[int]], batch_size: int = 64) -> npt.NDArray[np.float32]:
    """What the output layer reads for each text (padded right, as the services run it)."""
    import torch

    from shared.padding import pad_right

    layer = output_layer(model)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                input_ids, attention_mask = pad_right(list(ids[start : start + batch_size]))
                model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    finally:
        hook.remove()
    return torch.cat(captured).float().numpy()


def fit_linear_head(
    features: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], classes: int, training: HeadTraining
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Multinomial logistic regression on `features`: (weight [classes, dim], bias [classes])."""
    import torch

    torch.manual_seed(training.seed)
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=training.max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + training.weight_decay * layer.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


def widen_output_layer(model: Any, weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]) -> None:
    """Appends the new head's rows to the output layer, in place; the existing rows (every
    existing head's columns) are untouched."""
    import torch

    layer = output_layer(model)
    wider = torch.nn.Linear(layer.in_features, layer.out_features + len(weight))
    with torch.no_grad():
        wider.weight.copy_(torch.cat([layer.weight, torch.from_numpy(weight)]))
        wider.bias.copy_(torch.cat([layer.bias, torch.from_numpy(bias)]))
    parent = model.classifier if layer is not model.classifier else model
    attribute = "out_proj" if layer is not model.classifier else "classifier"
    setattr(parent, attribute, wider)
    columns = len(wider.weight)
    names = [model.config.id2label[i] for i in range(layer.out_features)]
    model.config.num_labels = columns
    model.config.id2label = dict(enumerate(names + [f"column {i}" for i in range(len(names), columns)]))
    model.config.label2id = {f"{i}:{label}": i for i, label in model.config.id2label.items()}


def add_head(
    spec: DataSpec,
    repository: Path,
    name: str,
    head: str,
    base_version: str = "",
    version: str = "",
    training: HeadTraining | None = None,
) -> Path:
    """Writes `repository/name/version` (the next free one by default): `base_version` (the
    serving one by default) with a head named `head` for `spec`'s labels. Returns the
    version folder; raises HeadRefused, DatasetError or FileExistsError with nothing written."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from infermesh.model.build import export_onnx, quantize_int8, serving_config, staged_version
    from infermesh.model.card import render_head_card
    from infermesh.model.metrics import classification_report
    from infermesh.model.rollout import pin_serving
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend
    from services.tokenizer.core import Overflow, Tokenizer, TokenizerLimits
    from shared.calibration import expected_calibration_error, fit_temperature, softmax
    from shared.padding import pad_right

    training = training or HeadTraining()
    if not re.fullmatch(HEAD_NAME_PATTERN, head):
        raise HeadRefused(f"head name {head!r} must be lower case letters, digits and _ (it names OIP outputs)")
    models = ModelRepository(repository)
    base_version = base_version or models.serving_version(name)
    base = models.config(name, base_version)
    if head in (existing.name for existing in base.heads):
        raise HeadRefused(f"{name} version {base.version} already has a head {head!r}")
    base_folder = models.path(name, base.version)
    if not (base_folder / "hf" / "config.json").is_file():
        raise HeadRefused(f"{base_folder} has no hf/ folder (the merged transformers model) to add a head to")
    dataset = load_dataset(spec)
    version = version or next_version(repository, name)

    model = AutoModelForSequenceClassification.from_pretrained(base_folder / "hf").eval()
    tokenizer = Tokenizer(
        base_folder / base.tokenizer,
        name,
        TokenizerLimits(base.max_sequence_length, 0, max(len(dataset.train), len(dataset.valid)), 1 << 30),
    )

    def ids(examples: Sequence[Example]) -> list[list[int]]:
        tokenized = tokenizer.tokenize([e.text for e in examples], overflow=Overflow.TRUNCATE)
        return [list(t.chunks[0].input_ids) for t in tokenized]

    train_ids, valid_ids = ids(dataset.train), ids(dataset.valid)
    train_labels = np.array([e.label for e in dataset.train])
    valid_labels = np.array([e.label for e in dataset.valid])
    logger.info("features of %d training texts", len(train_ids))
    weight, bias = fit_linear_head(head_features(model, train_ids), train_labels, len(dataset.labels), training)
    widen_output_layer(model, weight, bias)
    columns = slice(base.num_logits, base.num_logits + len(dataset.labels))

    def onnx_logits(path: Path) -> npt.NDArray[np.float32]:
        backend = OnnxRuntimeBackend(path)
        try:
            return np.concatenate(
                [backend.run(*pad_right(valid_ids[i : i + 64])) for i in range(0, len(valid_ids), 64)]
            )
        finally:
            backend.close()

    with staged_version(repository, name, version) as staging:
        model.save_pretrained(staging / "hf")
        for file in TOKENIZER_FILES:
            if (base_folder / "hf" / file).is_file():
                shutil.copy(base_folder / "hf" / file, staging / "hf" / file)
        shutil.copy(base_folder / base.tokenizer, staging / "tokenizer.json")
        export_onnx(model, staging / "model.fp32.onnx")
        quantize_int8(staging / "model.fp32.onnx", staging / "model.int8.onnx", model.config)
        fp32, int8 = onnx_logits(staging / "model.fp32.onnx"), onnx_logits(staging / "model.int8.onnx")
        sample = pad_right(valid_ids[:64])
        with torch.no_grad():
            reference = model(
                input_ids=torch.from_numpy(sample[0]), attention_mask=torch.from_numpy(sample[1])
            ).logits.numpy()
        export_gap = float(np.abs(softmax(fp32[: len(reference), columns]) - softmax(reference[:, columns])).max())
        if export_gap > EXPORT_TOLERANCE:
            raise HeadRefused(f"the widened graph disagrees with transformers by {export_gap:.2g} in probability")
        temperature = fit_temperature(fp32[:, columns], valid_labels)
        # int8 stays the default only where every head keeps fp32's labels.
        agreements = {
            each.name: float(
                (fp32[:, each.start : each.stop].argmax(-1) == int8[:, each.start : each.stop].argmax(-1)).mean()
            )
            for each in base.heads
        }
        agreements[head] = float((fp32[:, columns].argmax(-1) == int8[:, columns].argmax(-1)).mean())
        default_variant = "int8" if min(agreements.values()) >= INT8_AGREEMENT_NEEDED else "fp32"
        extra_heads = [extra.model_dump() for extra in base.extra_heads]
        extra_heads.append({"name": head, "labels": list(dataset.labels), "temperature": temperature})
        config = serving_config(
            staging,
            name,
            version,
            base.labels,
            max_sequence_length=base.max_sequence_length,
            vocab_size=base.vocab_size,
            temperature=base.temperature,
            default_variant=default_variant,
            base_model=base.base_model,
            activation=base.activation,
            thresholds=base.thresholds,
            languages=base.languages,
            pad_token_id=base.pad_token_id,
            scores=base.scores,
            head=base.head,
            extra_heads=extra_heads,
        )
        ModelConfig.model_validate(config)  # what every service will read must load
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        variants: dict[str, Any] = {}
        for variant, logits in (("fp32", fp32), ("int8", int8)):
            scored = logits[:, columns]
            report = classification_report(scored.argmax(-1), valid_labels, dataset.labels)
            report["ece_uncalibrated"] = expected_calibration_error(softmax(scored), valid_labels)
            report["ece_calibrated"] = expected_calibration_error(softmax(scored, temperature), valid_labels)
            variants[variant] = report
        metrics = {
            "model": name,
            "version": version,
            "head": head,
            "base_version": base.version,
            "data": spec.valid.name,
            "examples": len(dataset.valid),
            "train_examples": len(dataset.train),
            "temperature": temperature,
            "default_variant": default_variant,
            "variants": variants,
            "int8_fp32_label_agreement": agreements[head],
            "int8_fp32_label_agreement_per_head": agreements,
            "int8_fp32_max_probability_diff": float(
                np.abs(softmax(fp32[:, columns], temperature) - softmax(int8[:, columns], temperature)).max()
            ),
            "onnx_torch_max_probability_diff": export_gap,
        }
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_head_card(base, metrics))
        # What serves now keeps serving until this version is rolled out.
        pin_serving(models, name, models.serving_version(name))
    return repository / name / version
