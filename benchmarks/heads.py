"""Several heads in one pass, measured (issue 17 item 5, issue 18 item 6): two rows of `make bench`.

A version with several heads (`sentiment` + `topic`) answers every task from one encoder
pass. Against it, the same tasks as single-head models: each made from the version itself
by keeping only one head's rows of its output layer (`slice_head`), exported and quantised
as `make model` does, into a scratch repository beside a link to the version. So the
encoder, the tokenizer, the variant and every weight of a head are the same in both; the
parity check confirms it (each slice answers its head's probabilities as the two-head
model does) before any figure is printed.

One mesh (tokenizer, inference, post-processor as their own processes, backend autotuning
off, so every model runs ONNX Runtime with the version's default variant) serves all of
them; the same texts go through the same clients, arm after arm, in alternating rounds:

- `two-head model, both tasks in 1 call`;
- `single-head models, both tasks in 2 calls`: one call per slice, sent together;
- `sentiment-only model, 1 task in 1 call`: the primary head's slice, i.e. the one-head
  model a user had before.

Row 1 (two heads in one pass vs the same two tasks as two models) divides the first arm by
the second, and gives the issue's goal figure: the second task's cost = (two-head time per
headline / one single-head model's) - 1, against the 10% it may cost at most. Row 2
(two-head model vs today's one-head model) divides the first arm by the third.

A version with one head has no rows: `heads_to_compare` says why, and the bench prints it.

Usage: python -m benchmarks.e2e --heads-only [--repository models] [--model finance-sentiment]
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tokenizers import Tokenizer

from benchmarks.e2e import Workload, drive, percentile, workload_name
from shared.model_repository import CONFIG_FILE, Head, ModelConfig, ModelRepository
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pipeline import PipelineClient, PipelineTargets

#: The issue's goal: answering the second task costs at most this much more than one task.
GOAL = 0.10
#: Texts the parity check scores through every model.
PARITY_TEXTS = 64
#: The slices answer their head's probabilities within this of the two-head model (the
#: graphs differ only in the output layer's width; float32 on the wire).
PARITY_TOLERANCE = 1e-4

TWO_HEAD_ARM = "two-head model, both tasks in 1 call"
SINGLE_HEAD_ARM = "single-head models, both tasks in 2 calls"
"""One call per task's model, sent together (asyncio.gather)."""


def one_head_arm(head: str) -> str:
    return f"{head}-only model, 1 task in 1 call"


@dataclass(frozen=True)
class HeadsWorkload:
    """`path`: `e2e` (PipelineClient: tokenizer, inference, post-processor) or `inference`
    (pre-tokenized OIP ModelInfer, every output of every head); `count`: headlines sent per
    arm and round (0: all)."""

    path: str
    concurrency: int
    per_request: int
    count: int = 0

    @property
    def name(self) -> str:
        if self.path == "inference":
            return f"inference service alone (OIP gRPC), {self.concurrency} clients x {self.per_request} pre-tokenized"
        return f"infermesh gRPC e2e, {workload_name(self.concurrency, self.per_request)}"


WORKLOADS = (
    HeadsWorkload("e2e", 1, 1, 200),
    HeadsWorkload("e2e", 4, 32),
    HeadsWorkload("inference", 4, 32),
)


@dataclass(frozen=True)
class HeadsPlan:
    """The scratch repository: `model` (the several-head version's files linked, same name
    and version) and one single-head model per head, `sliced[head name]` (version 1)."""

    repository: Path
    model: str
    version: str
    config: ModelConfig
    sliced: dict[str, str]
    """Head name -> the single-head model's name in `repository`."""

    @property
    def primary(self) -> str:
        return self.config.heads[0].name


@dataclass
class ArmFigures:
    """One arm on one workload: the median over rounds of each figure."""

    arm: str
    workload: str
    headlines_per_second: float
    p50_ms: float
    p99_ms: float
    rounds: list[float] = field(default_factory=list)
    """headlines/s of each round."""


@dataclass
class HeadsReport:
    model: str
    version: str
    heads: dict[str, int]
    """Head name -> its label count, in column order."""
    variant: str
    rounds: int
    parity: dict[str, float]
    """Head name -> the largest |probability difference| between its slice and the
    several-head model, over the parity texts."""
    figures: list[ArmFigures]

    def figure(self, arm: str, workload: str) -> ArmFigures:
        return next(f for f in self.figures if f.arm == arm and f.workload == workload)

    @property
    def workloads(self) -> list[str]:
        return list(dict.fromkeys(f.workload for f in self.figures))


class SlicesDisagree(Exception):
    """A slice answers its head otherwise than the several-head model: the arms would not
    compare the same work, so there are no figures."""


def heads_to_compare(config: ModelConfig) -> list[Head] | str:
    """The version's heads, or why the rows cannot run on it (one head only)."""
    heads = config.heads
    if len(heads) < 2:
        return (
            f"{config.name} v{config.version} has one head ({heads[0].name!r}, {len(heads[0].labels)} labels); "
            "the rows need a version with several heads (e.g. sentiment + topic)"
        )
    return heads


def slice_head(source: Path, config: ModelConfig, head: Head, repository: Path, name: str) -> Path:
    """`repository/name/1`: the version in `source` with only `head`'s rows of its output
    layer (the encoder untouched), exported to ONNX fp32 and int8 as `make model` does, with
    a config.json that makes `head` the version's one (primary) head: its labels,
    activation, temperature, thresholds and scores. Returns the version folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from infermesh.model.build import export_onnx, quantize_int8, serving_config, staged_version
    from infermesh.model.heads import output_layer

    model = AutoModelForSequenceClassification.from_pretrained(source / "hf").eval()
    layer = output_layer(model)
    if layer.out_features != config.num_logits:
        raise ValueError(
            f"{source}/hf has {layer.out_features} output columns; config.json's heads have {config.num_logits}"
        )
    narrow = torch.nn.Linear(layer.in_features, len(head.labels))
    with torch.no_grad():
        narrow.weight.copy_(layer.weight[head.start : head.stop])
        narrow.bias.copy_(layer.bias[head.start : head.stop])
    parent, attribute = (model, "classifier") if layer is model.classifier else (model.classifier, "out_proj")
    setattr(parent, attribute, narrow.eval())
    model.config.num_labels = len(head.labels)
    model.config.id2label = dict(enumerate(head.labels))
    model.config.label2id = {label: i for i, label in enumerate(head.labels)}
    version = "1"
    with staged_version(repository, name, version, replace=True) as staging:
        model.save_pretrained(staging / "hf")
        for file in (source / "hf").iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "vocab")) and file.is_file():
                shutil.copy(file, staging / "hf" / file.name)
        shutil.copy(source / config.tokenizer, staging / "tokenizer.json")
        export_onnx(model, staging / "model.fp32.onnx")
        if "int8" in config.variants:
            quantize_int8(staging / "model.fp32.onnx", staging / "model.int8.onnx", model.config)
        written = serving_config(
            staging,
            name,
            version,
            list(head.labels),
            max_sequence_length=config.max_sequence_length,
            vocab_size=config.vocab_size,
            temperature=head.temperature,
            default_variant=config.default_variant,
            base_model=config.base_model,
            activation=head.activation,
            thresholds=dict(head.thresholds),
            scores=dict(head.scores),
            languages=list(config.languages),
            pad_token_id=config.pad_token_id,
            head=head.name,
            dynamic_batching=config.dynamic_batching.model_dump(exclude_none=True),
        )
        ModelConfig.model_validate(written)
        (staging / CONFIG_FILE).write_text(json.dumps(written, indent=2) + "\n")
    return repository / name / version


def prepare(repository: Path, model: str, scratch: Path) -> HeadsPlan | str:
    """`scratch/models`: the serving version of `model` (its files linked, same name and
    version) and a single-head slice of it per head (`<model>-<head>-only`). Returns the
    plan, or why the version cannot be compared (nothing built then)."""
    models = ModelRepository(repository)
    version = models.serving_version(model)
    config = models.config(model, version)
    heads = heads_to_compare(config)
    if isinstance(heads, str):
        return heads
    source = models.path(model, version).resolve()
    root = scratch / "models"
    linked = root / model / version
    linked.mkdir(parents=True)
    for item in source.iterdir():
        (linked / item.name).symlink_to(item, target_is_directory=item.is_dir())
    sliced = {}
    for head in heads:
        sliced[head.name] = f"{model}-{head.name}-only"
        slice_head(source, config, head, root, sliced[head.name])
    return HeadsPlan(root, model, version, config, sliced)


async def parity(client: PipelineClient, plan: HeadsPlan, texts: Sequence[str]) -> dict[str, float]:
    """Per head: the largest |probability difference|, over `texts` and the head's labels,
    between its slice's answer and the several-head model's answer for that head."""
    texts = list(texts)
    together = await client.classify(texts, model_name=plan.model)
    gaps: dict[str, float] = {}
    for head, name in plan.sliced.items():
        alone = await client.classify(texts, model_name=name)
        gap = 0.0
        for both, one in zip(together.results, alone.results, strict=True):
            expected, got = both.heads[head].probabilities, one.heads[head].probabilities
            if set(expected) != set(got):
                raise ValueError(f"{name} answers labels {sorted(got)}; {plan.model}'s {head} has {sorted(expected)}")
            gap = max(gap, *(abs(expected[label] - got[label]) for label in expected))
        gaps[head] = gap
    return gaps


Send = Callable[[list[str]], Awaitable[None]]


def _requests(
    tokenizer_file: Path, pad_id: int, headlines: Sequence[str], per_request: int, model: str
) -> dict[tuple[str, ...], bytes]:
    """Serialized ModelInfer requests for `model`, one per `per_request` headlines (keyed by
    those headlines), pre-tokenized and naming no outputs: every head's outputs come back."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=pad_id)
    requests: dict[tuple[str, ...], bytes] = {}
    for start in range(0, len(headlines), per_request):
        texts = tuple(headlines[start : start + per_request])
        encodings = tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        request = infer_pb.ModelInferRequest(model_name=model, raw_input_contents=[ids.tobytes(), mask.tobytes()])
        for name in ("input_ids", "attention_mask"):
            request.inputs.add(name=name, datatype="INT64", shape=list(ids.shape))
        requests[texts] = request.SerializeToString()
    return requests


async def measure(
    targets: PipelineTargets,
    plan: HeadsPlan,
    headlines: Sequence[str],
    rounds: int = 3,
    workloads: Sequence[HeadsWorkload] = WORKLOADS,
    parity_texts: int = PARITY_TEXTS,
) -> HeadsReport:
    """The three arms on each workload, `rounds` alternating rounds (each round starts with
    another arm), medians kept; the parity check first (SlicesDisagree where it fails)."""
    heads = plan.config.heads
    models_of_arm = {
        TWO_HEAD_ARM: [plan.model],
        SINGLE_HEAD_ARM: [plan.sliced[head.name] for head in heads],
        one_head_arm(plan.primary): [plan.sliced[plan.primary]],
    }
    tokenizer_file = plan.repository / plan.model / plan.version / plan.config.tokenizer
    figures: list[ArmFigures] = []
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with (
        PipelineClient(targets, model_name=plan.model) as client,
        grpc.aio.insecure_channel(targets.inference, options=options) as channel,
    ):
        gaps = await parity(client, plan, headlines[:parity_texts])
        apart = {head: gap for head, gap in gaps.items() if gap > PARITY_TOLERANCE}
        if apart:
            raise SlicesDisagree(
                "the single-head slices do not answer as the several-head model does (largest |probability "
                f"difference| {', '.join(f'{head} {gap:.2e}' for head, gap in apart.items())}, "
                f"tolerance {PARITY_TOLERANCE:.0e}); no figures"
            )
        infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer"
        )

        def sender(workload: HeadsWorkload, models: list[str], texts: Sequence[str]) -> Send:
            if workload.path == "inference":
                requests = [
                    _requests(tokenizer_file, plan.config.pad_token_id, texts, workload.per_request, model)
                    for model in models
                ]

                async def send_infer(batch: list[str]) -> None:
                    key = tuple(batch)
                    await asyncio.gather(*(infer(each[key]) for each in requests))

                return send_infer

            async def send(batch: list[str]) -> None:
                await asyncio.gather(*(client.classify(batch, model_name=model) for model in models))

            return send

        for workload in workloads:
            texts = list(headlines[: workload.count or len(headlines)])
            arms = list(models_of_arm)
            senders = {arm: sender(workload, models_of_arm[arm], texts) for arm in arms}
            measured: dict[str, list[Workload]] = {arm: [] for arm in arms}
            for round_index in range(rounds):
                for offset in range(len(arms)):
                    arm = arms[(round_index + offset) % len(arms)]
                    measured[arm].append(await drive(senders[arm], texts, workload.concurrency, workload.per_request))
            for arm in arms:
                runs = measured[arm]
                rates = [run.headlines / run.seconds for run in runs]
                figures.append(
                    ArmFigures(
                        arm,
                        workload.name,
                        statistics.median(rates),
                        statistics.median(percentile(run.latencies, 50) for run in runs),
                        statistics.median(percentile(run.latencies, 99) for run in runs),
                        rates,
                    )
                )
    return HeadsReport(
        plan.model,
        plan.version,
        {head.name: len(head.labels) for head in heads},
        plan.config.default_variant,
        rounds,
        gaps,
        figures,
    )


def second_task_cost(report: HeadsReport, workload: str) -> tuple[float, float]:
    """The goal figure on `workload`: (two-head time / one single-head model's time) - 1,
    from the time per headline (1 / throughput) and from the p50 latency."""
    both = report.figure(TWO_HEAD_ARM, workload)
    one = report.figure(one_head_arm(next(iter(report.heads))), workload)
    return one.headlines_per_second / both.headlines_per_second - 1, both.p50_ms / one.p50_ms - 1


def render(report: HeadsReport) -> list[str]:
    """The rows as printed under the main table."""
    primary = next(iter(report.heads))
    described = " + ".join(f"{head} ({labels} labels)" for head, labels in report.heads.items())
    lines = [
        f"several heads in one pass: {report.model} v{report.version}, {described}, against single-head slices "
        f"of it; ONNX Runtime {report.variant}, autotune off; median of {report.rounds} alternating rounds",
        "  parity (largest |probability difference| of each slice against the several-head model, "
        f"{PARITY_TEXTS} headlines at most): " + ", ".join(f"{head} {gap:.2e}" for head, gap in report.parity.items()),
        f"  {'arm':<44} {'workload':<74} {'headlines/s':>12} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for figure in report.figures:
        lines.append(
            f"  {figure.arm:<44} {figure.workload:<74} {figure.headlines_per_second:>12.1f} "
            f"{figure.p50_ms:>8.2f} {figure.p99_ms:>8.2f}"
        )
    lines.append("row 1: two heads in one pass vs the same tasks as single-head models (x: two-head / single-head)")
    for workload in report.workloads:
        both, apart = report.figure(TWO_HEAD_ARM, workload), report.figure(SINGLE_HEAD_ARM, workload)
        per_headline, p50 = second_task_cost(report, workload)
        verdict = "within" if per_headline <= GOAL else "over"
        lines.append(
            f"  {workload:<74} throughput x{both.headlines_per_second / apart.headlines_per_second:.2f}  "
            f"p50 x{both.p50_ms / apart.p50_ms:.2f}  second task's cost: time per headline "
            f"{per_headline * 100:+.1f}% ({verdict} the {GOAL * 100:.0f}% goal), p50 {p50 * 100:+.1f}%"
        )
    lines.append(
        f"row 2: two-head model vs today's one-head model ({primary}-only), same workload (x: two-head / one-head)"
    )
    for workload in report.workloads:
        both, one = report.figure(TWO_HEAD_ARM, workload), report.figure(one_head_arm(primary), workload)
        lines.append(
            f"  {workload:<74} throughput x{both.headlines_per_second / one.headlines_per_second:.2f}  "
            f"p50 x{both.p50_ms / one.p50_ms:.2f}  p99 x{both.p99_ms / one.p99_ms:.2f}"
        )
    return lines


def run(repository: Path, model: str, headlines: Sequence[str], scratch: Path, rounds: int = 3) -> HeadsReport | str:
    """Builds the slices, serves them with the version in one mesh of separate processes,
    measures; returns the report, or why there are no rows."""
    from benchmarks.e2e import mesh_env
    from infermesh.mesh import SERVICES, LocalMesh

    plan = prepare(repository, model, scratch)
    if isinstance(plan, str):
        return plan
    # Every model on ONNX Runtime with the version's default variant: autotuning could
    # pick another backend for one of them, and then the arms would not compare.
    mesh = LocalMesh(
        plan.repository.resolve(),
        extra_env=mesh_env(INFERMESH_INFERENCE_AUTOTUNE="false", OTEL_SDK_DISABLED="true"),
    )
    mesh.start()
    try:
        addresses = {spec.name: mesh.address(spec) for spec in SERVICES}
        targets = PipelineTargets(addresses["tokenizer"], addresses["inference"], addresses["postprocessor"])
        return asyncio.run(measure(targets, plan, headlines, rounds))
    except SlicesDisagree as error:
        return str(error)
    finally:
        mesh.stop()


def as_json(result: HeadsReport | str) -> dict[str, Any]:
    """For bench-results/e2e.json."""
    if isinstance(result, str):
        return {"skipped": result}
    from dataclasses import asdict

    rows = {workload: second_task_cost(result, workload) for workload in result.workloads}
    return asdict(result) | {
        "second_task_cost": {w: {"time_per_headline": c[0], "p50": c[1]} for w, c in rows.items()},
        "goal": GOAL,
    }
