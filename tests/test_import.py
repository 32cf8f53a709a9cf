"""`infermesh import` on tiny random checkpoints of each encoder family, built here with
their own tokenizers (tests/tiny_checkpoints.py): nothing comes from a model hub.

Per family: the imported ONNX fp32 graph gives transformers' own probabilities (1e-4),
the serving tokenizer gives transformers' token ids, and its character offsets cut the
text into pieces of words. A multi-label model is served through the real inference
service, tokenizer and post-processor. Bad checkpoints get one error and leave nothing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import transformers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel
from typer.testing import CliRunner

from infermesh.cli import app
from services.explainer.gradients import IntegratedGradients
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.core import Tokenizer, TokenizerLimits
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.calibration import calibrated
from shared.model_repository import ModelConfig, ModelRepository
from shared.padding import pad_right
from shared.pipeline import PipelineClient, PipelineTargets
from tests.gateway.conftest import client_for, settings_for_targets
from tests.tiny_checkpoints import FAMILIES, TEXTS, Family, build_checkpoint, build_tokenizer

#: ONNX fp32 against transformers, calibrated probabilities (measured: ~1e-7).
PROBABILITY_TOLERANCE = 1e-4

runner = CliRunner()


def built(family: Family, folder: Path, **kwargs: object) -> Path:
    """The family's tiny checkpoint, or a skip saying why this transformers cannot build it."""
    try:
        AutoConfig.for_model(family.model_type)
    except (ValueError, KeyError) as error:
        pytest.skip(f"transformers {transformers.__version__} cannot build {family.model_type}: {error}")
    return build_checkpoint(family, folder, **kwargs)  # type: ignore[arg-type]


def import_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["import", *args])
    return result.exit_code, result.output


def transformers_probabilities(
    folder: Path, texts: list[str], sigmoid: bool = False, temperature: float = 1.0
) -> tuple[npt.NDArray[np.float32], Any]:
    """transformers' own answer: its tokenizer (padding the batch), its model."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
    return (torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)).numpy(), batch


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_imports_and_serves_transformers_numbers(family: Family, tmp_path: Path) -> None:
    checkpoint = built(family, tmp_path / "checkpoint")
    repository = tmp_path / "models"
    code, output = import_cli(str(checkpoint), "--model", "mine", "--repository", str(repository))
    assert code == 0, output

    repo = ModelRepository(repository)
    config = repo.config("mine")
    folder = repo.path("mine", config.version)
    assert (config.version, config.labels, config.activation, config.languages) == (
        "1",
        ["negative", "neutral", "positive"],
        "softmax",
        ["en"],
    )
    assert config.max_sequence_length == 64  # the tiny models' positions (RoBERTa: 66 - pad 1 - 1)
    assert {"model.fp32.onnx", "model.int8.onnx", "tokenizer.json", "metrics.json", "model-card.md"} <= {
        p.name for p in folder.iterdir()
    }
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["examples"] == 50 and metrics["data"] == "bundled check sentences"
    assert config.default_variant == ("int8" if metrics["int8_fp32_label_agreement"] >= 0.99 else "fp32")

    # The serving path: the repository's tokenizer, right padding with 0, ONNX fp32.
    tokenizer = Tokenizer(folder / "tokenizer.json", "mine", TokenizerLimits(config.max_sequence_length, 0, 8, 4096))
    tokenized = tokenizer.tokenize(TEXTS, return_offsets=True)
    ids = [t.chunks[0].input_ids for t in tokenized]
    backend = OnnxRuntimeBackend(folder / config.variants["fp32"])
    logits = backend.run(*pad_right(ids))
    backend.close()
    served = np.exp(logits - logits.max(axis=1, keepdims=True))
    served /= served.sum(axis=1, keepdims=True)

    expected, batch = transformers_probabilities(checkpoint, TEXTS)
    for row, sequence in enumerate(ids):
        assert batch["input_ids"][row][: len(sequence)].tolist() == sequence
    assert np.abs(served - expected).max() < PROBABILITY_TOLERANCE
    # ... and the explainer's weights (hf/) are the same model.
    again, _ = transformers_probabilities(folder / "hf", TEXTS)
    assert np.abs(again - expected).max() < PROBABILITY_TOLERANCE

    # Offsets: every non-special token is a piece of one word of the text, and a word's
    # tokens (merged by the explainer from first start to last end) never take a space.
    for text, result in zip(TEXTS, tokenized, strict=True):
        chunk = result.chunks[0]
        assert chunk.offsets is not None and chunk.word_ids is not None
        words: dict[int, list[tuple[int, int]]] = {}
        for (start, end), word in zip(chunk.offsets, chunk.word_ids, strict=True):
            if word < 0:
                continue
            piece = text[start:end]
            # A token that is only the space marker ("Ġ", "▁") is empty, at its word's start.
            assert piece == piece.strip() and " " not in piece, (family.name, text, start, end)
            words.setdefault(word, []).append((start, end))
        for spans in words.values():
            merged = text[spans[0][0] : spans[-1][1]]
            assert merged and merged == merged.strip() and " " not in merged, (family.name, merged)
        # Together the tokens cover every visible character (byte-level tokens of one CJK
        # character share its span; SentencePiece's leading "▁" shares the first one's).
        covered = {i for (s, e), w in zip(chunk.offsets, chunk.word_ids, strict=True) if w >= 0 for i in range(s, e)}
        assert covered == {i for i, character in enumerate(text) if not character.isspace()}


def test_byte_level_offsets_carry_the_space_the_service_trims(tmp_path: Path) -> None:
    """The known trap: a byte-level BPE tokenizer saved without trim_offsets reports
    "Ġshares" as " shares"; the tokenizer service's offsets start at the word."""
    build_tokenizer("bytelevel", tmp_path)
    text = "Acme shares plunge"
    raw = RustTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text)
    assert any(text[start:end].startswith(" ") for start, end in raw.offsets)
    result = Tokenizer(tmp_path / "tokenizer.json", "t", TokenizerLimits(32, 0, 1, 100)).tokenize(
        [text], return_offsets=True
    )
    offsets = result[0].chunks[0].offsets
    assert offsets is not None
    assert [text[s:e] for s, e in offsets[1:-1] if e > s and not text[s:e].isspace()] == [
        text[s:e].strip() for s, e in raw.offsets[1:-1] if text[s:e].strip()
    ]
    assert all(not text[s:e].startswith(" ") for s, e in offsets)


def _plain_encoder(folder: Path) -> None:
    """A BertModel (no head) with a tokenizer: what a base checkpoint looks like."""
    build_tokenizer("wordpiece", folder)
    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        folder
    )


def _without_tokenizer_json(folder: Path) -> None:
    build_checkpoint(FAMILIES[0], folder)
    (folder / "tokenizer.json").unlink()


def _fnet(folder: Path) -> None:
    """FNet's Fourier mixing (aten::fft_fftn) has no ONNX opset 17 export."""
    fnet = Family("fnet", "fnet", "wordpiece", {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64})
    build_checkpoint(fnet, folder)


def _labels_mismatch(folder: Path) -> None:
    build_checkpoint(FAMILIES[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_labels"] = 5
    (folder / "config.json").write_text(json.dumps(config))


def _no_labels(folder: Path) -> None:
    build_checkpoint(FAMILIES[0], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda folder: folder.write_text("not a checkpoint"), "is not a folder"),
        (lambda folder: folder.mkdir(), "has no config.json"),
        (_plain_encoder, "has no sequence-classification head (architectures: BertModel)"),
        (_without_tokenizer_json, "has no tokenizer.json: infermesh needs a fast tokenizer"),
        (_fnet, "FNetForSequenceClassification does not export to ONNX"),
        (_labels_mismatch, "num_labels is 5 but id2label names 3 labels"),
        (_no_labels, "has no id2label"),
    ],
    ids=[
        "not-a-folder",
        "no-config",
        "no-head",
        "no-fast-tokenizer",
        "does-not-export",
        "labels-mismatch",
        "no-labels",
    ],
)
def test_bad_checkpoint_gets_one_error_and_nothing_is_written(
    make: Callable[[Path], None], expected: str, tmp_path: Path
) -> None:
    source = tmp_path / "checkpoint"
    make(source)
    repository = tmp_path / "models"
    code, output = import_cli(str(source), "--model", "mine", "--repository", str(repository))
    assert code == 2
    assert output.count("error: ") == 1 and expected in output.strip().splitlines()[-1], output
    assert "Traceback" not in output
    assert not repository.exists()


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    checkpoint = build_checkpoint(FAMILIES[0], tmp_path / "checkpoint")
    repository = tmp_path / "models"
    (repository / "mine" / "1").mkdir(parents=True)
    (repository / "mine" / "1" / "keep").write_text("x")
    code, output = import_cli(str(checkpoint), "--model", "mine", "--version", "1", "--repository", str(repository))
    assert code == 2 and "exists; versions are never overwritten" in output
    assert [p.name for p in (repository / "mine").iterdir()] == ["1"]
    assert [p.name for p in (repository / "mine" / "1").iterdir()] == ["keep"]


MULTI_LABELS = ["earnings", "merger", "layoffs", "dividend"]


@pytest.fixture
def multi_label_repository(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny multi-label BERT whose head favours earnings and dividend, imported with
    labelled data (so a temperature and per-label thresholds are fitted)."""
    checkpoint = build_checkpoint(
        FAMILIES[0], tmp_path / "checkpoint", labels=MULTI_LABELS, problem_type="multi_label_classification"
    )
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([3.0, -3.0, -3.0, 3.0]))
    model.save_pretrained(checkpoint)
    data = tmp_path / "check.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for index, text in enumerate(TEXTS * 5):
            writer.writerow([f"{text} {index}", "earnings|dividend" if index % 3 else "earnings"])
    repository = tmp_path / "models"
    code, output = import_cli(
        str(checkpoint),
        "--model",
        "events",
        "--repository",
        str(repository),
        "--data",
        str(data),
        "--languages",
        "en,ja",
    )
    assert code == 0, output
    return checkpoint, repository


async def test_multi_label_model_is_served_with_sigmoid_and_several_labels(
    multi_label_repository: tuple[Path, Path],
) -> None:
    checkpoint, repository = multi_label_repository
    config = ModelRepository(repository).config("events")
    assert config.activation == "sigmoid" and config.languages == ["en", "ja"]
    assert set(config.thresholds) == set(MULTI_LABELS) and config.temperature != 1.0
    expected, _ = transformers_probabilities(checkpoint, TEXTS, sigmoid=True, temperature=config.temperature)

    tokenizer = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=repository, model_name="events"))
    inference, core = await start_inference(InferenceSettings(grpc_port=0, model_repository=repository, variant="fp32"))
    postprocessor = await start_postprocessor(PostprocessorSettings(grpc_port=0, model_repository=repository))
    try:
        targets = PipelineTargets(
            tokenizer=f"127.0.0.1:{tokenizer.port}",
            inference=f"127.0.0.1:{inference.port}",
            postprocessor=f"127.0.0.1:{postprocessor.port}",
        )
        async with PipelineClient(targets, model_name="events") as client:
            result = await client.classify(TEXTS)
        # The gateway's REST answer lists every label that holds.
        addresses = [targets.tokenizer, targets.inference, targets.postprocessor, "127.0.0.1:1"]
        async for gateway in client_for(settings_for_targets(addresses, model_name="events")):
            answer = (await gateway.post("/v1/sentiment", json={"texts": TEXTS})).json()
    finally:
        for server in (tokenizer, inference, postprocessor):
            await server.stop(0)
        await core.close()

    probabilities = np.array([[r.probabilities[label] for label in MULTI_LABELS] for r in result.results])
    assert np.abs(probabilities - expected).max() < PROBABILITY_TOLERANCE
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # not a softmax
    for row, classification in zip(probabilities, result.results, strict=True):
        holding = [label for label in MULTI_LABELS if row[MULTI_LABELS.index(label)] >= config.thresholds[label]]
        assert sorted(classification.labels) == sorted(holding)
        assert classification.label == (classification.labels[0] if holding else "abstain")
    assert any(len(r.labels) >= 2 for r in result.results)
    assert [r["labels"] for r in answer["results"]] == [r.labels for r in result.results]

    # The explainer's torch side applies the same rule to the same weights.
    gradients = IntegratedGradients(repository / "events" / "1" / "hf", pad_id=config.pad_token_id)
    ids = (
        Tokenizer(repository / "events" / "1" / "tokenizer.json", "events", TokenizerLimits(64, 0, 1, 4096))
        .tokenize(TEXTS[:1])[0]
        .chunks[0]
        .input_ids
    )
    special = [i in (0, len(ids) - 1) for i in range(len(ids))]
    attribution = gradients.attribute(ids, special, config.heads[0], target=0, steps=4)
    assert np.abs(attribution.probabilities - expected[0]).max() < PROBABILITY_TOLERANCE


def test_unlabelled_multi_label_import_keeps_half_thresholds_and_no_temperature(tmp_path: Path) -> None:
    checkpoint = build_checkpoint(
        FAMILIES[0], tmp_path / "checkpoint", labels=MULTI_LABELS, problem_type="multi_label_classification"
    )
    code, output = import_cli(str(checkpoint), "--model", "events", "--repository", str(tmp_path / "models"))
    assert code == 0, output
    config = ModelRepository(tmp_path / "models").config("events")
    assert config.thresholds == dict.fromkeys(MULTI_LABELS, 0.5) and config.temperature == 1.0
    card = (tmp_path / "models" / "events" / "1" / "model-card.md").read_text()
    assert "multi-label (sigmoid" in card and "no labelled data" in card


def test_versions_written_before_the_new_fields_load_as_single_label_english() -> None:
    old = {
        "name": "m",
        "version": "1",
        "platform": "onnxruntime_onnx",
        "labels": ["a", "b"],
        "max_sequence_length": 128,
        "vocab_size": 10,
        "temperature": 2.0,
        "inputs": [],
        "outputs": [],
        "variants": {"fp32": "model.fp32.onnx"},
        "default_variant": "fp32",
    }
    config = ModelConfig.model_validate(old)
    assert (config.activation, config.thresholds, config.languages, config.pad_token_id) == ("softmax", {}, ["en"], 0)
    logits = np.array([[1e308, -1e308], [0.0, 2.0]])
    assert np.allclose(calibrated(logits, config), [[1.0, 0.0], [1 / (1 + np.e), np.e / (1 + np.e)]])
    sigmoid_config = config.model_copy(update={"activation": "sigmoid"})
    assert np.allclose(calibrated(logits, sigmoid_config), [[1.0, 0.0], [0.5, 1 / (1 + np.exp(-1.0))]])
    with pytest.raises(ValueError, match="threshold for unknown label 'c'"):
        ModelConfig.model_validate(old | {"thresholds": {"c": 0.5}})
