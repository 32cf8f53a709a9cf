"""The several-heads rows of `make bench` (benchmarks/heads.py), on a tiny two-head version
served by the real services on loopback, with one round of a few headlines: the slices
answer their head exactly as the two-head model does (what makes the comparison honest),
and the printed rows carry every figure. Speed is never asserted."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from benchmarks.e2e import bench_heads
from benchmarks.heads import (
    GOAL,
    PARITY_TOLERANCE,
    SINGLE_HEAD_ARM,
    TWO_HEAD_ARM,
    HeadsPlan,
    HeadsWorkload,
    SlicesDisagree,
    as_json,
    heads_to_compare,
    measure,
    one_head_arm,
    prepare,
    render,
)
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.model_repository import ModelRepository
from shared.pipeline import PipelineTargets
from tests.tiny_checkpoints import CORPUS, TWO_HEAD_EXTRA, TWO_HEAD_PRIMARY, two_head_version

MODEL = "multi"
SENTIMENT, SENTIMENT_LABELS = TWO_HEAD_PRIMARY
TOPIC, TOPIC_LABELS = TWO_HEAD_EXTRA
#: English only (the tiny model declares English); 8 headlines, 4 per bulk request.
HEADLINES = [text for text in CORPUS if text.isascii()]
WORKLOADS = (HeadsWorkload("e2e", 1, 1, 3), HeadsWorkload("e2e", 2, 4), HeadsWorkload("inference", 2, 4))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository holding the tiny two-head version `multi/1`."""
    root = tmp_path_factory.mktemp("heads-source")
    two_head_version(root, MODEL, tmp_path_factory.mktemp("heads-checkpoint"))
    return root


@pytest.fixture(scope="module")
def plan(source: Path, tmp_path_factory: pytest.TempPathFactory) -> HeadsPlan:
    built = prepare(source, MODEL, tmp_path_factory.mktemp("heads-scratch"))
    assert isinstance(built, HeadsPlan), built
    return built


@asynccontextmanager
async def serving(repository: Path) -> AsyncIterator[PipelineTargets]:
    """The services as the bench serves the scratch repository: every model on its default
    variant (tests/conftest.py turns autotuning off, as the bench does)."""
    tokenizer = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=repository, model_name=MODEL))
    inference, core = await start_inference(InferenceSettings(grpc_port=0, model_repository=repository))
    postprocessor = await start_postprocessor(
        PostprocessorSettings(grpc_port=0, model_repository=repository, model_name=MODEL)
    )
    try:
        yield PipelineTargets(
            tokenizer=f"127.0.0.1:{tokenizer.port}",
            inference=f"127.0.0.1:{inference.port}",
            postprocessor=f"127.0.0.1:{postprocessor.port}",
        )
    finally:
        for server in (tokenizer, inference, postprocessor):
            await server.stop(0)
        await core.close()


@pytest_asyncio.fixture(scope="module")
async def targets(plan: HeadsPlan) -> AsyncIterator[PipelineTargets]:
    async with serving(plan.repository) as running:
        yield running


def test_each_slice_is_its_head_alone_over_the_same_encoder_and_tokenizer(plan: HeadsPlan, source: Path) -> None:
    models = ModelRepository(plan.repository)
    two_heads = models.config(MODEL)
    assert plan.sliced == {SENTIMENT: f"{MODEL}-{SENTIMENT}-only", TOPIC: f"{MODEL}-{TOPIC}-only"}
    for head in two_heads.heads:
        alone = models.config(plan.sliced[head.name])
        assert [h.name for h in alone.heads] == [head.name]
        assert (alone.labels, alone.activation, alone.temperature, alone.scores) == (
            head.labels,
            head.activation,
            head.temperature,
            head.scores,
        )
        assert alone.default_variant == two_heads.default_variant
        assert alone.outputs[0].shape == [-1, len(head.labels)]
        folder = models.path(plan.sliced[head.name], "1")
        assert (folder / "tokenizer.json").read_bytes() == (source / MODEL / "1" / "tokenizer.json").read_bytes()
        assert json.loads((folder / "hf" / "config.json").read_text())["id2label"] == {
            str(i): label for i, label in enumerate(head.labels)
        }
    # The several-head version is the source's own files, not a copy.
    assert (plan.repository / MODEL / "1" / "model.int8.onnx").resolve() == (
        source / MODEL / "1" / "model.int8.onnx"
    ).resolve()


async def test_the_rows_have_every_figure_and_the_slices_answer_as_the_two_head_model(
    plan: HeadsPlan, targets: PipelineTargets
) -> None:
    report = await measure(targets, plan, HEADLINES, rounds=1, workloads=WORKLOADS)

    # The parity check: each slice gives its head's probabilities as the two-head model does.
    assert set(report.parity) == {SENTIMENT, TOPIC}
    assert all(gap <= PARITY_TOLERANCE for gap in report.parity.values()), report.parity
    assert report.heads == {SENTIMENT: len(SENTIMENT_LABELS), TOPIC: len(TOPIC_LABELS)}

    arms = [TWO_HEAD_ARM, SINGLE_HEAD_ARM, one_head_arm(SENTIMENT)]
    assert [(f.workload, f.arm) for f in report.figures] == [(w.name, arm) for w in WORKLOADS for arm in arms]
    for figure in report.figures:
        assert figure.headlines_per_second > 0 and 0 < figure.p50_ms <= figure.p99_ms
        assert len(figure.rounds) == 1

    lines = render(report)
    text = "\n".join(lines)
    assert f"{MODEL} v1, {SENTIMENT} ({len(SENTIMENT_LABELS)} labels) + {TOPIC} ({len(TOPIC_LABELS)} labels)" in text
    assert re.search(rf"parity .*: {SENTIMENT} \d\.\d\de[-+]\d+, {TOPIC} \d\.\d\de[-+]\d+", text)
    for workload in WORKLOADS:
        for arm in arms:
            assert re.search(rf"^  {re.escape(arm)} +{re.escape(workload.name)} +[\d.]+ +[\d.]+ +[\d.]+$", text, re.M)
    row_1 = lines.index(next(line for line in lines if line.startswith("row 1: ")))
    row_2 = lines.index(next(line for line in lines if line.startswith("row 2: ")))
    assert "today's one-head model (sentiment-only)" in lines[row_2]
    goal = (
        rf"second task's cost: time per headline [-+][\d.]+% \((within|over) the {GOAL * 100:.0f}% goal\), "
        r"p50 [-+][\d.]+%"
    )
    for workload, line in zip(WORKLOADS, lines[row_1 + 1 : row_2], strict=True):
        assert line.strip().startswith(workload.name)
        assert re.search(rf"throughput x[\d.]+  p50 x[\d.]+  {goal}$", line), line
    for workload, line in zip(WORKLOADS, lines[row_2 + 1 :], strict=True):
        assert line.strip().startswith(workload.name)
        assert re.search(r"throughput x[\d.]+  p50 x[\d.]+  p99 x[\d.]+$", line), line

    figures = as_json(report)
    assert figures["goal"] == GOAL
    assert set(figures["second_task_cost"]) == {w.name for w in WORKLOADS}


def test_a_one_head_version_has_no_rows_and_says_why(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ModelRepository(source).config(MODEL)
    one_head = config.model_copy(update={"head": "label", "labels": SENTIMENT_LABELS, "extra_heads": []})
    reason = heads_to_compare(one_head)
    assert isinstance(reason, str) and "has one head ('label', 3 labels)" in reason

    # As `make bench` meets it: printed and recorded, nothing built, no services started.
    folder = tmp_path / "models" / MODEL / "1"
    folder.mkdir(parents=True)
    for item in (source / MODEL / "1").iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    written = json.loads((source / MODEL / "1" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(written | {"extra_heads": [], "labels": SENTIMENT_LABELS}))
    recorded = bench_heads(tmp_path / "models", MODEL, HEADLINES, rounds=1)
    assert recorded == {"skipped": heads_to_compare(ModelRepository(tmp_path / "models").config(MODEL))}
    assert capsys.readouterr().out.startswith("several heads in one pass: skipped: multi v1 has one head")


async def test_a_slice_that_answers_otherwise_stops_the_rows(source: Path, tmp_path: Path) -> None:
    built = prepare(source, MODEL, tmp_path)
    assert isinstance(built, HeadsPlan)
    # The topic slice calibrated otherwise than the two-head model's topic head.
    written = built.repository / built.sliced[TOPIC] / "1" / "config.json"
    written.write_text(json.dumps(json.loads(written.read_text()) | {"temperature": 1.4}))
    async with serving(built.repository) as running:
        with pytest.raises(SlicesDisagree, match=rf"{TOPIC} \d\.\d\de-0\d, tolerance 1e-04\); no figures"):
            await measure(running, built, HEADLINES, rounds=1, workloads=WORKLOADS)
