"""LoRA fine-tuning of the packaged MiniLM encoder into a finance sentiment classifier.

Only low-rank adapters on the attention projections, the pooler and the classification
head train; the 22.7M encoder weights stay frozen. The output is a few hundred kB of
adapter weights plus `training.json` (hyper-parameters, held-out temperature, figures),
small enough to commit. `build.py` turns them into serving artifacts.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from infermesh.model.data import LABELS, Example, read_tfns_csv
from infermesh.model.encoder import BASE_PACKAGE, base_encoder_path, base_package_version
from infermesh.model.metrics import classification_report
from shared.calibration import expected_calibration_error, fit_temperature, softmax

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults produced the committed weights."""

    seed: int = 13
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    max_length: int = 64
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "key", "value")
    trained_modules: tuple[str, ...] = ("classifier", "pooler")
    dev_fraction: float = 0.1
    """Share of the training file held out for early stopping and temperature fitting."""
    patience: int = 2
    labels: tuple[str, ...] = field(default=LABELS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_dev(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split of the training file into train and dev, stratified by label."""
    rng = np.random.default_rng(seed)
    train: list[Example] = []
    dev: list[Example] = []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        order = rng.permutation(len(group))
        cut = round(len(group) * fraction)
        dev.extend(group[i] for i in order[:cut])
        train.extend(group[i] for i in order[cut:])
    return train, dev


def build_lora_model(config: TrainConfig) -> Any:
    """The base encoder with a fresh head and LoRA adapters, ready to train."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        base_encoder_path(),
        num_labels=len(config.labels),
        id2label=dict(enumerate(config.labels)),
        label2id={name: i for i, name in enumerate(config.labels)},
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        modules_to_save=list(config.trained_modules),
    )
    return get_peft_model(base, lora)


def batches(examples: Sequence[Example], size: int, rng: random.Random | None) -> Iterator[list[Example]]:
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), size):
        yield [examples[i] for i in order[start : start + size]]


@torch.no_grad()
def predict_logits(model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int) -> np.ndarray:
    model.eval()
    chunks = []
    for batch in batches(examples, 128, rng=None):
        encoded = tokenizer(
            [e.text for e in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        chunks.append(model(**encoded).logits.float().numpy())
    return np.concatenate(chunks)


@dataclass
class Fitted:
    """What `fit` returns: the model at its best epoch and how it got there."""

    model: Any
    tokenizer: Any
    trainable_parameters: int
    total_parameters: int
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float


def fit(train_set: Sequence[Example], select_set: Sequence[Example], config: TrainConfig) -> Fitted:
    """Trains LoRA adapters and the head on `train_set`; keeps the epoch with the best
    macro-F1 on `select_set` and stops after `config.patience` epochs without a gain."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_encoder_path())
    model = build_lora_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = (len(train_set) + config.batch_size - 1) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
        optimizer, int(config.warmup_fraction * total_steps), total_steps
    )
    select_labels = np.array([e.label for e in select_set])
    rng = random.Random(config.seed)
    best_f1, best_state, best_epoch, stale = -1.0, None, 0, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        progress = tqdm(
            batches(train_set, config.batch_size, rng), total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}"
        )
        for batch in progress:
            encoded = tokenizer(
                [e.text for e in batch],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            )
            labels = torch.tensor([e.label for e in batch])
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        logits = predict_logits(model, tokenizer, select_set, config.max_length)
        report = classification_report(logits.argmax(-1), select_labels, config.labels)
        history.append({"epoch": epoch, "dev_accuracy": report["accuracy"], "dev_macro_f1": report["macro_f1"]})
        tqdm.write(f"epoch {epoch}: accuracy {report['accuracy']:.4f} macro-F1 {report['macro_f1']:.4f}")
        if report["macro_f1"] > best_f1:
            best_f1, best_epoch, stale = report["macro_f1"], epoch, 0
            best_state = {
                k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k
            }
        else:
            stale += 1
            if stale >= config.patience:
                tqdm.write(f"early stop: no improvement for {stale} epochs")
                break
    seconds = time.perf_counter() - started
    assert best_state is not None
    model.load_state_dict(best_state, strict=False)
    return Fitted(model, tokenizer, trainable, total, best_epoch, history, seconds)


def save_adapter(model: Any, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # peft records the absolute site-packages path of the base; name the package instead.
    adapter_config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text())
    adapter_config["base_model_name_or_path"] = BASE_PACKAGE
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def calibrate_and_report(
    fitted: Fitted, calibration_set: Sequence[Example], report_set: Sequence[Example], config: TrainConfig
) -> tuple[float, dict[str, Any]]:
    """The temperature fitted on `calibration_set`, and torch figures on `report_set`."""
    calibration_logits = predict_logits(fitted.model, fitted.tokenizer, calibration_set, config.max_length)
    temperature = fit_temperature(calibration_logits, np.array([e.label for e in calibration_set]))
    logits = predict_logits(fitted.model, fitted.tokenizer, report_set, config.max_length)
    expected = np.array([e.label for e in report_set])
    report = classification_report(logits.argmax(-1), expected, config.labels)
    report["ece_uncalibrated"] = expected_calibration_error(softmax(logits), expected)
    report["ece_calibrated"] = expected_calibration_error(softmax(logits, temperature), expected)
    return temperature, report


def training_summary(
    fitted: Fitted, config: TrainConfig, temperature: float, report: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """`training.json`: what `build_model_repository` and the model cards read."""
    return {
        "base_package": f"{BASE_PACKAGE}=={base_package_version()}",
        "labels": list(config.labels),
        "max_length": config.max_length,
        "temperature": temperature,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "trainable_parameters": fitted.trainable_parameters,
        "total_parameters": fitted.total_parameters,
        "training_seconds": round(fitted.seconds, 1),
        "best_epoch": fitted.best_epoch,
        "history": fitted.history,
        **extra,
        "validation_torch": report,
    }


def train(train_csv: Path, valid_csv: Path, out_dir: Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """The default model: early stopping and temperature on a dev split held out from the
    training file, so the validation file stays unseen for the model card's figures."""
    config = config or TrainConfig()
    train_set, dev_set = split_dev(read_tfns_csv(train_csv, config.labels), config.dev_fraction, config.seed)
    valid_set = read_tfns_csv(valid_csv, config.labels)
    fitted = fit(train_set, dev_set, config)
    temperature, report = calibrate_and_report(fitted, dev_set, valid_set, config)
    save_adapter(fitted.model, out_dir)
    summary = training_summary(
        fitted, config, temperature, report, train_examples=len(train_set), dev_examples=len(dev_set)
    )
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
