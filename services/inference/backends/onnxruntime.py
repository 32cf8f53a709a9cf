"""ONNX Runtime: on CPU (the default here), or on CUDA where `onnxruntime-gpu` is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from services.inference.backends.base import BackendUnavailable


class OnnxRuntimeBackend:
    name = "onnxruntime"
    static_shapes = False

    def __init__(
        self, model_path: Path, intra_op_threads: int = 0, allow_spinning: bool = False, device: str = "cpu"
    ) -> None:
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable(
                    "ONNX Runtime has no CUDAExecutionProvider here: install onnxruntime-gpu "
                    "(instead of onnxruntime) on a machine with an NVIDIA GPU, or use device cpu"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Spinning threads burn the cores the tokenizer and post-processor share with us.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self._session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.model_path = model_path

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        (logits,) = self._session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        del self._session
