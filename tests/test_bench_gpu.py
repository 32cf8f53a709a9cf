"""The GPU benchmark table's machinery, run on the CPU backends (the CUDA rows need a GPU)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import onnxruntime
import torch

from benchmarks.gpu import CPU_CONFIGS, GPU_CONFIGS, bench_config, render, unavailable
from tests.conftest import MODEL


def test_every_cpu_backend_measures_every_shape_and_the_table_has_ratios(built_model: Path) -> None:
    repository = built_model.parent.parent
    results = [
        bench_config(config, repository, MODEL, "cpu", batches=(1, 4), lengths=(8, 16), seconds=0.05)
        for config in CPU_CONFIGS
    ]
    for result in results:
        assert not result.skipped
        assert [(row.batch, row.length) for row in result.rows] == [(1, 8), (4, 8), (1, 16), (4, 16)]
        assert all(row.sequences_per_second > 0 and 0 < row.p50_ms <= row.p99_ms for row in result.rows)
    table = render(results, "CPU").splitlines()
    assert len(table) == 2 + 4 * len(CPU_CONFIGS)
    assert all(line.endswith("1.00") for line in table[2:6])  # the baseline against itself


def test_a_gpu_backend_that_cannot_run_here_says_why() -> None:
    tensorrt = next(config for config in GPU_CONFIGS if config.backend == "tensorrt")
    if find_spec("tensorrt") is None:
        assert unavailable(tensorrt, "cuda") == "tensorrt is not installed"
    cuda_ep = next(config for config in GPU_CONFIGS if config.backend == "onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "onnxruntime-gpu" in unavailable(cuda_ep, "cuda")


def test_a_backend_that_fails_to_start_is_a_skipped_row_not_a_crash(built_model: Path) -> None:
    if torch.cuda.is_available():
        return  # only a machine without CUDA can show this
    eager = next(config for config in GPU_CONFIGS if config.title == "torch eager fp32")
    result = bench_config(eager, built_model.parent.parent, MODEL, "cuda", batches=(1,), lengths=(8,))
    assert not result.rows and "BackendUnavailable" in result.skipped and "CUDA" in result.skipped
    assert render([result], "none").splitlines()[-1].startswith("torch eager fp32             skipped: ")
