"""The model alone on an NVIDIA GPU, every backend side by side (`make bench ARGS=--gpu`).

Rows: torch eager fp32, torch fp16 with CUDA graphs, ONNX Runtime's CUDA execution
provider (fp32 graph) and TensorRT fp16 where installed, each at batch 1/32/128 and
sequence length 32/128 (exact lengths: random in-vocabulary ids, full attention). Every
backend runs in a fresh process, so its GPU memory figure is its own. Ratios divide by
torch eager fp32 at the same batch and length.

`--device cpu` runs the same table on the CPU backends (torch fp32, ONNX Runtime): the
machinery is tested there, since the GPU path can only run where a GPU is lent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from services.inference.backends.base import Backend
from shared.model_repository import ModelConfig

BATCHES = (1, 32, 128)
LENGTHS = (32, 128)


@dataclass(frozen=True)
class GpuConfig:
    title: str
    backend: str
    dtype: str = "fp32"
    cuda_graphs: bool = False


GPU_CONFIGS = (
    GpuConfig("torch eager fp32", "torch", "fp32"),
    GpuConfig("torch fp16 + CUDA graphs", "torch", "fp16", cuda_graphs=True),
    GpuConfig("ONNX Runtime CUDA EP fp32", "onnxruntime"),
    GpuConfig("TensorRT fp16", "tensorrt", "fp16"),
)
CPU_CONFIGS = (
    GpuConfig("torch eager fp32", "torch", "fp32"),
    GpuConfig("ONNX Runtime CPU fp32", "onnxruntime"),
)
BASELINE = "torch eager fp32"


@dataclass
class ShapeRow:
    title: str
    batch: int
    length: int
    sequences_per_second: float
    p50_ms: float
    p99_ms: float
    memory_mb: float | None = None
    """Peak device memory through torch's allocator: the torch rows only (ONNX Runtime and
    TensorRT allocate outside it)."""


@dataclass
class BackendResult:
    title: str
    rows: list[ShapeRow] = field(default_factory=list)
    skipped: str = ""
    """Why the backend did not run here (missing package, no CUDA EP), else empty."""


def unavailable(config: GpuConfig, device: str) -> str:
    """Why `config` cannot run on this machine, or '' if it can."""
    if device == "cpu":
        return ""
    if config.backend == "tensorrt" and find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if config.backend == "onnxruntime":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime-gpu (CUDAExecutionProvider) is not installed"
    return ""


def make_backend(
    config: GpuConfig, model: ModelConfig, folder: Path, device: str, batches: tuple[int, ...], lengths: tuple[int, ...]
) -> Backend:
    if config.backend == "torch":
        from services.inference.backends.pytorch import TorchBackend

        return TorchBackend(folder / "hf", device=device, dtype=config.dtype, cuda_graphs=config.cuda_graphs)
    if config.backend == "tensorrt":
        from services.inference.backends.tensorrt import (
            TensorRTBackend,
            cached_engine,
            engine_spec,
            length_profiles,
        )

        onnx = model.variants["fp32"]
        profiles = length_profiles(lengths, max(batches), model.max_sequence_length)
        spec = engine_spec(model.sha256.get(onnx, ""), profiles, fp16=config.dtype == "fp16")
        engine, _, _ = cached_engine(folder / onnx, spec, folder / "engines")
        return TensorRTBackend(engine, profiles, len(model.labels))
    from services.inference.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(folder / model.variants["fp32"], device=device)


def random_batch(batch: int, length: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """In-vocabulary ids of exactly `length` tokens ([CLS] ... [SEP]), all attended."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, np.ones_like(ids)


def time_shape(backend: Backend, ids: np.ndarray, mask: np.ndarray, seconds: float, min_runs: int = 5) -> list[float]:
    """Per-call latencies (s) after warm-up (which also captures CUDA graphs / picks kernels)."""
    for _ in range(3):
        backend.run(ids, mask)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_runs or time.perf_counter() < deadline:
        started = time.perf_counter()
        backend.run(ids, mask)  # returns host logits: the device work is finished
        latencies.append(time.perf_counter() - started)
    return latencies


def bench_config(
    config: GpuConfig,
    repository: Path,
    model_name: str,
    device: str,
    batches: tuple[int, ...] = BATCHES,
    lengths: tuple[int, ...] = LENGTHS,
    seconds: float = 2.0,
) -> BackendResult:
    from shared.model_repository import ModelRepository

    reason = unavailable(config, device)
    if reason:
        return BackendResult(config.title, skipped=reason)
    store = ModelRepository(repository)
    model = store.config(model_name)
    try:
        backend = make_backend(config, model, store.path(model_name, model.version), device, batches, lengths)
    except Exception as error:  # no device, an engine that will not build: the row says so
        return BackendResult(config.title, skipped=f"{type(error).__name__}: {error}")
    result = BackendResult(config.title)
    for length in lengths:
        for batch in batches:
            memory = _reset_peak_memory(device)
            ids, mask = random_batch(batch, length, model.vocab_size)
            try:
                latencies = np.asarray(time_shape(backend, ids, mask, seconds))
            except Exception as error:  # out of device memory at batch 128, say: keep the rest
                result.skipped = f"batch {batch} x {length}: {type(error).__name__}: {error}"
                break
            result.rows.append(
                ShapeRow(
                    config.title,
                    batch,
                    length,
                    batch * len(latencies) / float(latencies.sum()),
                    float(np.percentile(latencies, 50) * 1000),
                    float(np.percentile(latencies, 99) * 1000),
                    memory(),
                )
            )
    backend.close()
    return result


def _reset_peak_memory(device: str) -> Callable[[], float | None]:
    """Starts a peak-memory window; the returned function reads it (MB)."""
    if device != "cuda" or find_spec("torch") is None:
        return lambda: None
    import torch

    if not torch.cuda.is_available():
        return lambda: None
    torch.cuda.reset_peak_memory_stats()
    return lambda: torch.cuda.max_memory_allocated() / 2**20 or None


def render(results: list[BackendResult], device_name: str) -> str:
    baseline = {
        (row.batch, row.length): row.sequences_per_second
        for result in results
        if result.title == BASELINE
        for row in result.rows
    }
    lines = [
        f"model only on {device_name}; ratios divide by {BASELINE} at the same batch and length",
        f"{'backend':<28} {'batch':>5} {'len':>4} {'seq/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'MB':>7} {'x eager':>8}",
    ]
    for result in results:
        for row in result.rows:
            base = baseline.get((row.batch, row.length))
            ratio = row.sequences_per_second / base if base else float("nan")
            memory = f"{row.memory_mb:.0f}" if row.memory_mb is not None else "-"
            lines.append(
                f"{row.title:<28} {row.batch:>5} {row.length:>4} {row.sequences_per_second:>10.1f} "
                f"{row.p50_ms:>8.2f} {row.p99_ms:>8.2f} {memory:>7} {ratio:>8.2f}"
            )
        if result.skipped:
            lines.append(f"{result.title:<28} skipped: {result.skipped}")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name())
    return f"CPU ({os.cpu_count()} cores)"


def run(repository: Path, model_name: str, device: str, seconds: float = 2.0) -> str:
    """Every backend of `device` in its own process; the table as text."""
    from benchmarks.e2e import in_own_process_call

    configs = GPU_CONFIGS if device == "cuda" else CPU_CONFIGS
    results = [
        in_own_process_call(bench_config, config, repository, model_name, device, BATCHES, LENGTHS, seconds)
        for config in configs
    ]
    return render(results, device_name(device))
