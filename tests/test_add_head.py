"""`infermesh add-head` as a user runs it: a new label set onto an existing version's
encoder. The new version answers the old head exactly as before and the new head from the
same pass; what serves does not change until the version is rolled out."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from infermesh.cli import app, labelled_files
from infermesh.model.heads import (
    EncoderTraining,
    HeadRefused,
    adapt_encoder,
    add_head,
    kept_heads,
    model_logits,
    output_layer,
    widen_output_layer,
)
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from shared.calibration import softmax
from shared.model_repository import Head, ModelRepository
from shared.padding import pad_right
from tests.tiny_checkpoints import FAMILIES, build_checkpoint

runner = CliRunner()
MODEL = "tiny"
CUES = {"dividend": "raises its quarterly dividend", "lawsuit": "is sued by regulators", "merger": "agrees to merge"}
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark"]


def rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        topic = list(CUES)[i % len(CUES)]
        out.append({"text": f"{rng.choice(COMPANIES)} {CUES[topic]}", "label": topic})
    return out


def write_csv(path: Path, data: list[dict[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("add-head")
    bert = next(f for f in FAMILIES if f.name == "bert")
    checkpoint = build_checkpoint(bert, root / "checkpoint")
    result = runner.invoke(app, ["import", str(checkpoint), "--model", MODEL, "--repository", str(root / "models")])
    assert result.exit_code == 0, result.output
    train, valid = write_csv(root / "train.csv", rows(60, 1)), write_csv(root / "valid.csv", rows(30, 2))
    result = runner.invoke(
        app,
        [
            "add-head",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", "topic"),
            *("--repository", str(root / "models")),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["version"].endswith(f"{MODEL}/2")
    return root / "models"


def onnx_logits(folder: Path, texts: list[str]) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    ids = [tokenizer(text)["input_ids"] for text in texts]
    backend = OnnxRuntimeBackend(folder / "model.fp32.onnx")
    try:
        return backend.run(*pad_right(ids))
    finally:
        backend.close()


def test_the_new_version_answers_the_old_head_as_before_and_the_new_head_from_one_pass(repository: Path) -> None:
    models = ModelRepository(repository)
    base, added = models.config(MODEL, "1"), models.config(MODEL, "2")
    assert [h.name for h in added.heads] == [base.head, "topic"]
    topic = added.head_named("topic")
    assert topic.labels == sorted(CUES) and (topic.start, topic.stop) == (3, 6)
    assert added.outputs[0].shape == [-1, 6]

    texts = [r["text"] for r in rows(12, 3)]
    before = onnx_logits(models.path(MODEL, "1"), texts)
    after = onnx_logits(models.path(MODEL, "2"), texts)
    np.testing.assert_allclose(after[:, :3], before, atol=1e-5)

    # The new head is what the saved transformers model computes, calibrated with its temperature.
    hf = AutoModelForSequenceClassification.from_pretrained(models.path(MODEL, "2") / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(models.path(MODEL, "2") / "hf")
    with torch.no_grad():
        reference = hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(
        softmax(after[:, 3:], topic.temperature), softmax(reference[:, 3:], topic.temperature), atol=1e-3
    )
    predicted = [topic.labels[i] for i in after[:, 3:].argmax(-1)]
    expected = [r["label"] for r in rows(12, 3)]
    assert np.mean([p == e for p, e in zip(predicted, expected, strict=True)]) >= 0.9


def test_what_serves_does_not_change_until_rolled_out(repository: Path) -> None:
    models = ModelRepository(repository)
    assert models.serving_version(MODEL) == "1"
    card = (models.path(MODEL, "2") / "model-card.md").read_text()
    assert "`topic`" in card and "unchanged" in card
    metrics = json.loads((models.path(MODEL, "2") / "metrics.json").read_text())
    assert set(metrics["int8_fp32_label_agreement_per_head"]) == {models.config(MODEL, "1").head, "topic"}


@pytest.mark.parametrize(
    ("head", "message"),
    [("topic", "already has a head 'topic'"), ("Topic-2", "must be lower case"), ("label", "already has a head")],
)
def test_a_head_that_cannot_be_added_is_refused_with_nothing_written(
    repository: Path, tmp_path: Path, head: str, message: str
) -> None:
    train, valid = write_csv(tmp_path / "t.csv", rows(12, 4)), write_csv(tmp_path / "v.csv", rows(6, 5))
    before = sorted(p.name for p in (repository / MODEL).iterdir())
    result = runner.invoke(
        app,
        [
            "add-head",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", head),
            *("--repository", str(repository), "--base-version", "2"),
        ],
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (repository / MODEL).iterdir()) == before


def import_family(root: Path, family_name: str, problem_type: str | None = None) -> Path:
    """A fresh repository holding one tiny imported model of `family_name` as version 1."""
    family = next(f for f in FAMILIES if f.name == family_name)
    checkpoint = build_checkpoint(family, root / "checkpoint", problem_type=problem_type)
    result = runner.invoke(app, ["import", str(checkpoint), "--model", MODEL, "--repository", str(root / "models")])
    assert result.exit_code == 0, result.output
    return root / "models"


def checkpoint_head(model: Any) -> Head:
    """The tiny checkpoint's own head, as the services describe it."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    multi_label = model.config.problem_type == "multi_label_classification"
    return Head("label", labels, "sigmoid" if multi_label else "softmax", 1.0, {}, {}, 0, True)


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "modernbert", "distilbert"])
def test_lora_learns_the_new_head_and_keeps_the_existing_one(tmp_path: Path, family: str) -> None:
    checkpoint = build_checkpoint(next(f for f in FAMILIES if f.name == family), tmp_path / "checkpoint")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    train, dev = rows(90, 1), rows(30, 2)
    train_ids = [tokenizer(r["text"])["input_ids"] for r in train]
    dev_ids = [tokenizer(r["text"])["input_ids"] for r in dev]
    names = sorted(CUES)
    train_labels = np.array([names.index(r["label"]) for r in train])
    dev_labels = np.array([names.index(r["label"]) for r in dev])
    existing = [checkpoint_head(model)]
    # A random head is unsure of everything (probabilities near its decision boundaries),
    # so any change flips its answers; a trained one is decisive: scale it to be.
    with torch.no_grad():
        output_layer(model).weight.mul_(30.0)
        output_layer(model).bias.mul_(30.0)
    train_teacher, dev_teacher = model_logits(model, train_ids), model_logits(model, dev_ids)
    old_weight = output_layer(model).weight.detach().clone()
    # An untrained new head (all zeros: one label for every text), so only learning helps.
    widen_output_layer(model, np.zeros((3, old_weight.shape[1]), np.float32), np.zeros(3, np.float32))
    training = EncoderTraining(epochs=6, batch_size=8, learning_rate=5e-3)

    merged, history = adapt_encoder(
        model,
        existing,
        slice(3, 6),
        (train_ids, train_labels, train_teacher),
        (dev_ids, dev_labels, dev_teacher),
        training,
    )

    epochs, chosen = history[:-1], int(history[-1]["chosen_epoch"])
    qualifying = [row for row in epochs if row["label_dev_agreement"] >= training.min_agreement]
    assert chosen == max(qualifying, key=lambda row: row["dev_macro_f1"])["epoch"]
    assert chosen >= 1 and epochs[chosen]["dev_macro_f1"] > epochs[0]["dev_macro_f1"] + 0.3, [
        (row["epoch"], row["dev_macro_f1"], row["label_dev_agreement"], row.get("train_loss")) for row in epochs
    ]
    # What was judged is what was merged: the merged model answers the held-out texts as
    # the chosen epoch did, new head and existing one alike.
    logits = model_logits(merged, dev_ids)
    accuracy = float(np.mean(logits[:, 3:].argmax(-1) == dev_labels))
    assert accuracy == pytest.approx(epochs[chosen]["dev_accuracy"])
    kept = kept_heads(dev_teacher, logits, existing)["label"]
    assert kept["label_agreement"] == pytest.approx(epochs[chosen]["label_dev_agreement"])
    assert kept["label_agreement"] >= training.min_agreement
    # The encoder moved, while the existing head's rows of the output layer did not.
    assert np.abs(logits[:, :3] - dev_teacher).max() > 1e-4
    assert torch.equal(output_layer(merged).weight[:3], old_weight)
    assert not any("lora_" in name for name, _ in merged.named_parameters())


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"], ids=["softmax", "multi-label"])
def test_add_head_with_lora_writes_a_complete_version(tmp_path: Path, problem_type: str | None) -> None:
    models_folder = import_family(tmp_path, "bert", problem_type)
    train, valid = write_csv(tmp_path / "train.csv", rows(90, 1)), write_csv(tmp_path / "valid.csv", rows(30, 2))
    result = runner.invoke(
        app,
        [
            "add-head",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", "topic", "--lora"),
            *("--epochs", "2", "--repository", str(models_folder)),
        ],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    models = ModelRepository(models_folder)
    base, added = models.config(MODEL, "1"), models.config(MODEL, "2")
    assert [h.name for h in added.heads] == [base.head, "topic"]
    assert models.serving_version(MODEL) == "1"

    metrics = json.loads((models.path(MODEL, "2") / "metrics.json").read_text())
    assert answer["chosen_epoch"] == metrics["history"][-1]["chosen_epoch"]
    assert answer["encoder"] == ("lora" if answer["chosen_epoch"] > 0 else "frozen")
    kept = metrics["kept_heads"][base.head]
    assert answer["existing_heads_label_agreement"][base.head] == round(kept["label_agreement"], 4)
    texts = [r["text"] for r in rows(12, 3)]
    after = onnx_logits(models.path(MODEL, "2"), texts)
    hf = AutoModelForSequenceClassification.from_pretrained(models.path(MODEL, "2") / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(models.path(MODEL, "2") / "hf")
    with torch.no_grad():
        reference = hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(after, reference, atol=1e-4)
    topic = added.head_named("topic")
    predicted = [topic.labels[i] for i in after[:, topic.start : topic.stop].argmax(-1)]
    assert np.mean([p == r["label"] for p, r in zip(predicted, rows(12, 3), strict=True)]) >= 0.9
    card = (models.path(MODEL, "2") / "model-card.md").read_text()
    assert "--lora" in card or "LoRA did not beat it" in card
    if answer["chosen_epoch"] == 0:
        # LoRA lost to the head alone: what ships is exactly what head only makes.
        result = runner.invoke(
            app,
            [
                "add-head",
                *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", "topic"),
                *("--base-version", "1", "--repository", str(models_folder)),
            ],
        )
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(onnx_logits(models.path(MODEL, "3"), texts), after, atol=1e-5)


def test_lora_options_without_lora_are_refused(repository: Path, tmp_path: Path) -> None:
    train, valid = write_csv(tmp_path / "t.csv", rows(12, 4)), write_csv(tmp_path / "v.csv", rows(6, 5))
    result = runner.invoke(
        app,
        [
            "add-head",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", "sector"),
            *("--repository", str(repository), "--epochs", "5"),
        ],
    )
    assert result.exit_code == 2 and "--epochs only apply with --lora" in result.output


def test_too_few_training_rows_to_hold_any_out_are_refused(repository: Path, tmp_path: Path) -> None:
    one_each = [{"text": f"Acme {cue}", "label": topic} for topic, cue in CUES.items()]
    train, valid = write_csv(tmp_path / "t.csv", one_each), write_csv(tmp_path / "v.csv", rows(6, 5))
    before = sorted(p.name for p in (repository / MODEL).iterdir())
    result = runner.invoke(
        app,
        [
            "add-head",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL, "--head", "sector"),
            *("--repository", str(repository)),
        ],
    )
    assert result.exit_code == 2 and "a label needs 2 or more training rows" in result.output
    assert sorted(p.name for p in (repository / MODEL).iterdir()) == before


def test_lora_that_would_move_the_existing_heads_too_far_writes_nothing(tmp_path: Path) -> None:
    models_folder = import_family(tmp_path, "bert")
    train, valid = write_csv(tmp_path / "train.csv", rows(40, 1)), write_csv(tmp_path / "valid.csv", rows(12, 2))
    spec = labelled_files(train, valid, "text", "label", "", "")
    # No epoch can keep more than every label: the refusal path, deterministically.
    with pytest.raises(HeadRefused, match="existing heads kept the base version's labels on less than"):
        add_head(spec, models_folder, MODEL, "topic", encoder=EncoderTraining(epochs=1, min_agreement=1.01))
    assert sorted(p.name for p in (models_folder / MODEL).iterdir()) == ["1"]


def test_agreement_counts_what_the_post_processor_would_answer() -> None:
    labels = ["negative", "neutral", "positive"]
    softmax_head = Head("sentiment", labels, "softmax", 1.0, {"positive": 0.6}, {}, 0, True)
    sigmoid_head = Head("risk", ["fraud", "lawsuit"], "sigmoid", 1.0, {"fraud": 0.7}, {}, 3, False)
    before = np.array([[0.0, 0.0, 2.0, 1.0, -3.0], [2.0, 0.0, 0.0, 0.5, 3.0]], dtype=np.float32)
    # Row 0: positive falls under its 0.6 threshold (an abstain, though still the top label);
    # fraud's probability 0.73 -> 0.62 crosses its 0.7 threshold. Row 1: unchanged answers.
    after = np.array([[0.0, 0.0, 1.0, 0.5, -3.0], [2.5, 0.0, 0.0, 0.6, 2.0]], dtype=np.float32)
    figures = kept_heads(before, after, [softmax_head, sigmoid_head])
    assert figures["sentiment"]["label_agreement"] == 0.5
    assert figures["risk"]["label_agreement"] == 0.5
    assert figures["risk"]["max_probability_diff"] == pytest.approx(0.7311 - 0.6225, abs=1e-3)
