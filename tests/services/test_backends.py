"""Every backend that can run here gives the labels ONNX Runtime fp32 gives, within a
stated tolerance on the logits; a backend that cannot run says why."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer
from typer.testing import CliRunner

from infermesh.cli import app
from infermesh.model.build import INT8_WEIGHT_LIMIT
from services.inference.backends import tensorrt as tensorrt_backend
from services.inference.backends.base import BackendUnavailable
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.backends.pytorch import TorchBackend, cuda_available, padded_rows
from services.inference.backends.tensorrt import EngineSpec, cached_engine, length_profiles
from services.inference.server import resolve_backend
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from shared.errors import ModelLoadFailed
from shared.grpc_client import channel
from shared.oip import decode_raw
from shared.padding import pad_right
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import MODEL
from tests.test_pipeline import CLEAR_HEADLINES

#: Largest absolute logit difference accepted between fp32 backends (same weights, other kernels).
FP32_TOLERANCE = 1e-4
TEXTS = [
    *CLEAR_HEADLINES,
    "Regulators open a probe into the bank's lending practices",
    "Retailer beats on revenue but warns of weaker holiday demand",
    "$TSLA deliveries come in below consensus for the second quarter running",
    "Central bank leaves rates unchanged, as expected",
]


def encoded(built_model: Path) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))
    return pad_right([e.ids for e in tokenizer.encode_batch(TEXTS)])


def test_torch_and_onnxruntime_agree_with_onnxruntime_fp32(built_model: Path) -> None:
    ids, mask = encoded(built_model)
    reference = OnnxRuntimeBackend(built_model / "model.fp32.onnx").run(ids, mask)
    torch_cpu = TorchBackend(built_model / "hf", device="cpu").run(ids, mask)
    assert np.abs(torch_cpu - reference).max() < FP32_TOLERANCE
    assert (torch_cpu.argmax(axis=1) == reference.argmax(axis=1)).all()


#: bf16 keeps 8 bits of mantissa: logits move by a few hundredths (0.037 here, 0.071 at most over the
#: 2,388 validation headlines).
BF16_TOLERANCE = 0.25


def test_the_int8_graph_computes_the_same_integers_with_or_without_vnni(built_model: Path) -> None:
    """Without VNNI (AVX2-only CPUs) ONNX Runtime sums pairs of u8 x s8 products in int16:
    weights within INT8_WEIGHT_LIMIT keep every pair sum in range, so an AVX2 machine gets
    the numbers a VNNI/AMX machine gets (full-range weights saturated there)."""
    assert np.iinfo(np.int16).max >= 2 * 255 * INT8_WEIGHT_LIMIT
    graph = onnx.load(str(built_model / "model.int8.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(w.size for w in weights) > 1_000_000, "the int8 graph holds the encoder's quantised weights"
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= INT8_WEIGHT_LIMIT


def test_torch_bf16_keeps_the_fp32_labels_within_its_tolerance(built_model: Path) -> None:
    ids, mask = encoded(built_model)
    reference = OnnxRuntimeBackend(built_model / "model.fp32.onnx").run(ids, mask)
    bf16 = TorchBackend(built_model / "hf", device="cpu", dtype="bf16").run(ids, mask)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - reference).max() < BF16_TOLERANCE
    assert (bf16.argmax(axis=1) == reference.argmax(axis=1)).all()


async def test_the_inference_service_serves_the_same_labels_with_the_torch_backend(
    model_repository: Path, built_model: Path
) -> None:
    ids, mask = encoded(built_model)
    labels = {}
    for backend in ("onnxruntime", "torch"):
        settings = InferenceSettings(
            grpc_port=0, model_repository=model_repository, backend=backend, variant="fp32", torch_dtype="fp32"
        )
        running, core = await start_inference(settings)
        request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[ids.tobytes(), mask.tobytes()])
        for name in ("input_ids", "attention_mask"):
            request.inputs.add(name=name, datatype="INT64", shape=list(ids.shape))
        request.outputs.add(name="label")
        async with channel(f"127.0.0.1:{running.port}") as ch:
            response = await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
        output = response.outputs[0]
        labels[backend] = decode_raw(output.name, output.datatype, output.shape, response.raw_output_contents[0])
        await running.stop(0)
        await core.close()
    assert list(labels["torch"]) == list(labels["onnxruntime"])
    assert {label.decode() for label in labels["torch"]} == {"negative", "neutral", "positive"}


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="onnxruntime-gpu is installed here"
)
def test_onnxruntime_on_cuda_without_onnxruntime_gpu_says_what_to_install(built_model: Path) -> None:
    with pytest.raises(BackendUnavailable, match="install onnxruntime-gpu"):
        OnnxRuntimeBackend(built_model / "model.int8.onnx", device="cuda")


@pytest.mark.skipif(cuda_available(), reason="this machine has a CUDA device")
def test_torch_on_cuda_without_a_gpu_says_so(built_model: Path) -> None:
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        TorchBackend(built_model / "hf", device="cuda")


def test_cuda_graph_row_counts_are_powers_of_two() -> None:
    assert [padded_rows(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]


# --- TensorRT: what can be checked without TensorRT or a GPU ---------------------------------


def test_tensorrt_profiles_cover_every_bucket_up_to_the_models_length() -> None:
    profiles = length_profiles((16, 32, 64, 256), max_batch=64, max_length=128)
    assert [p.length for p in profiles] == [16, 32, 64, 128]
    assert profiles[0].shapes() == ((1, 16), (32, 16), (64, 16))


def test_an_engine_is_cached_under_everything_that_makes_it_valid() -> None:
    spec = EngineSpec(
        onnx_sha256="ab" * 32,
        tensorrt_version="10.9.0",
        gpu="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        profiles=tuple(length_profiles((16, 32), 64, 128)),
        fp16=True,
        workspace_bytes=2 << 30,
    )
    assert spec.cache_key() == replace(spec).cache_key()
    for change in (
        {"onnx_sha256": "cd" * 32},
        {"tensorrt_version": "10.10.0"},
        {"gpu": "NVIDIA A100"},
        {"compute_capability": "8.0"},
        {"profiles": tuple(length_profiles((16,), 64, 128))},
        {"fp16": False},
        {"workspace_bytes": 1 << 30},
    ):
        assert replace(spec, **change).cache_key() != spec.cache_key(), change


def test_a_cached_engine_is_read_not_rebuilt(tmp_path: Path) -> None:
    spec = EngineSpec("ab" * 32, "10.9.0", "gpu", "9.0", tuple(length_profiles((16,), 8, 128)), True, 1 << 30)
    (tmp_path / spec.file_name()).write_bytes(b"serialized engine")
    engine, path, built = cached_engine(tmp_path / "model.fp32.onnx", spec, tmp_path)
    assert (engine, path, built) == (b"serialized engine", tmp_path / spec.file_name(), False)


def test_replicas_building_one_engine_on_a_shared_cache_leave_a_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas share the engine cache on one volume (the GPU overlay): several may build the
    same engine at once. Each must write under its own temporary name, or one's rename
    takes the file another is still writing."""
    spec = EngineSpec("cd" * 32, "10.9.0", "gpu", "9.0", tuple(length_profiles((16,), 8, 128)), True, 1 << 30)
    engines = [bytes([n]) * (4 << 20) for n in range(4)]
    start = threading.Barrier(len(engines))
    monkeypatch.setattr(tensorrt_backend, "build_engine", lambda *_: engines[start.wait()])
    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(lambda _: cached_engine(tmp_path / "m.onnx", spec, tmp_path), engines))
    assert all(built for _, _, built in results)
    assert (tmp_path / spec.file_name()).read_bytes() in engines
    assert json.loads((tmp_path / spec.file_name()).with_suffix(".json").read_text())["workspace_bytes"] == 1 << 30
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="TensorRT is installed here")
async def test_without_tensorrt_the_backend_says_why_and_what_to_install(model_repository: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"pip install 'infermesh\[tensorrt\]'"):
        cached_engine(model_repository / MODEL / "1" / "model.fp32.onnx", replace_spec(), model_repository / "e")
    settings = InferenceSettings(grpc_port=0, model_repository=model_repository, backend="tensorrt")
    with pytest.raises(ModelLoadFailed, match="needs TensorRT 10"):
        await start_inference(settings)
    result = CliRunner().invoke(app, ["build-engine", "--repository", str(model_repository)])
    assert result.exit_code == 2 and "needs TensorRT 10" in result.output


def replace_spec() -> EngineSpec:
    return EngineSpec("00" * 32, "none", "none", "0.0", tuple(length_profiles((16,), 8, 128)), True, 1 << 30)


def test_the_default_service_does_not_load_torch(model_repository: Path) -> None:
    """Choosing the backend must not import torch (about 200 MB) into an ONNX Runtime service."""
    probe = (
        "import sys\n"
        "from services.inference.server import build_core\n"
        "from services.inference.settings import InferenceSettings\n"
        f"build_core(InferenceSettings(model_repository={str(model_repository)!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert completed.stdout.strip() == "False"


def test_auto_never_picks_tensorrt_even_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT has never run: `auto` must not make it the default wherever the package and
    a GPU happen to be present. It is chosen only by name."""
    fake = types.ModuleType("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr("services.inference.backends.pytorch.cuda_available", lambda: True)
    assert find_spec("tensorrt") is not None, "the stand-in must look installed"

    backend, _ = resolve_backend(InferenceSettings(backend="auto"))
    assert backend == "onnxruntime"
    assert resolve_backend(InferenceSettings(backend="tensorrt")) == ("tensorrt", "cuda")
