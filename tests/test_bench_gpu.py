"""The GPU benchmark table's machinery, run on the CPU backends (the CUDA rows need a GPU)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import onnxruntime
import pytest
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


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_a_missing_tensorrt_is_a_row_that_says_so() -> None:
    tensorrt = next(config for config in GPU_CONFIGS if config.backend == "tensorrt")
    assert unavailable(tensorrt, "cuda") == "tensorrt is not installed"


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="onnxruntime-gpu is installed here"
)
def test_a_missing_cuda_provider_is_a_row_that_says_what_to_install() -> None:
    cuda_ep = next(config for config in GPU_CONFIGS if config.backend == "onnxruntime")
    assert "onnxruntime-gpu" in unavailable(cuda_ep, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only a machine without CUDA can show this")
def test_a_backend_that_fails_to_start_is_a_skipped_row_not_a_crash(built_model: Path) -> None:
    eager = next(config for config in GPU_CONFIGS if config.title == "torch eager fp32")
    result = bench_config(eager, built_model.parent.parent, MODEL, "cuda", batches=(1,), lengths=(8,))
    assert not result.rows and "BackendUnavailable" in result.skipped and "CUDA" in result.skipped
    assert render([result], "none").splitlines()[-1].startswith("torch eager fp32             skipped: ")
