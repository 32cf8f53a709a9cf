"""`infermesh add-head`: a new label set on an existing version's encoder.

The new task costs no second forward pass: the new head is one more block of columns in
the same output layer. Its weights start as a linear classifier fitted on the features
that layer already reads (the pooled encoder output for BERT-like models), from the
user's labelled files; its temperature is fitted on the validation file.

Head only (the default), the encoder stays exactly as it is, so the existing heads answer
exactly as before. With `EncoderTraining` (`--lora`), LoRA adapters on the encoder's
attention train with the new head, for tasks the frozen features do not separate well.
Adapting the encoder moves every head's answers, so the existing heads are kept close by
distillation ("learning without forgetting", Li and Hoiem, 2016): on the new task's texts,
each existing head's output is pulled towards what the base version answers. How close
they stayed is measured on the validation texts, and a version whose existing heads
agree with the base version's labels less than `min_agreement` is refused, with nothing
written. The adapters are merged into the encoder, so serving costs what head only costs.
"""

from __future__ import annotations

import dataclasses
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
from shared.model_repository import HEAD_NAME_PATTERN, Head, ModelConfig, ModelRepository

logger = logging.getLogger(__name__)

#: ONNX fp32 must reproduce transformers' probabilities this closely (as for imports).
EXPORT_TOLERANCE = 1e-3


class HeadRefused(ImportRefused):
    """A head that cannot be added, with the reason (nothing written)."""


@dataclass(frozen=True)
class HeadTraining:
    """How the new head's linear layer is fitted (full batch, L-BFGS)."""

    weight_decays: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    """Candidate L2 penalties on the weights (relative to the mean cross-entropy); the one
    with the best macro-F1 on `dev_fraction` of the training file held out is used. No one
    penalty suits every encoder and data size: on the default model's frozen sentiment
    encoder with 4,000 topic texts, 1e-3 gave 54.8% accuracy and 1e-5 68.1%."""
    dev_fraction: float = 0.1
    """Share of the training file held out to choose the penalty (and, with LoRA, the
    epoch); the validation file stays unseen until the version's figures."""
    max_iterations: int = 300
    seed: int = 13


@dataclass(frozen=True)
class EncoderTraining:
    """LoRA on the encoder while the new head trains (`add-head --lora`); the existing
    heads are distilled from the base version on the new task's texts."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ()
    """Module names to adapt; empty: the attention's query and value projections
    (`attention_projections`)."""
    distillation_weight: float = 1.0
    """Weight of the existing heads' distillation loss against the new head's cross-entropy."""
    distillation_temperature: float = 2.0
    warm_start_weight_decay: float = 1e-3
    """L2 penalty of the linear head LoRA starts from. The penalty chosen for the head alone
    is often tiny, and a head that nearly fits the training texts leaves the encoder no
    loss to learn from; this one is regularised enough to leave it some (Kumar et al.'s
    linear-probe-then-fine-tune, with an underfit probe). Epoch 0, the head-only
    candidate, is the head alone with its own penalty."""
    min_agreement: float = 0.95
    """Every existing head must keep the base version's label on at least this share of
    the validation texts (and of the held-out ones, for an epoch to be chosen)."""
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
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    classes: int,
    training: HeadTraining,
    weight_decay: float,
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
        loss = torch.nn.functional.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


def choose_weight_decay(
    fit: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    dev: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    classes: int,
    training: HeadTraining,
) -> tuple[float, dict[str, float]]:
    """The penalty of `training.weight_decays` whose head, fitted on `fit`, has the best
    macro-F1 on `dev` (the larger penalty on a tie), and each candidate's figure."""
    from infermesh.model.metrics import classification_report

    names = tuple(str(i) for i in range(classes))
    figures = {}
    for decay in sorted(training.weight_decays, reverse=True):
        weight, bias = fit_linear_head(*fit, classes, training, decay)
        predicted = (dev[0] @ weight.T + bias).argmax(-1)
        figures[f"{decay:g}"] = classification_report(predicted, dev[1], names)["macro_f1"]
    best = max(figures, key=lambda decay: figures[decay])  # the first, largest penalty, on a tie
    return float(best), figures


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


def model_logits(model: Any, ids: Sequence[Sequence[int]], batch_size: int = 64) -> npt.NDArray[np.float32]:
    """The model's logits for each text (padded right, as the services run it), in eval mode."""
    import torch

    from shared.padding import pad_right

    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            input_ids, attention_mask = pad_right(list(ids[start : start + batch_size]))
            output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
            chunks.append(output.logits.float().numpy())
    return np.concatenate(chunks)


def _agreements(kept: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{figures['label_agreement']:.1%} ({name})" for name, figures in kept.items())


def label_agreement(before: npt.NDArray[np.float32], after: npt.NDArray[np.float32], head: Head) -> float:
    """Share of texts on which `head` answers the same (the labels that hold, or an
    abstention, as the post-processor decides them) from two sets of logits (every head's
    columns), at its own temperature and thresholds."""
    from shared.calibration import calibrated, holding

    def answers(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        probabilities = calibrated(logits[:, head.start : head.stop], head)
        return holding(probabilities, head.activation, head.labels, head.thresholds)

    return float((answers(before) == answers(after)).all(axis=1).mean())


def kept_heads(
    reference: npt.NDArray[np.float32], logits: npt.NDArray[np.float32], heads: Sequence[Head]
) -> dict[str, dict[str, float]]:
    """How closely `logits` answer each of `heads` as `reference` (the base version) does,
    on the same texts: the share with the same answers (`label_agreement`), and the
    largest difference in a calibrated probability."""
    from shared.calibration import calibrated

    figures = {}
    for head in heads:
        columns = slice(head.start, head.stop)
        figures[head.name] = {
            "label_agreement": label_agreement(reference, logits, head),
            "max_probability_diff": float(
                np.abs(calibrated(reference[:, columns], head) - calibrated(logits[:, columns], head)).max()
            ),
        }
    return figures


def _distillation_loss(student: Any, teacher: Any, heads: Sequence[Head], temperature: float) -> Any:
    """Each existing head's output pulled towards the base version's, softened by
    `temperature` (Hinton et al.'s T^2 scaling keeps its gradients comparable)."""
    import torch
    from torch.nn import functional

    total = student.new_zeros(())
    for head in heads:
        columns = slice(head.start, head.stop)
        if head.activation == "sigmoid":
            # Summed over labels, as the KL below sums over classes: a head's pull does not
            # shrink with its number of labels.
            total = (
                total
                + functional.binary_cross_entropy_with_logits(
                    student[:, columns] / temperature,
                    torch.sigmoid(teacher[:, columns] / temperature),
                    reduction="none",
                )
                .sum(-1)
                .mean()
            )
        else:
            total = total + functional.kl_div(
                functional.log_softmax(student[:, columns] / temperature, dim=-1),
                functional.log_softmax(teacher[:, columns] / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
    return total * temperature**2


#: The attention's query and value projections (or its fused query-key-value one), by the
#: names the encoder families give them: BERT, RoBERTa, XLM-R, ELECTRA; DistilBERT;
#: DeBERTa-v2/v3; ModernBERT. peft's own defaults miss DistilBERT and ModernBERT.
ATTENTION_PROJECTIONS = ("query", "value", "q_lin", "v_lin", "query_proj", "value_proj", "Wqkv")


def attention_projections(model: Any) -> list[str]:
    """The names of `model`'s attention projections LoRA adapts by default; HeadRefused,
    naming the architecture, when it has none of the known ones."""
    import torch

    found = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
        }
    )
    if not found:
        raise HeadRefused(
            f"{type(model).__name__} has no attention projection LoRA knows by name"
            f" ({', '.join(ATTENTION_PROJECTIONS)}); add the head only (without --lora)"
        )
    return found


def adapt_encoder(
    model: Any,
    existing: Sequence[Head],
    columns: slice,
    train: tuple[Sequence[Sequence[int]], npt.NDArray[np.int64], npt.NDArray[np.float32]],
    dev: tuple[Sequence[Sequence[int]], npt.NDArray[np.int64], npt.NDArray[np.float32]],
    training: EncoderTraining,
    head_only: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains LoRA adapters on `model`'s encoder and the new head's rows of its (already
    widened) output layer; the existing heads' rows, the pooler and the rest stay frozen,
    and the existing heads are distilled from the base version's logits (`train[2]`,
    `dev[2]`). Keeps the epoch with the best macro-F1 of the new head on `dev` among those
    whose existing heads keep at least `min_agreement` of the base version's labels there,
    epoch 0 (the untrained adapters: head only, with `head_only`'s rows when given, else
    the rows training starts from) included. Returns the model with the adapters merged
    in, and each epoch's figures; raises HeadRefused when no epoch keeps the existing heads
    close enough."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from infermesh.model.metrics import classification_report
    from shared.padding import pad_right

    torch.manual_seed(training.seed)
    layer = output_layer(model)
    old_rows = columns.start
    lora = LoraConfig(
        r=training.lora_rank,
        lora_alpha=training.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(training.lora_targets) or attention_projections(model),
    )
    try:
        adapted = get_peft_model(model, lora)
    except ValueError as error:
        raise HeadRefused(f"LoRA cannot adapt {type(model).__name__}: {error}") from None
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    # Only the new head's rows learn: the existing heads' rows get no gradient, and with
    # none, AdamW leaves them exactly as they were (their decay is off, below).
    hooks = [
        parameter.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:old_rows]), grad[old_rows:]]))
        for parameter in (layer.weight, layer.bias)
    ]
    adapters = [p for n, p in adapted.named_parameters() if p.requires_grad and "lora_" in n]
    groups: list[dict[str, Any]] = [
        {"params": adapters},
        {"params": [layer.weight, layer.bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=training.learning_rate)
    train_ids, train_labels, train_teacher = train
    dev_ids, dev_labels, dev_teacher = dev
    steps_per_epoch = (len(train_ids) + training.batch_size - 1) // training.batch_size
    total_steps = steps_per_epoch * training.epochs
    scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
        optimizer, int(0.06 * total_steps), total_steps
    )
    rng = random.Random(training.seed)
    labels = tuple(str(i) for i in range(columns.stop - columns.start))
    best: tuple[float, int, dict[str, Any]] | None = None
    history: list[dict[str, float]] = []

    def judge(epoch: int, train_loss: float | None = None) -> None:
        nonlocal best
        dev_logits = model_logits(adapted, dev_ids)
        report = classification_report(dev_logits[:, columns].argmax(-1), dev_labels, labels)
        kept = kept_heads(dev_teacher, dev_logits, existing)
        agreement = min((figures["label_agreement"] for figures in kept.values()), default=1.0)
        history.append(
            {"epoch": epoch, "dev_macro_f1": report["macro_f1"], "dev_accuracy": report["accuracy"]}
            | ({} if train_loss is None else {"train_loss": train_loss})
            | {f"{name}_dev_agreement": figures["label_agreement"] for name, figures in kept.items()}
        )
        logger.info("epoch %d: %s", epoch, history[-1])
        if agreement >= training.min_agreement and (best is None or report["macro_f1"] > best[0]):
            state = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
            best = (report["macro_f1"], epoch, state)

    # Epoch 0 is the linear head on the unchanged encoder (LoRA starts as the identity): an
    # encoder that adapts must beat it on the held-out texts, or the head-only model ships.
    start_rows = (layer.weight[old_rows:].detach().clone(), layer.bias[old_rows:].detach().clone())
    with torch.no_grad():
        if head_only is not None:
            layer.weight[old_rows:] = torch.from_numpy(head_only[0])
            layer.bias[old_rows:] = torch.from_numpy(head_only[1])
        judge(0)
        layer.weight[old_rows:] = start_rows[0]
        layer.bias[old_rows:] = start_rows[1]
    for epoch in range(1, training.epochs + 1):
        # Dropout stays off: the head starts as a linear fit on the features without it, and
        # dropout's noise through those (often large) weights swamps the gradient. The
        # distillation, the low rank and the held-out choice of epoch regularise instead.
        adapted.eval()
        order = list(range(len(train_ids)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), training.batch_size):
            rows = order[start : start + training.batch_size]
            input_ids, attention_mask = pad_right([list(train_ids[i]) for i in rows])
            logits = adapted(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)
            ).logits
            loss = torch.nn.functional.cross_entropy(logits[:, columns], torch.from_numpy(train_labels[rows]))
            loss = loss + training.distillation_weight * _distillation_loss(
                logits, torch.from_numpy(train_teacher[rows]), existing, training.distillation_temperature
            )
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()) * len(rows))
        judge(epoch, sum(losses) / len(train_ids))
    if best is None:
        worst = ", ".join(
            f"epoch {row['epoch']:.0f}: "
            + ", ".join(
                f"{key.removesuffix('_dev_agreement')} {value:.1%}"
                for key, value in row.items()
                if key.endswith("_agreement")
            )
            for row in history
        )
        raise HeadRefused(
            f"with LoRA, the existing heads kept the base version's labels on less than {training.min_agreement:.0%}"
            f" of the held-out texts in every epoch ({worst}); add the head only (without --lora), or lower"
            " --min-agreement"
        )
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if name in best[2]:
                parameter.copy_(best[2][name])
    for hook in hooks:
        hook.remove()
    history.append({"chosen_epoch": best[1]})
    return adapted.merge_and_unload(), history


def add_head(
    spec: DataSpec,
    repository: Path,
    name: str,
    head: str,
    base_version: str = "",
    version: str = "",
    training: HeadTraining | None = None,
    encoder: EncoderTraining | None = None,
) -> Path:
    """Writes `repository/name/version` (the next free one by default): `base_version` (the
    serving one by default) with a head named `head` for `spec`'s labels; with `encoder`,
    LoRA adapts the encoder too (module docstring). Returns the version folder; raises
    HeadRefused, DatasetError or FileExistsError with nothing written."""
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

    from infermesh.model.train import split_dev

    fit_examples, dev_examples = split_dev(dataset.train, training.dev_fraction, training.seed)
    if not dev_examples:
        raise HeadRefused(f"{spec.train} has too few rows to hold any out: a label needs 2 or more training rows")
    fit_ids, dev_ids, valid_ids = ids(fit_examples), ids(dev_examples), ids(dataset.valid)
    fit_labels = np.array([e.label for e in fit_examples])
    dev_labels = np.array([e.label for e in dev_examples])
    valid_labels = np.array([e.label for e in dataset.valid])
    base_valid = model_logits(model, valid_ids)  # the base version's answers, for kept_heads
    logger.info("features of %d training texts", len(dataset.train))
    fit_features, dev_features = head_features(model, fit_ids), head_features(model, dev_ids)
    classes = len(dataset.labels)
    weight_decay, decay_figures = choose_weight_decay(
        (fit_features, fit_labels), (dev_features, dev_labels), classes, training
    )
    columns = slice(base.num_logits, base.num_logits + classes)
    history: list[dict[str, float]] = []

    def head_alone() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The chosen penalty, fitted again on the whole training file."""
        features = np.concatenate([fit_features, dev_features])
        labels = np.concatenate([fit_labels, dev_labels])
        return fit_linear_head(features, labels, classes, training, weight_decay)

    if encoder is None:
        widen_output_layer(model, *head_alone())
        trained_on = len(dataset.train)
    else:
        fit_teacher, dev_teacher = model_logits(model, fit_ids), model_logits(model, dev_ids)
        head_only = fit_linear_head(fit_features, fit_labels, classes, training, weight_decay)
        start = fit_linear_head(fit_features, fit_labels, classes, training, encoder.warm_start_weight_decay)
        widen_output_layer(model, *start)
        model, history = adapt_encoder(
            model,
            base.heads,
            columns,
            (fit_ids, fit_labels, fit_teacher),
            (dev_ids, dev_labels, dev_teacher),
            encoder,
            head_only,
        )
        trained_on = len(fit_examples)
        if history[-1]["chosen_epoch"] == 0:
            # LoRA lost to the head alone, so the head alone ships, as head only makes it.
            import torch

            weight, bias = head_alone()
            layer = output_layer(model)
            with torch.no_grad():
                layer.weight[columns] = torch.from_numpy(weight)
                layer.bias[columns] = torch.from_numpy(bias)
            trained_on = len(dataset.train)

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
        kept = kept_heads(base_valid, fp32, base.heads)
        if encoder is not None and min(each["label_agreement"] for each in kept.values()) < encoder.min_agreement:
            raise HeadRefused(
                f"with LoRA, the existing heads keep the base version's labels on {_agreements(kept)} of the"
                f" validation texts, under {encoder.min_agreement:.0%}; add the head only (without --lora), or"
                " lower --min-agreement"
            )
        temperature = fit_temperature(fp32[:, columns], valid_labels)
        # int8 stays the default only where every head keeps fp32's labels.
        agreements = {each.name: label_agreement(fp32, int8, each) for each in base.heads}
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
            "train_examples": trained_on,
            "dev_examples": len(dev_examples),
            "weight_decay": weight_decay,
            "weight_decay_dev_macro_f1": decay_figures,
            # LoRA that did not beat the head alone on the held-out texts left the encoder as it was.
            "encoder": "lora" if history and history[-1]["chosen_epoch"] > 0 else "frozen",
            "kept_heads": kept,
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
        if encoder is not None:
            metrics["encoder_training"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(encoder).items()
            }
            metrics["history"] = history
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_head_card(base, metrics))
        # What serves now keeps serving until this version is rolled out.
        pin_serving(models, name, models.serving_version(name))
    return repository / name / version
