"""`infermesh finetune` as a user runs it: their own labels and files in, a new version out
that the inference service serves next to the packaged model."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from tokenizers import Tokenizer
from typer.testing import CliRunner

from infermesh.cli import app
from infermesh.model.data import DatasetError, Example
from infermesh.model.finetune import DataSpec, load_dataset, next_version
from infermesh.model.train import TrainConfig, fit, predict_logits
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from shared.grpc_client import channel
from shared.grpc_server import RunningServer
from shared.model_repository import ModelRepository, RolloutRule
from shared.oip import decode_raw
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from tests.conftest import MODEL

TICKERS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne"]
BULLISH = ["shares soar after record profit", "beats estimates and raises guidance", "stock jumps on strong sales"]
BEARISH = ["shares plunge after profit warning", "misses estimates and cuts guidance", "stock sinks on weak sales"]

runner = CliRunner()


def headlines(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "bullish" if i % 2 else "bearish"
        phrase = rng.choice(BULLISH if label == "bullish" else BEARISH)
        rows.append({"headline": f"{rng.choice(TICKERS)} {phrase}", "tone": label})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finetuned(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the packaged model as version 1 and, as version 2, a two-label
    model fine-tuned by the CLI on a tiny data set with other column names."""
    root = tmp_path_factory.mktemp("finetune")
    repository = root / "models"
    (repository / MODEL).mkdir(parents=True)
    (repository / MODEL / "1").symlink_to(built_model)
    train = write_jsonl(root / "train.jsonl", headlines(64, seed=1))
    valid = write_jsonl(root / "valid.jsonl", headlines(24, seed=2))
    result = runner.invoke(
        app,
        [
            "finetune",
            *("--train", str(train), "--valid", str(valid), "--model", MODEL),
            *("--repository", str(repository), "--text-column", "headline", "--label-column", "tone"),
            *("--epochs", "4", "--batch-size", "8", "--learning-rate", "0.003", "--max-length", "32"),
            *("--languages", "en,de"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["version"].endswith(f"{MODEL}/2")
    return repository


def test_finetune_writes_a_complete_version_with_figures_and_a_card(finetuned: Path) -> None:
    version = finetuned / MODEL / "2"
    config = json.loads((version / "config.json").read_text())
    assert config["labels"] == ["bearish", "bullish"]
    assert config["outputs"][0]["shape"] == [-1, 2]
    assert config["languages"] == ["en", "de"], "--languages is what the version declares it reads"
    for artifact in ("model.fp32.onnx", "model.int8.onnx", "tokenizer.json", "adapter/adapter_model.safetensors"):
        assert (version / artifact).is_file(), artifact
    metrics = json.loads((version / "metrics.json").read_text())
    int8 = metrics["variants"]["int8"]
    assert int8["accuracy"] >= 0.9, int8
    assert set(int8["per_class"]) == {"bearish", "bullish"}
    assert 0 <= int8["ece_calibrated"] <= 1
    training = metrics["training"]
    assert 0 < training["trainable_share"] < 0.05
    assert training["training_seconds"] > 0
    card = (version / "model-card.md").read_text()
    assert "valid.jsonl" in card and "bearish" in card and f"{training['trainable_parameters']:,}" in card
    assert not list((finetuned / MODEL).glob(".*")), "no staging folder left behind"
    # What served before keeps serving until the new version is rolled out.
    assert ModelRepository(finetuned).rollout(MODEL) == RolloutRule(serving="1")


@pytest_asyncio.fixture
async def serving_both(finetuned: Path) -> AsyncIterator[RunningServer]:
    settings = InferenceSettings(grpc_port=0, model_repository=finetuned, versions_to_serve=2)
    running, core = await start_inference(settings)
    yield running
    await running.stop(0)
    await core.close()


async def test_the_new_version_serves_next_to_the_old_one(serving_both: RunningServer, finetuned: Path) -> None:
    tokenizer = Tokenizer.from_file(str(finetuned / MODEL / "2" / "tokenizer.json"))
    texts = ["Hooli shares soar after record profit", "Initech shares plunge after profit warning"]
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in encodings], dtype=np.int64)
    mask = (np.arange(width)[None, :] < np.array([len(e.ids) for e in encodings])[:, None]).astype(np.int64)

    async with channel(f"127.0.0.1:{serving_both.port}") as ch:
        stub = infer_grpc.GRPCInferenceServiceStub(ch)
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
        assert list(metadata.versions) == ["1", "2"]
        labels = {}
        for version in ("1", "2"):
            request = pb.ModelInferRequest(model_name=MODEL, model_version=version)
            for name, array in (("input_ids", ids), ("attention_mask", mask)):
                tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
                tensor.contents.int64_contents.extend(array.ravel().tolist())
            request.outputs.add(name="label")
            response = await stub.ModelInfer(request)
            assert response.model_version == version
            output = response.outputs[0]
            decoded = decode_raw(output.name, output.datatype, output.shape, response.raw_output_contents[0])
            labels[version] = [label.decode() for label in decoded]
    assert labels["2"] == ["bullish", "bearish"]
    assert set(labels["1"]) <= {"negative", "neutral", "positive"}


def test_bad_training_files_name_the_row_and_the_problem(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "valid.jsonl", [{"text": r["headline"], "label": r["tone"]} for r in headlines(6, 3)])
    bad_csv = tmp_path / "train.csv"
    bad_csv.write_text(
        "text,label\n"
        "Acme shares soar,bullish\n"
        ",bearish\n"
        '"Globex, a multi-line\nheadline",bullish\n'
        "Initech sinks,\n"
        "Hooli misses,bearsh\n",
        encoding="utf-8",
    )
    with pytest.raises(DatasetError) as caught:
        load_dataset(DataSpec(bad_csv, good, label_column="label", labels=("bearish", "bullish")))
    assert caught.value.problems == ["line 3: empty text", "line 6: empty label"]

    typo = tmp_path / "typo.csv"
    typo.write_text("text,label\nAcme soars,bullish\nHooli misses,bearsh\nGlobex dips,bearish\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_dataset(DataSpec(typo, good, labels=("bearish", "bullish")))
    assert caught.value.problems == ["line 3: unknown label 'bearsh' (labels: bearish, bullish)"]

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\nAcme soars,bullish\nCaf\u00e9 chain sinks,bearish\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"line 3: not UTF-8 \(byte 0xe9\)"):
        load_dataset(DataSpec(latin1, good))

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "Acme soars", "label": "bullish"}\n{"text": "Hooli", \n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_dataset(DataSpec(broken, good))
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 2", "line 3"]

    renamed = write_jsonl(tmp_path / "renamed.jsonl", headlines(2, seed=4))
    with pytest.raises(DatasetError) as caught:
        load_dataset(DataSpec(renamed, good))
    assert caught.value.problems[0] == "line 1: no 'text', 'label' (keys: headline, tone)"

    one_label = write_jsonl(tmp_path / "one.jsonl", [{"text": "Acme soars", "label": "bullish"}])
    with pytest.raises(DatasetError, match="at least two labels"):
        load_dataset(DataSpec(one_label, good))


def test_the_cli_reports_bad_files_without_a_traceback_and_writes_nothing(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    train = tmp_path / "train.csv"
    train.write_text("headline,label\nAcme soars,bullish\n", encoding="utf-8")
    result = runner.invoke(
        app,
        ["finetune", "--train", str(train), "--valid", str(train), "--model", "mine", "--repository", str(repository)],
    )
    assert result.exit_code == 2
    assert "line 1: no column 'text' in the header (columns: headline, label)" in result.output
    assert "Traceback" not in result.output
    assert not repository.exists()


def test_versions_are_numbered_after_every_existing_folder(tmp_path: Path) -> None:
    assert next_version(tmp_path, "mine") == "1"
    for name in ("1", "3", ".4.building", "notes"):
        (tmp_path / "mine" / name).mkdir(parents=True)
    assert next_version(tmp_path, "mine") == "4"


def test_the_same_seed_and_data_give_the_same_weights() -> None:
    rows = headlines(32, seed=5)
    examples = [Example(r["headline"], int(r["tone"] == "bullish")) for r in rows]
    config = TrainConfig(epochs=2, batch_size=8, max_length=32, labels=("bearish", "bullish"))

    def trained_logits(seed: int) -> np.ndarray:
        fitted = fit(examples, examples[:8], replace(config, seed=seed))
        return predict_logits(fitted.model, fitted.tokenizer, examples, config.max_length)

    first = trained_logits(13)
    np.testing.assert_array_equal(trained_logits(13), first)
    assert not np.array_equal(trained_logits(14), first), "the seed decides the initialisation and order"
