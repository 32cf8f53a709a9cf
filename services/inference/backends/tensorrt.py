"""TensorRT 10 on an NVIDIA GPU, from the version's fp32 ONNX graph.

The engine has one optimization profile per sequence-length bucket (lengths fixed at the
bucket's edge, batch from 1 to the maximum), FP16 kernels, and a workspace limit. Building
takes minutes, so engines are cached on disk under a key made of everything that makes
an engine valid: the ONNX file's hash, the TensorRT version, the GPU and its compute
capability, the profiles and the precision. `infermesh build-engine` builds ahead of time.

At run time each profile has its own execution context; a batch (padded to its bucket's
edge by the batcher, since `static_shapes` is set) goes to the context of its bucket:
`set_input_shape`, `set_tensor_address` for every I/O tensor, then `execute_async_v3` on
a CUDA stream. Device buffers and the stream come from torch, which the project pins.

This module imports without TensorRT; only building and running need it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.inference.backends.base import BackendUnavailable

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the tensorrt backend needs TensorRT 10 and an NVIDIA GPU with CUDA 12: "
    "pip install 'infermesh[tensorrt]' on such a machine"
)
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"


@dataclass(frozen=True)
class Profile:
    """One optimization profile: sequences exactly `length` long, 1 to `max_batch` rows."""

    length: int
    opt_batch: int
    max_batch: int

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) shapes of each input."""
        return (1, self.length), (self.opt_batch, self.length), (self.max_batch, self.length)


def length_profiles(buckets: Sequence[int], max_batch: int, max_length: int) -> list[Profile]:
    """A profile per bucket edge up to the model's max length (which is always an edge)."""
    edges = sorted({edge for edge in buckets if edge < max_length} | {max_length})
    opt = max(1, max_batch // 2)
    return [Profile(edge, opt, max_batch) for edge in edges]


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine depends on; its hash names the cached engine file."""

    onnx_sha256: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    profiles: tuple[Profile, ...]
    fp16: bool
    workspace_bytes: int

    def cache_key(self) -> str:
        document = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(document.encode()).hexdigest()[:24]

    def file_name(self) -> str:
        return f"{self.cache_key()}.plan"


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    return tensorrt


def _cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA device; torch sees none")
    return torch


def engine_spec(
    onnx_sha256: str, profiles: Sequence[Profile], fp16: bool = True, workspace_bytes: int = 2 << 30
) -> EngineSpec:
    """The spec for this machine's GPU and TensorRT."""
    trt, torch = _tensorrt(), _cuda()
    major, minor = torch.cuda.get_device_capability()
    return EngineSpec(
        onnx_sha256=onnx_sha256,
        tensorrt_version=str(trt.__version__),
        gpu=str(torch.cuda.get_device_name()),
        compute_capability=f"{major}.{minor}",
        profiles=tuple(profiles),
        fp16=fp16,
        workspace_bytes=workspace_bytes,
    )


ProgressCallback = Callable[[str, int, int], None]
"""(phase, steps done, steps in phase), called as TensorRT reports its progress."""


def build_engine(onnx_path: Path, spec: EngineSpec, progress: ProgressCallback | None = None) -> bytes:
    """Parses the ONNX graph and builds a serialized engine for `spec`."""
    trt = _tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    if spec.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for profile_spec in spec.profiles:
        profile = builder.create_optimization_profile()
        for name in INPUTS:
            profile.set_shape(name, *profile_spec.shapes())
        config.add_optimization_profile(profile)
    if progress is not None:
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"TensorRT could not build an engine for {onnx_path.name} (see the log)")
    return bytes(serialized)


def _progress_monitor(trt: Any, progress: ProgressCallback) -> Any:
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            progress(phase_name, step + 1, self._steps.get(phase_name, step + 1))
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            steps = self._steps.get(phase_name, 0)
            progress(phase_name, steps, steps)

    return Monitor()


def cached_engine(
    onnx_path: Path, spec: EngineSpec, cache_dir: Path, progress: ProgressCallback | None = None
) -> tuple[bytes, Path, bool]:
    """(engine bytes, its file, whether it was built now): read from `cache_dir`, or built
    and written there (via a temporary name, so a crash leaves no half engine)."""
    path = cache_dir / spec.file_name()
    if path.is_file():
        return path.read_bytes(), path, False
    engine = build_engine(onnx_path, spec, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Replicas may share the cache on one volume: each writes its own temporary file and
    # renames it whole, so a reader sees no engine or a complete one, never a mix.
    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    partial.write_bytes(engine)
    partial.replace(path)
    described = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.json.partial")
    described.write_text(json.dumps(asdict(spec), indent=2) + "\n")
    described.replace(path.with_suffix(".json"))
    return engine, path, True


class TensorRTBackend:
    name = "tensorrt"
    static_shapes = True

    def __init__(self, engine: bytes, profiles: Sequence[Profile], num_labels: int) -> None:
        trt, torch = _tensorrt(), _cuda()
        self._torch = torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise BackendUnavailable("TensorRT could not load the cached engine (built by another version?)")
        self._stream = torch.cuda.Stream()
        self._profiles = {profile.length: index for index, profile in enumerate(profiles)}
        self._max_batch = {profile.length: profile.max_batch for profile in profiles}
        self._num_labels = num_labels
        self._contexts = []
        for index in range(len(profiles)):
            context = self._engine.create_execution_context()
            context.set_optimization_profile_async(index, self._stream.cuda_stream)
            self._contexts.append(context)
        self._stream.synchronize()
        self._locks = [threading.Lock() for _ in profiles]  # one batch per context at a time

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        rows, length = input_ids.shape
        edge = next((edge for edge in sorted(self._profiles) if edge >= length), None)
        if edge is None:
            raise ValueError(f"no engine profile for length {length}; profiles: {sorted(self._profiles)}")
        if edge != length:  # the batcher pads to its buckets; these are the engine's
            input_ids = np.pad(input_ids, ((0, 0), (0, edge - length)))
            attention_mask = np.pad(attention_mask, ((0, 0), (0, edge - length)))
        index = self._profiles[edge]
        if rows > self._max_batch[edge]:
            raise ValueError(f"batch of {rows} exceeds the engine's {self._max_batch[edge]}")
        torch = self._torch
        with self._locks[index], torch.cuda.stream(self._stream):
            context = self._contexts[index]
            inputs = {
                "input_ids": torch.from_numpy(input_ids).to("cuda", non_blocking=True),
                "attention_mask": torch.from_numpy(attention_mask).to("cuda", non_blocking=True),
            }
            logits = torch.empty((rows, self._num_labels), dtype=torch.float32, device="cuda")
            for name, tensor in inputs.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            context.set_tensor_address(OUTPUT, logits.data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = logits.cpu()  # waits for the stream
        return np.asarray(result.numpy(), dtype=np.float32)

    def close(self) -> None:
        self._contexts.clear()
        del self._engine
