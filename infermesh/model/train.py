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
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from infermesh.model.data import (
    LABELS,
    SENTIMENT_HEAD,
    TOPIC_HEAD,
    TOPIC_LABELS,
    Example,
    read_tfns_csv,
    read_topic_csv,
)
from infermesh.model.encoder import BASE_PACKAGE, base_encoder_path, base_package_version
from infermesh.model.metrics import classification_report
from shared.calibration import expected_calibration_error, fit_temperature, softmax

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        # At least one of a label's rows, when it has two, so every label is held out.
        cut = max(round(len(group) * fraction), 1 if len(group) >= 2 else 0)
        dev.extend(group[i] for i in order[:cut])
        train.extend(group[i] for i in order[cut:])
    return train, dev


def build_lora_model(config: TrainConfig, columns: Sequence[str] = ()) -> Any:
    """The base encoder with a fresh head and LoRA adapters, ready to train. `columns`: the
    head's output columns (every head's labels side by side), default `config.labels`."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    columns = list(columns or config.labels)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_encoder_path(),
        num_labels=len(columns),
        # Heads may share label names (two heads with "neutral"): ids keep them apart.
        id2label=dict(enumerate(columns)),
        label2id={f"{i}:{name}": i for i, name in enumerate(columns)},
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


def batches(examples: Sequence[T], size: int, rng: random.Random | None) -> Iterator[list[T]]:
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


@dataclass(frozen=True)
class HeadTask:
    """One head to train over the shared encoder: its labels and its data. Its columns
    follow the heads before it in the output layer."""

    name: str
    labels: tuple[str, ...]
    train: Sequence[Example]
    select: Sequence[Example]
    """Held out: picks the best epoch and fits the temperature."""


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
    heads: list[HeadTask] = field(default_factory=list)

    def columns(self, head: str) -> slice:
        """Where `head`'s logits sit in the model's output."""
        start = 0
        for task in self.heads:
            if task.name == head:
                return slice(start, start + len(task.labels))
            start += len(task.labels)
        raise KeyError(head)


def fit(train_set: Sequence[Example], select_set: Sequence[Example], config: TrainConfig) -> Fitted:
    """Trains LoRA adapters and the head on `train_set`; keeps the epoch with the best
    macro-F1 on `select_set` and stops after `config.patience` epochs without a gain."""
    return fit_heads([HeadTask("label", config.labels, train_set, select_set)], config)


def _joint_loss(logits: torch.Tensor, heads: torch.Tensor, labels: torch.Tensor, spans: list[slice]) -> torch.Tensor:
    """Mean cross-entropy of each example's own head, over the whole batch."""
    total = logits.new_zeros(())
    for index, columns in enumerate(spans):
        rows = heads == index
        if rows.any():
            total = total + torch.nn.functional.cross_entropy(logits[rows, columns], labels[rows], reduction="sum")
    return total / len(labels)


def _train_epoch(
    model: Any,
    tokenizer: Any,
    progress: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    spans: list[slice],
    config: TrainConfig,
) -> None:
    """One pass over the shuffled pool; `progress` yields batches of (head index, example)."""
    for batch in progress:
        encoded = tokenizer(
            [example.text for _, example in batch],
            padding=True,
            truncation=True,
            max_length=config.max_length,
            return_tensors="pt",
        )
        logits = model(**encoded).logits
        loss = _joint_loss(
            logits,
            torch.tensor([head for head, _ in batch]),
            torch.tensor([example.label for _, example in batch]),
            spans,
        )
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")


def fit_heads(tasks: Sequence[HeadTask], config: TrainConfig) -> Fitted:
    """Trains LoRA adapters, the pooler and one output layer for every head together: each
    batch mixes the heads' examples, and each example's loss is its own head's
    cross-entropy. Keeps the epoch with the best mean macro-F1 over the heads' `select`
    sets; stops after `config.patience` epochs without a gain."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    seed_everything(config.seed)
    tasks = list(tasks)
    spans: list[slice] = []
    for task in tasks:
        start = spans[-1].stop if spans else 0
        spans.append(slice(start, start + len(task.labels)))
    tokenizer = AutoTokenizer.from_pretrained(base_encoder_path())
    model = build_lora_model(config, [label for task in tasks for label in task.labels])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    # (head index, example): one pool, shuffled, so every batch trains every head in proportion.
    pool = [(index, example) for index, task in enumerate(tasks) for example in task.train]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = (len(pool) + config.batch_size - 1) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
        optimizer, int(config.warmup_fraction * total_steps), total_steps
    )
    rng = random.Random(config.seed)
    best_f1, best_state, best_epoch, stale = -1.0, None, 0, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        progress = tqdm(
            batches(pool, config.batch_size, rng), total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}"
        )
        try:
            _train_epoch(model, tokenizer, progress, optimizer, scheduler, spans, config)
        except KeyboardInterrupt:
            # Ctrl-C on a long CPU run: keep the best finished epoch rather than nothing.
            if best_state is None:
                raise
            tqdm.write(f"interrupted in epoch {epoch}: keeping epoch {best_epoch}")
            break
        figures: dict[str, float] = {"epoch": epoch}
        for task, columns in zip(tasks, spans, strict=True):
            logits = predict_logits(model, tokenizer, task.select, config.max_length)[:, columns]
            report = classification_report(logits.argmax(-1), np.array([e.label for e in task.select]), task.labels)
            prefix = "" if len(tasks) == 1 else f"{task.name}_"
            figures[f"{prefix}dev_accuracy"] = report["accuracy"]
            figures[f"{prefix}dev_macro_f1"] = report["macro_f1"]
        mean_f1 = float(np.mean([v for k, v in figures.items() if k.endswith("dev_macro_f1")]))
        history.append(figures)
        tqdm.write(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "epoch"))
        if mean_f1 > best_f1:
            best_f1, best_epoch, stale = mean_f1, epoch, 0
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
    return Fitted(model, tokenizer, trainable, total, best_epoch, history, seconds, tasks)


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
    """The temperature fitted on `calibration_set`, and torch figures on `report_set`
    (the first head's)."""
    return calibrate_head(fitted, fitted.heads[0], calibration_set, report_set, config)


def calibrate_head(
    fitted: Fitted,
    head: HeadTask,
    calibration_set: Sequence[Example],
    report_set: Sequence[Example],
    config: TrainConfig,
) -> tuple[float, dict[str, Any]]:
    """One head's temperature fitted on `calibration_set`, and its torch figures on
    `report_set` (accuracy, macro-F1, per class, ECE before and after the temperature)."""
    columns = fitted.columns(head.name)
    calibration_logits = predict_logits(fitted.model, fitted.tokenizer, calibration_set, config.max_length)[:, columns]
    temperature = fit_temperature(calibration_logits, np.array([e.label for e in calibration_set]))
    logits = predict_logits(fitted.model, fitted.tokenizer, report_set, config.max_length)[:, columns]
    expected = np.array([e.label for e in report_set])
    report = classification_report(logits.argmax(-1), expected, head.labels)
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


#: The default model's settings: joint training asks more of the encoder than sentiment
#: alone, so LoRA also adapts the attention output and feed-forward projections.
DEFAULT_MODEL_CONFIG = TrainConfig(
    epochs=3,
    lora_rank=16,
    lora_alpha=32,
    lora_targets=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
)


def train(
    train_csv: Path,
    valid_csv: Path,
    out_dir: Path,
    config: TrainConfig | None = None,
    topic_train_csv: Path | None = None,
    topic_valid_csv: Path | None = None,
) -> dict[str, Any]:
    """The default model: sentiment (TFNS), and topic (Twitter Financial News Topic) when
    its files are given, trained together over one encoder. Early stopping and each head's
    temperature come from dev splits held out from the training files, so the validation
    files stay unseen for the model card's figures."""
    config = config or DEFAULT_MODEL_CONFIG
    sentiment_train, sentiment_dev = split_dev(
        read_tfns_csv(train_csv, config.labels), config.dev_fraction, config.seed
    )
    tasks = [HeadTask(SENTIMENT_HEAD, config.labels, sentiment_train, sentiment_dev)]
    valid_sets = {SENTIMENT_HEAD: read_tfns_csv(valid_csv, config.labels)}
    if topic_train_csv is not None and topic_valid_csv is not None:
        topic_train, topic_dev = split_dev(read_topic_csv(topic_train_csv), config.dev_fraction, config.seed)
        tasks.append(HeadTask(TOPIC_HEAD, TOPIC_LABELS, topic_train, topic_dev))
        valid_sets[TOPIC_HEAD] = read_topic_csv(topic_valid_csv)
    fitted = fit_heads(tasks, config)
    heads: list[dict[str, Any]] = []
    for task in tasks:
        temperature, report = calibrate_head(fitted, task, task.select, valid_sets[task.name], config)
        heads.append(
            {
                "name": task.name,
                "labels": list(task.labels),
                "temperature": temperature,
                "train_examples": len(task.train),
                "dev_examples": len(task.select),
                "validation_torch": report,
            }
        )
    save_adapter(fitted.model, out_dir)
    primary = heads[0]
    summary = training_summary(
        fitted,
        config,
        primary["temperature"],
        primary["validation_torch"],
        train_examples=primary["train_examples"],
        dev_examples=primary["dev_examples"],
        head=SENTIMENT_HEAD,
        heads=heads,
    )
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
