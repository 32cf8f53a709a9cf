"""`infermesh add-head` as a user runs it: a new label set onto an existing version's
encoder. The new version answers the old head exactly as before and the new head from the
same pass; what serves does not change until the version is rolled out."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from infermesh.cli import app, labelled_files
from infermesh.model.heads import EncoderTraining, HeadRefused, add_head
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from shared.calibration import softmax
from shared.model_repository import ModelRepository
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


@pytest.mark.parametrize(
    ("family", "problem_type"),
    [
        ("bert", None),
        ("roberta", None),
        ("deberta-v2", None),
        ("modernbert", None),
        ("distilbert", "multi_label_classification"),
    ],
    ids=["bert", "roberta", "deberta-v2", "modernbert", "multi-label-distilbert"],
)
def test_with_lora_the_encoder_adapts_and_the_existing_head_stays_close(
    tmp_path: Path, family: str, problem_type: str | None
) -> None:
    models_folder = import_family(tmp_path, family, problem_type)
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
    assert answer["encoder"] == "lora"
    models = ModelRepository(models_folder)
    base, added = models.config(MODEL, "1"), models.config(MODEL, "2")
    assert [h.name for h in added.heads] == [base.head, "topic"]
    assert models.serving_version(MODEL) == "1"

    metrics = json.loads((models.path(MODEL, "2") / "metrics.json").read_text())
    kept = metrics["kept_heads"][base.head]
    assert answer["existing_heads_label_agreement"][base.head] == round(kept["label_agreement"], 4)
    assert kept["label_agreement"] >= 0.95
    texts = [r["text"] for r in rows(12, 3)]
    before = onnx_logits(models.path(MODEL, "1"), texts)
    after = onnx_logits(models.path(MODEL, "2"), texts)
    # The encoder did move (head only leaves the old columns within 1e-5), and the merged
    # adapters are in the graph and in hf/ alike.
    assert np.abs(after[:, :3] - before).max() > 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(models.path(MODEL, "2") / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(models.path(MODEL, "2") / "hf")
    with torch.no_grad():
        reference = hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(after, reference, atol=1e-4)
    topic = added.head_named("topic")
    predicted = [topic.labels[i] for i in after[:, topic.start : topic.stop].argmax(-1)]
    assert np.mean([p == r["label"] for p, r in zip(predicted, rows(12, 3), strict=True)]) >= 0.9
    card = (models.path(MODEL, "2") / "model-card.md").read_text()
    assert "--lora" in card and "learning without forgetting" in card


def test_lora_that_would_move_the_existing_heads_too_far_writes_nothing(tmp_path: Path) -> None:
    models_folder = import_family(tmp_path, "bert")
    train, valid = write_csv(tmp_path / "train.csv", rows(40, 1)), write_csv(tmp_path / "valid.csv", rows(12, 2))
    spec = labelled_files(train, valid, "text", "label", "", "")
    # No epoch can keep more than every label: the refusal path, deterministically.
    with pytest.raises(HeadRefused, match="existing heads kept the base version's labels on less than"):
        add_head(spec, models_folder, MODEL, "topic", encoder=EncoderTraining(epochs=1, min_agreement=1.01))
    assert sorted(p.name for p in (models_folder / MODEL).iterdir()) == ["1"]
