"""PyTorch on CPU or CUDA, from the version's merged transformers weights (`hf/`).

On CPUs with AMX the model can run in bf16 (the weights cast once; about 1.8x ONNX
Runtime int8 at 32 tokens and 3x at 128 on our development machine, see docs/backends.md).
On CUDA it runs in fp16 (logits returned as fp32) and, with CUDA graphs on, one
graph is captured per (batch, length) shape the first time it is seen: batches are padded
to their length bucket's edge (`static_shapes`) and their row count to the next power of
two, so a handful of graphs cover all traffic. On CPU it is the plain eager model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.inference.backends.base import BackendUnavailable


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where bf16 runs
    several times faster than fp32 for this model."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def auto_dtype(device: str) -> str:
    """fp16 on CUDA, bf16 on CPUs with AMX, else fp32."""
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_has_amx_bf16() else "fp32"


def padded_rows(rows: int) -> int:
    """The row count a CUDA graph is captured for: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        hf_folder: Path,
        device: str = "cpu",
        dtype: str = "fp32",
        cuda_graphs: bool = True,
        threads: int = 0,
        warmup: bool = True,
    ) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification
        except ImportError as error:
            raise BackendUnavailable(
                f"the torch backend needs torch and transformers ({error.name} is missing)"
            ) from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("the torch backend was asked for CUDA, but torch sees no CUDA device")
        if not (hf_folder / "config.json").is_file():
            raise BackendUnavailable(f"the torch backend needs the version's transformers weights in {hf_folder.name}/")
        self._torch = torch
        self.device = torch.device(device)
        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes or (dtype == "fp16" and device != "cuda"):
            raise BackendUnavailable(f"the torch backend runs fp32 or bf16 on CPU and fp16 on CUDA, not {dtype}")
        self.dtype = dtype
        model = AutoModelForSequenceClassification.from_pretrained(hf_folder, dtype=dtypes[dtype])
        self._model: Any = model.eval().to(self.device)
        self.static_shapes = device == "cuda" and cuda_graphs
        self._graphs: dict[tuple[int, int], tuple[Any, Any, Any, Any]] = {}
        self._lock = threading.Lock()  # graph capture and replay share static buffers
        if warmup:
            self.run(np.ones((1, 8), dtype=np.int64), np.ones((1, 8), dtype=np.int64))

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode():
            if self.static_shapes:
                return self._replay(input_ids, attention_mask)
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            logits = self._model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
            return np.asarray(logits.float().cpu().numpy(), dtype=np.float32)

    def _replay(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        torch = self._torch
        rows, length = input_ids.shape
        shape = (padded_rows(rows), length)
        with self._lock:
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(shape)
            graph, static_ids, static_mask, static_logits = self._graphs[shape]
            static_ids.zero_()
            static_mask.zero_()
            static_mask[rows:, 0] = 1  # padding rows attend to one token: no all-masked softmax
            static_ids[:rows].copy_(torch.from_numpy(input_ids))
            static_mask[:rows].copy_(torch.from_numpy(attention_mask))
            graph.replay()
            return np.asarray(static_logits[:rows].float().cpu().numpy(), dtype=np.float32)

    def _capture(self, shape: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
        torch = self._torch
        static_ids = torch.zeros(shape, dtype=torch.int64, device=self.device)
        static_mask = torch.ones(shape, dtype=torch.int64, device=self.device)
        token_types = torch.zeros(shape, dtype=torch.int64, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs outside the graph, as CUDA graphs require
            for _ in range(3):
                self._model(input_ids=static_ids, attention_mask=static_mask, token_type_ids=token_types)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._model(
                input_ids=static_ids, attention_mask=static_mask, token_type_ids=token_types
            ).logits
        return graph, static_ids, static_mask, static_logits

    def close(self) -> None:
        self._graphs.clear()
        del self._model
