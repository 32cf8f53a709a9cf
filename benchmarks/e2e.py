"""One table from one run on this machine, ~32-token finance headlines:

1. the Hugging Face `transformers` pipeline on the same fine-tuned model (batch-1 loop, batched);
2. ONNX Runtime on the model alone, fp32 and int8 (batch-1 loop, batched);
3. our services end to end over gRPC as separate processes (one request at a time, and
   concurrent clients), plus the ratios between them, the machine's fp32 GEMM rate, the
   model's GFLOP per headline and the inference service's resident memory;
4. the cost of tracing: the mesh above exports every span over OTLP to a receiver in this
   process (default sampling, as `make run` does); a second mesh with the OpenTelemetry SDK
   disabled runs beside it, and the two take turns on the same workloads;
5. a version with several heads against single-head slices of it (benchmarks/heads.py):
   both tasks in one call against two single-head calls, and against today's one-head
   model; skipped, with the reason printed, for a version with one head.

Usage: python -m benchmarks.e2e [--repository models] [--model finance-sentiment]
       python -m benchmarks.e2e --heads-only   (5. alone)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import numpy as np
import numpy.typing as npt
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from tokenizers import Tokenizer

from gateway.traces import TraceStore, start_receiver
from infermesh.broker import EmbeddedBroker
from infermesh.mesh import SERVICES, LocalMesh
from services.inference.backends.base import Backend
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from shared.cpu import read_cpu
from shared.kafka import KafkaSettings, ensure_topics
from shared.messages import NEWS_TOPIC, SENTIMENT_TOPIC, ScoredItem
from shared.model_repository import ModelRepository
from shared.padding import pad_right
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pipeline import PipelineClient, PipelineTargets
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics

T = TypeVar("T")
R = TypeVar("R")

TICKERS = ["AAPL", "TSLA", "MSFT", "AMZN", "NVDA", "JPM", "XOM", "BA", "NFLX", "KO", "PFE", "GS"]
OPENINGS = [
    "{t} shares slide after the company cuts its full-year revenue outlook",
    "{t} stock jumps as quarterly earnings beat analyst estimates by a wide margin",
    "{t} announces date of its annual shareholder meeting and board elections",
    "Analysts downgrade {t} to sell, citing weakening demand and rising costs",
    "{t} raises dividend and unveils a new share buyback programme",
    "Regulators open an investigation into {t} accounting practices",
]
TAILS = [
    "while investors weigh the impact of higher interest rates on consumer spending",
    "as trading volume climbs to its highest level in three months across major exchanges",
    "according to a filing published on Tuesday with the securities regulator",
    "amid broader market volatility and uncertainty over the economic outlook",
]


@dataclass
class Row:
    name: str
    headlines_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    note: str = ""
    tokens: int = 32
    """Tokens per headline of the workload; ratios compare rows of the same length."""
    memory_mb: float | None = None
    """Resident memory of what served the row: the peak of its own process for in-process
    rows, the tokenizer + inference + post-processor processes after the row for the mesh."""


def make_headlines(tokenizer_path: Path, count: int, target_tokens: int = 32, seed: int = 7) -> list[str]:
    """Synthetic headlines cut at a word boundary to ~target_tokens tokens ([CLS]/[SEP] included)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # the packaged tokenizer.json pads to 128 by default
    rng = random.Random(seed)
    headlines: list[str] = []
    while len(headlines) < count:
        words = f"{rng.choice(OPENINGS).format(t='$' + rng.choice(TICKERS))} {rng.choice(TAILS)}".split()
        while len(tokenizer.encode(" ".join(words)).ids) <= target_tokens:  # long enough to cut
            words += rng.choice(TAILS).split()
        while len(tokenizer.encode(" ".join(words)).ids) > target_tokens:
            words.pop()
        headlines.append(" ".join(words))
    return headlines


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def time_loop(name: str, items: Sequence[T], run: Callable[[T], object], note: str = "") -> Row:
    run(items[0])  # warm-up
    latencies = []
    started = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        run(item)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return Row(name, len(items) / elapsed, percentile(latencies, 50), percentile(latencies, 99), note)


def time_batched(
    name: str, batches: Sequence[T], size_of: Callable[[T], int], run: Callable[[T], object], note: str = ""
) -> Row:
    run(batches[0])
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    elapsed = time.perf_counter() - started
    return Row(name, sum(size_of(b) for b in batches) / elapsed, None, None, note)


def gemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def bert_gflop(tokens: int, layers: int = 6, hidden: int = 384, intermediate: int = 1536) -> float:
    """Multiply-adds x2 of the encoder for one sequence (projections, attention, FFN)."""
    per_layer = (
        2 * tokens * hidden * hidden * 4 + 2 * 2 * tokens * tokens * hidden + 2 * 2 * tokens * hidden * intermediate
    )
    return layers * per_layer / 1e9


def in_own_process_call(run: Callable[..., R], *args: object) -> R:
    """`run(*args)` in a fresh process (spawned: no state, no CUDA context inherited)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: R = pool.apply(run, args)
        pool.close()
        pool.join()
    return result


def in_own_process(run: Callable[..., list[Row]], *args: object) -> list[Row]:
    """Runs an in-process benchmark in a fresh process, so each row's memory is its own."""
    rows, peak_kb = in_own_process_call(_measured, run, *args)
    for row in rows:
        row.memory_mb = peak_kb / 1024
    return rows


def _measured(run: Callable[..., list[Row]], *args: object) -> tuple[list[Row], int]:
    rows = run(*args)
    return rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_transformers(hf_dir: Path, headlines: list[str], batched: list[list[str]], tokens: int) -> list[Row]:
    import torch
    from transformers import pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    classifier = pipeline("text-classification", model=str(hf_dir), tokenizer=str(hf_dir), device=-1)
    rows = [
        time_loop("transformers pipeline, batch 1 loop", list(headlines), lambda h: classifier(h), "torch fp32"),
        time_batched(
            "transformers pipeline, batch 32",
            batched,
            len,
            lambda b: classifier(b, batch_size=len(b)),
            "torch fp32",
        ),
    ]
    for row in rows:
        row.tokens = tokens
    return rows


def _run(backend: Backend, inputs: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]) -> object:
    return backend.run(*inputs)


def bench_backend(
    kind: str,
    model_path: Path,
    tokenizer_file: Path,
    precision: str,
    headlines: list[str],
    batched: list[list[str]],
    tokens: int,
) -> list[Row]:
    """One inference backend on the model alone: `onnxruntime` on an ONNX file, or `torch`
    on the `hf/` weights (bf16 uses AMX where the CPU has it)."""
    backend: Backend
    if kind == "torch":
        from services.inference.backends.pytorch import TorchBackend

        backend, title = TorchBackend(model_path, device="cpu", dtype=precision), f"torch backend {precision}"
    else:
        backend, title = OnnxRuntimeBackend(model_path), f"ONNX Runtime {precision}"
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    singles = [pad_right([tokenizer.encode(h).ids]) for h in headlines]
    batches = [pad_right([e.ids for e in tokenizer.encode_batch(b)]) for b in batched]
    rows = [
        time_loop(f"{title}, batch 1 loop", singles, partial(_run, backend), "model only"),
        time_batched(f"{title}, batch 32", batches, lambda b: len(b[0]), partial(_run, backend), "model only"),
    ]
    for row in rows:
        row.tokens = tokens
    return rows


def encode_requests(tokenizer_file: Path, headlines: list[str], per_request: int, model: str) -> list[bytes]:
    """Serialized OIP ModelInfer requests of `per_request` pre-tokenized headlines each."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()
    tokenizer.enable_padding()
    requests = []
    for start in range(0, len(headlines), per_request):
        encodings = tokenizer.encode_batch(headlines[start : start + per_request])
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        request = infer_pb.ModelInferRequest(model_name=model, raw_input_contents=[ids.tobytes(), mask.tobytes()])
        for name in ("input_ids", "attention_mask"):
            request.inputs.add(name=name, datatype="INT64", shape=list(ids.shape))
        request.outputs.add(name="label")
        requests.append(request.SerializeToString())
    return requests


async def bench_inference_service(target: str, requests: list[bytes], per_request: int, concurrency: int) -> Row:
    """The inference service alone over OIP gRPC: pre-tokenized batches, no other hop."""
    async with grpc.aio.insecure_channel(target) as channel:
        infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer"
        )
        await infer(requests[0])
        latencies: list[float] = []
        queue = list(requests)

        async def worker() -> None:
            while queue:
                request = queue.pop()
                t0 = time.perf_counter()
                await infer(request)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Row(
        f"inference service alone (OIP gRPC), {concurrency} clients x {per_request} pre-tokenized",
        len(requests) * per_request / elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        "ModelInfer only",
    )


def workload_name(concurrency: int, per_request: int) -> str:
    """ "4 clients x 32 headlines/request": how rows name a client workload."""
    return (
        f"{concurrency} client{'s' if concurrency > 1 else ''} x {per_request} "
        f"headline{'s' if per_request > 1 else ''}/request"
    )


@dataclass
class Workload:
    """What `drive` measured: headlines answered, seconds, each request's latency, and the
    label each headline got (where the sender returns labels)."""

    headlines: int
    seconds: float
    latencies: list[float]
    labels: dict[str, str]

    def row(self, name: str, note: str) -> Row:
        return Row(
            name, self.headlines / self.seconds, percentile(self.latencies, 50), percentile(self.latencies, 99), note
        )


async def drive(
    send: Callable[[list[str]], Awaitable[Sequence[str] | None]],
    headlines: Sequence[str],
    concurrency: int,
    per_request: int,
    seconds: float | None = None,
) -> Workload:
    """The client workloads of every end-to-end row, whatever serves them: `concurrency`
    clients, each sending `per_request` headlines and waiting for the answer before its next
    request. Once through `headlines`, or round and round them for `seconds`. `send` may
    return one label per headline, kept for label agreement."""
    requests = [list(headlines[i : i + per_request]) for i in range(0, len(headlines), per_request)]
    await send(requests[0])  # warm-up
    latencies: list[float] = []
    labels: dict[str, str] = {}
    taken = answered = 0
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else None

    async def client() -> None:
        nonlocal taken, answered
        first = True  # timed: every client sends at least once, so there are latencies
        while (taken < len(requests)) if deadline is None else (first or time.perf_counter() < deadline):
            first = False
            batch = requests[taken % len(requests)]
            taken += 1
            t0 = time.perf_counter()
            answer = await send(batch)
            latencies.append(time.perf_counter() - t0)
            answered += len(batch)
            if answer is not None:
                labels.update(zip(batch, answer, strict=True))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Workload(answered, time.perf_counter() - started, latencies, labels)


async def bench_mesh(client: PipelineClient, headlines: list[str], concurrency: int, per_request: int) -> Row:
    async def send(batch: list[str]) -> None:
        await client.classify(batch)

    workload = await drive(send, headlines, concurrency, per_request)
    return workload.row(
        f"infermesh gRPC e2e, {workload_name(concurrency, per_request)}", "tokenizer+inference+post-processor"
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_kafka(mesh: LocalMesh, headlines: list[str], repeats: int = 4) -> tuple[Row, list[int]]:
    """Produce the headlines `repeats` times as news items (distinct ids), time until each
    is scored on the output topic; long enough that group joins and the first fetches do
    not dominate.

    Runs the worker's scoring stage as its own process against the embedded broker;
    samples the scorer group's lag (produced minus committed) every 0.25 s."""
    with EmbeddedBroker(port=_free_port()) as broker:
        client = KafkaSettings(bootstrap_servers=broker.bootstrap_servers).client_config()
        ensure_topics(client, monitor_topics(4))
        mesh.start_worker(broker.bootstrap_servers, {"INFERMESH_WORKER_STAGES": json.dumps(["score"])})
        producer = KafkaProducer(**client, acks="all", linger_ms=5)
        reader = KafkaConsumer(SENTIMENT_TOPIC, **client, auto_offset_reset="earliest")
        stamp = datetime.now(UTC).isoformat()

        def item(n: int, text: str) -> bytes:
            return json.dumps({"id": f"b{n}", "published_at": stamp, "source": "bench", "headline": text}).encode()

        def wait_for(ids: set[str], timeout: float = 300.0) -> None:
            deadline = time.monotonic() + timeout
            while ids and time.monotonic() < deadline:
                for records in reader.poll(timeout_ms=200).values():
                    ids.difference_update(ScoredItem.model_validate_json(r.value).item_id for r in records)
            if ids:
                raise RuntimeError(f"{len(ids)} items were not scored in time")

        producer.send(NEWS_TOPIC, value=item(-1, headlines[0]))  # warm-up: the worker has joined once this is scored
        producer.flush()
        wait_for({"b-1"})
        lags: list[int] = []
        done = threading.Event()

        def sample_lag() -> None:
            admin = KafkaAdminClient(**client)
            try:
                while not done.wait(0.25):
                    offsets = admin.list_group_offsets({MonitorSettings().scorer_group: None})
                    committed = sum(o.offset for o in next(iter(offsets.values()), {}).values())
                    lags.append(max(0, len(headlines) * repeats + 1 - committed))
            finally:
                admin.close()

        sampler = threading.Thread(target=sample_lag, daemon=True)
        started = time.perf_counter()
        sampler.start()
        stream = [text for _ in range(repeats) for text in headlines]
        for n, text in enumerate(stream):
            producer.send(NEWS_TOPIC, key=f"b{n}".encode(), value=item(n, text))
        producer.flush()
        wait_for({f"b{n}" for n in range(len(stream))})
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        producer.close()
        reader.close()
        worker = mesh.processes.pop("worker")
        worker.terminate()
        worker.wait(timeout=30)
    row = Row(
        "infermesh via Kafka e2e (produce N, until all scored)",
        len(headlines) * repeats / elapsed,
        None,
        None,
        "embedded broker + scoring worker",
    )
    return row, lags


def top_label(probabilities: dict[str, float]) -> str:
    """The most probable label (an abstained answer included), to compare with servers that
    do not abstain."""
    return max(probabilities, key=lambda label: probabilities[label])


def rest_sender(client: httpx.AsyncClient) -> Callable[[list[str]], Awaitable[list[str]]]:
    """Sends headlines to the gateway's /v1/sentiment; answers their labels."""

    async def send(batch: list[str]) -> list[str]:
        reply = await client.post("/v1/sentiment", json={"texts": batch})
        reply.raise_for_status()
        return [top_label(result["probabilities"]) for result in reply.json()["results"]]

    return send


async def bench_rest(
    url: str, headlines: list[str], concurrency: int = 1, per_request: int = 1, seconds: float | None = None
) -> Workload:
    """The gateway's /v1/sentiment over HTTP/1.1, one connection per client."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await drive(rest_sender(client), headlines, concurrency, per_request, seconds)


REST_ROW = "gateway REST /v1/sentiment"


async def bench_explain(target: str, headlines: list[str], method: explainer_pb.Method.ValueType, label: str) -> Row:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = explainer_grpc.ExplainerServiceStub(channel)
        await stub.Explain(explainer_pb.ExplainRequest(texts=headlines[:1], method=method))
        latencies = []
        started = time.perf_counter()
        for text in headlines:
            t0 = time.perf_counter()
            await stub.Explain(explainer_pb.ExplainRequest(texts=[text], method=method))
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
    return Row(
        f"explain {label}, 1 headline/request",
        len(headlines) / elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        "with faithfulness figures",
    )


def _serve_otlp(port_out: Connection, requests: Connection) -> None:
    """The receiver process: the gateway's OTLP receiver, answering span counts on request."""

    async def serve() -> None:
        store = TraceStore(max_traces=100_000, max_spans_per_trace=100)
        server, port = await start_receiver(store, "127.0.0.1", 0)
        port_out.send(port)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, requests.recv) == "spans":
            requests.send(sum(summary["spans"] for summary in store.summaries(limit=100_000)))
        await server.stop(0)

    asyncio.run(serve())


class TraceReceiver:
    """The gateway's OTLP receiver in a process of its own, as a collector would be, so
    decoding what arrives does not share the load generator's interpreter."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        port_in, port_out = context.Pipe(duplex=False)
        self._requests, theirs = context.Pipe()
        self._process = context.Process(target=_serve_otlp, args=(port_out, theirs), daemon=True, name="otlp-receiver")
        self._process.start()
        self.port: int = port_in.recv()

    def spans(self) -> int:
        self._requests.send("spans")
        return int(self._requests.recv())

    def stop(self) -> None:
        self._requests.send("stop")
        self._process.join(timeout=10)


def mesh_env(**overrides: str) -> dict[str, str]:
    """Free ports for a mesh's gRPC and metrics endpoints, so two meshes can run side by side."""
    env = {"INFERMESH_INFERENCE_LOG_LEVEL": "WARNING", "INFERMESH_GATEWAY_LOG_LEVEL": "WARNING"}
    for spec in SERVICES:
        env[f"{spec.env_prefix}GRPC_PORT"] = str(_free_port())
        env[f"{spec.env_prefix}METRICS_PORT"] = str(_free_port())
    return env | overrides


@dataclass(frozen=True)
class TracingCost:
    workload: str
    on_per_second: float
    off_per_second: float
    spans_exported: int

    @property
    def overhead(self) -> float:
        return 1 - self.on_per_second / self.off_per_second


def bench_tracing_cost(
    traced: LocalMesh, receiver: TraceReceiver, repository: Path, headlines: list[str]
) -> list[TracingCost]:
    """Median of alternating rounds on the traced mesh and an untraced twin (SDK disabled)."""
    untraced = LocalMesh(repository.resolve(), extra_env=mesh_env(OTEL_SDK_DISABLED="true"))
    untraced.start()
    try:

        def targets(mesh: LocalMesh) -> PipelineTargets:
            addresses = {spec.name: mesh.address(spec) for spec in SERVICES}
            return PipelineTargets(addresses["tokenizer"], addresses["inference"], addresses["postprocessor"])

        async def go() -> list[TracingCost]:
            costs = []
            async with PipelineClient(targets(traced)) as on, PipelineClient(targets(untraced)) as off:
                # One request at a time is the worst case: every headline pays for its own spans.
                for concurrency, per_request, count in ((4, 32, len(headlines)), (16, 1, len(headlines)), (1, 1, 300)):
                    rates: dict[str, list[float]] = {"on": [], "off": []}
                    spans_before = receiver.spans()
                    for _ in range(3):
                        for name, client in (("on", on), ("off", off)):
                            row = await bench_mesh(client, headlines[:count], concurrency, per_request)
                            rates[name].append(row.headlines_per_second)
                    await asyncio.sleep(2)  # let the exporters' last batches arrive
                    costs.append(
                        TracingCost(
                            workload_name(concurrency, per_request),
                            statistics.median(rates["on"]),
                            statistics.median(rates["off"]),
                            receiver.spans() - spans_before,
                        )
                    )
            return costs

        return asyncio.run(go())
    finally:
        untraced.stop()


def mesh_rss_mb(mesh: LocalMesh) -> float:
    return sum(rss_mb(mesh.processes[name].pid) for name in ("tokenizer", "inference", "postprocessor"))


def run_mesh_benchmarks(
    repository: Path, model: str, tokenizer_file: Path, headlines: list[str], long_headlines: list[str]
) -> tuple[list[Row], float, list[int], list[TracingCost]]:
    receiver = TraceReceiver()
    mesh = LocalMesh(
        repository.resolve(),
        extra_env=mesh_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}", OTEL_BSP_SCHEDULE_DELAY="1000"
        ),
    )
    mesh.start()
    try:
        addresses = {spec.name: mesh.address(spec) for spec in SERVICES}
        targets = PipelineTargets(addresses["tokenizer"], addresses["inference"], addresses["postprocessor"])

        async def go() -> list[Row]:
            rows = []
            for texts, tokens in ((headlines, 32), (long_headlines, 128)):
                requests = encode_requests(tokenizer_file, texts, 32, model)
                rows.append(await bench_inference_service(addresses["inference"], requests, 32, concurrency=4))
                rows[-1].tokens = tokens
                rows[-1].memory_mb = rss_mb(mesh.processes["inference"].pid)
            async with PipelineClient(targets) as client:
                for texts, tokens, workloads in (
                    (headlines, 32, ((1, 1, 300), (16, 1, len(headlines)), (4, 32, len(headlines)))),
                    (long_headlines, 128, ((1, 1, 100), (4, 32, len(long_headlines)))),
                ):
                    for concurrency, per_request, count in workloads:
                        row = await bench_mesh(client, texts[:count], concurrency, per_request)
                        row.tokens, row.memory_mb = tokens, mesh_rss_mb(mesh)
                        rows.append(row)
            return rows

        rows = asyncio.run(go())
        gateway = mesh.start_gateway("", _free_port())
        rest = asyncio.run(bench_rest(gateway, headlines[:300]))
        rows.append(rest.row(f"{REST_ROW}, {workload_name(1, 1)}", "HTTP + the gRPC pipeline"))
        explainer = addresses["explainer"]
        rows.append(
            asyncio.run(
                bench_explain(
                    explainer,
                    headlines[:20],
                    explainer_pb.METHOD_INTEGRATED_GRADIENTS,
                    "integrated gradients (32 steps)",
                )
            )
        )
        rows.append(asyncio.run(bench_explain(explainer, headlines[:20], explainer_pb.METHOD_OCCLUSION, "occlusion")))
        explainer_pid = mesh.processes["explainer"].pid
        rows[-1].memory_mb = rows[-2].memory_mb = rss_mb(explainer_pid)
        kafka_row, lags = bench_kafka(mesh, headlines)
        kafka_row.memory_mb = mesh_rss_mb(mesh)
        rows.append(kafka_row)
        memory = rss_mb(mesh.processes["inference"].pid)
        tracing = bench_tracing_cost(mesh, receiver, repository, headlines)
    finally:
        mesh.stop()
        receiver.stop()
    return rows, memory, lags, tracing


def bench_heads(repository: Path, model: str, headlines: list[str], rounds: int) -> dict[str, object]:
    """The several-heads rows (benchmarks/heads.py), printed; or the reason they are skipped."""
    import tempfile

    from benchmarks import heads

    with tempfile.TemporaryDirectory(prefix="infermesh-heads-") as scratch:
        result = heads.run(repository, model, headlines, Path(scratch), rounds)
    if isinstance(result, str):
        print(f"several heads in one pass: skipped: {result}")
    else:
        print("\n".join(heads.render(result)))
    return heads.as_json(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="finance-sentiment")
    parser.add_argument("--headlines", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("bench-results/e2e.json"))
    parser.add_argument(
        "--gpu", action="store_true", help="only the GPU table: every backend on the model alone, on CUDA"
    )
    parser.add_argument(
        "--heads-only",
        action="store_true",
        help="only the several-heads rows: the version's heads in one pass against single-head slices of it",
    )
    parser.add_argument("--heads-rounds", type=int, default=3, help="alternating rounds of the several-heads rows")
    args = parser.parse_args()
    if args.gpu:
        from benchmarks.gpu import run as run_gpu_table

        print(run_gpu_table(args.repository, args.model, "cuda"))
        return

    repository = ModelRepository(args.repository)
    config = repository.config(args.model)
    folder = repository.path(args.model, config.version)
    headlines = make_headlines(folder / "tokenizer.json", args.headlines)
    if args.heads_only:
        print(read_cpu().describe())
        heads = bench_heads(args.repository, args.model, headlines, args.heads_rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("heads.json").write_text(json.dumps(heads, indent=2))
        return
    batched = [headlines[i : i + 32] for i in range(0, len(headlines), 32)]
    counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
    counter.no_padding()
    mean_tokens = statistics.mean(len(counter.encode(h).ids) for h in headlines)

    print(
        f"benchmarking {args.model} v{config.version}: {len(headlines)} headlines, {mean_tokens:.1f} tokens on average"
    )
    tokenizer_file = folder / config.tokenizer
    long_headlines = make_headlines(tokenizer_file, 512, target_tokens=128)
    long_batched = [long_headlines[i : i + 32] for i in range(0, len(long_headlines), 32)]
    mesh_rows, inference_rss, lags, tracing = run_mesh_benchmarks(
        args.repository, args.model, tokenizer_file, headlines, long_headlines
    )
    local_rows: list[Row] = []
    for texts, batches, tokens in ((headlines, batched, 32), (long_headlines, long_batched, 128)):
        count = 200 if tokens == 32 else 60
        local_rows += in_own_process(bench_transformers, folder / "hf", texts[:count], batches[:12], tokens)
        for kind, model_path, precision in (
            ("onnxruntime", folder / config.variants["fp32"], "fp32"),
            ("onnxruntime", folder / config.variants["int8"], "int8"),
            ("torch", folder / "hf", "bf16"),
        ):
            local_rows += in_own_process(
                bench_backend, kind, model_path, tokenizer_file, precision, texts[:300], batches, tokens
            )
    rows = local_rows + mesh_rows
    gflops = gemm_gflops()
    per_headline = bert_gflop(round(mean_tokens))

    by_name = {(row.name, row.tokens): row for row in rows}
    hf_loop = {t: by_name["transformers pipeline, batch 1 loop", t].headlines_per_second for t in (32, 128)}
    ort_int8 = {t: by_name["ONNX Runtime int8, batch 32", t].headlines_per_second for t in (32, 128)}
    cpu = read_cpu()
    print()
    print(cpu.describe())
    print("ratios compare rows of the same length; memory: see docs/benchmarks.md")
    header = f"{'path':<66} {'tok':>4} {'headlines/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'MB':>6}"
    print(f"{header} {'x HF loop':>10} {'x ORT int8 b32':>15}")
    for row in sorted(rows, key=lambda r: r.tokens):
        p50 = f"{row.p50_ms:.2f}" if row.p50_ms is not None else "-"
        p99 = f"{row.p99_ms:.2f}" if row.p99_ms is not None else "-"
        memory = f"{row.memory_mb:.0f}" if row.memory_mb is not None else "-"
        print(
            f"{row.name:<66} {row.tokens:>4} {row.headlines_per_second:>12.1f} {p50:>8} {p99:>8} {memory:>6} "
            f"{row.headlines_per_second / hf_loop[row.tokens]:>10.2f} "
            f"{row.headlines_per_second / ort_int8[row.tokens]:>15.2f}"
        )
    print()
    print(f"machine fp32 GEMM (numpy, 2048^3): {gflops:.0f} GFLOP/s")
    for tokens in (32, 128):
        gflop = bert_gflop(tokens)
        reached = ort_int8[tokens] * gflop
        print(
            f"  {tokens:>3} tokens: {gflop:.2f} GFLOP per headline; the default (ONNX Runtime int8, batch 32) does "
            f"{reached:.0f} GFLOP/s = {reached / gflops:.2f}x the fp32 GEMM rate (fp32 bound: {gflops / gflop:.0f}/s)"
        )
    print(f"inference service resident memory after the run: {inference_rss:.0f} MB")
    if lags:
        print(
            f"Kafka consumer lag during the run (records): max {max(lags)}, "
            f"mean {statistics.fmean(lags):.0f}, final {lags[-1]}"
        )
    kafka_rate = by_name["infermesh via Kafka e2e (produce N, until all scored)", 32].headlines_per_second
    best_grpc = max(r.headlines_per_second for r in mesh_rows if r.name.startswith("infermesh gRPC") and r.tokens == 32)
    rest, grpc_single = (
        by_name[f"{REST_ROW}, {workload_name(1, 1)}", 32],
        by_name["infermesh gRPC e2e, 1 client x 1 headline/request", 32],
    )
    if rest.p50_ms is not None and grpc_single.p50_ms is not None and rest.p99_ms and grpc_single.p99_ms:
        print(
            "gateway REST overhead over the gRPC pipeline, one headline: "
            f"p50 +{rest.p50_ms - grpc_single.p50_ms:.2f} ms, p99 +{rest.p99_ms - grpc_single.p99_ms:.2f} ms"
        )
    print(f"Kafka e2e / best gRPC e2e: {kafka_rate / best_grpc:.2f}")
    print()
    print("tracing cost (median of 3 alternating rounds; on = every span exported over OTLP, default sampling):")
    for cost in tracing:
        print(
            f"  {cost.workload:<34} on {cost.on_per_second:7.1f}/s  off {cost.off_per_second:7.1f}/s  "
            f"overhead {cost.overhead * 100:5.1f}%  ({cost.spans_exported} spans exported)"
        )
    print()
    heads = bench_heads(args.repository, args.model, headlines, args.heads_rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "heads": heads,
                "gemm_gflops": gflops,
                "gflop_per_headline": per_headline,
                "mean_tokens": mean_tokens,
                "inference_rss_mb": inference_rss,
                "kafka_lag_samples": lags,
                "tracing": [asdict(cost) | {"overhead": cost.overhead} for cost in tracing],
                "cpu_count": os.cpu_count(),
                "cpu": {"model": cpu.model, "usable_cpus": cpu.usable_cpus, "kernel_flags": cpu.kernel_flags()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
