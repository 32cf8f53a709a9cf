"""Several heads over one encoder, as `make train` and `make model` make them: each example
trains only its own head, both heads learn in one run, the built config describes every
head's columns, and evaluation scores each head on its own columns."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from infermesh.model.build import head_fields, output_columns, serving_config
from infermesh.model.data import Example
from infermesh.model.evaluate import evaluate_version
from infermesh.model.train import HeadTask, TrainConfig, _joint_loss, fit_heads, predict_logits
from shared.model_repository import ModelConfig
from tests.tiny_checkpoints import TWO_HEAD_EXTRA, TWO_HEAD_PRIMARY, two_head_version

COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka"]
#: Tone and topic vary independently, so a head can only be right by reading its own cue.
TONES = {"bearish": ["shares plunge", "stock sinks"], "bullish": ["shares soar", "stock jumps"]}
TOPICS = {"dividend": ["after it raises its dividend"], "lawsuit": ["after regulators sue it"]}


def test_each_example_trains_only_its_own_heads_columns() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    heads = torch.tensor([0, 1, 0, 1])
    labels = torch.tensor([2, 0, 1, 1])
    spans = [slice(0, 3), slice(3, 5)]
    loss = _joint_loss(logits, heads, labels, spans)
    expected = (
        torch.nn.functional.cross_entropy(logits[[0, 2], 0:3], labels[[0, 2]], reduction="sum")
        + torch.nn.functional.cross_entropy(logits[[1, 3], 3:5], labels[[1, 3]], reduction="sum")
    ) / 4
    torch.testing.assert_close(loss, expected)
    loss.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None
    assert torch.all(logits.grad[[0, 2], 3:5] == 0), "a sentiment example moved the topic columns"
    assert torch.all(logits.grad[[1, 3], 0:3] == 0), "a topic example moved the sentiment columns"


def _examples(seed: int, count: int) -> tuple[list[Example], list[Example]]:
    rng = random.Random(seed)
    tone_rows, topic_rows = [], []
    for _ in range(count):
        tone = rng.randrange(2)
        topic = rng.randrange(2)
        text = (
            f"{rng.choice(COMPANIES)} {rng.choice(list(TONES.values())[tone])}"
            f" {rng.choice(list(TOPICS.values())[topic])}"
        )
        tone_rows.append(Example(text, tone))
        topic_rows.append(Example(text, topic))
    return tone_rows, topic_rows


def test_two_heads_learn_in_one_run_over_one_encoder() -> None:
    tone_train, topic_train = _examples(1, 48)
    tone_check, topic_check = _examples(2, 24)
    config = TrainConfig(epochs=4, batch_size=8, max_length=32, learning_rate=3e-3)
    tasks = [
        HeadTask("tone", tuple(TONES), tone_train, tone_check),
        HeadTask("topic", tuple(TOPICS), topic_train, topic_check),
    ]
    fitted = fit_heads(tasks, config)
    logits = predict_logits(fitted.model, fitted.tokenizer, tone_check, config.max_length)
    assert logits.shape == (24, 4), "one output layer carries both heads' columns"
    tone_accuracy = (logits[:, fitted.columns("tone")].argmax(-1) == [e.label for e in tone_check]).mean()
    topic_accuracy = (logits[:, fitted.columns("topic")].argmax(-1) == [e.label for e in topic_check]).mean()
    assert tone_accuracy >= 0.9 and topic_accuracy >= 0.9, (tone_accuracy, topic_accuracy)
    assert {"tone_dev_macro_f1", "topic_dev_macro_f1"} <= fitted.history[-1].keys()


def test_the_built_config_describes_every_heads_columns(tmp_path: Path) -> None:
    summary: dict[str, Any] = {
        "labels": ["negative", "neutral", "positive"],
        "temperature": 1.4,
        "heads": [
            {"name": "sentiment", "labels": ["negative", "neutral", "positive"], "temperature": 1.4},
            {"name": "topic", "labels": ["Earnings", "Macro"], "temperature": 0.9},
        ],
    }
    assert output_columns(summary) == ["negative", "neutral", "positive", "Earnings", "Macro"]
    (tmp_path / "model.fp32.onnx").write_bytes(b"graph")
    (tmp_path / "tokenizer.json").write_text("{}")
    fields = serving_config(
        tmp_path,
        "m",
        "1",
        summary["labels"],
        max_sequence_length=128,
        vocab_size=100,
        temperature=1.4,
        default_variant="fp32",
        scores={"negative": -1.0, "positive": 1.0},
        **head_fields(summary),
    )
    config = ModelConfig.model_validate(fields)
    assert [(h.name, h.start, h.stop, h.temperature) for h in config.heads] == [
        ("sentiment", 0, 3, 1.4),
        ("topic", 3, 5, 0.9),
    ]
    assert config.outputs[0].shape == [-1, 5]
    assert config.heads[1].output_name("probabilities") == "topic_probabilities"
    assert output_columns({"labels": ["a", "b"]}) == ["a", "b"] and head_fields({"labels": ["a", "b"]}) == {}


def test_a_config_naming_a_head_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="named twice"):
        ModelConfig.model_validate(
            {
                "name": "m",
                "version": "1",
                "platform": "onnxruntime_onnx",
                "labels": ["a", "b"],
                "max_sequence_length": 16,
                "vocab_size": 10,
                "temperature": 1.0,
                "inputs": [],
                "outputs": [],
                "variants": {},
                "default_variant": "fp32",
                "head": "topic",
                "extra_heads": [{"name": "topic", "labels": ["x"]}],
            }
        )


def test_evaluation_scores_each_head_on_its_own_columns(tmp_path: Path) -> None:
    folder = two_head_version(tmp_path / "models", "twohead", tmp_path)
    texts = ["Acme shares plunge after profit warning", "Globex to buy Initech", "Fed raises rates again"] * 4
    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(folder / "hf").eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    primary, extra = len(TWO_HEAD_PRIMARY[1]), len(TWO_HEAD_EXTRA[1])
    topic_truth = logits[:, primary : primary + extra].argmax(-1)
    sentiment_truth = logits[:, :primary].argmax(-1)

    topic = evaluate_version(
        folder, [Example(t, int(y)) for t, y in zip(texts, topic_truth, strict=True)], "t", "topic"
    )
    sentiment = evaluate_version(folder, [Example(t, int(y)) for t, y in zip(texts, sentiment_truth, strict=True)], "s")
    assert topic["head"] == "topic" and sentiment["head"] == "sentiment"
    assert topic["variants"]["fp32"]["accuracy"] == 1.0
    assert sentiment["variants"]["fp32"]["accuracy"] == 1.0
    assert list(topic["variants"]["fp32"]["per_class"]) == TWO_HEAD_EXTRA[1]
    assert topic["temperature"] == json.loads((folder / "config.json").read_text())["extra_heads"][0]["temperature"]
    assert topic["examples"] == len(texts)
