"""What every execution backend (ONNX Runtime now, TensorRT and torch later) provides."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared.errors import ModelLoadFailed


class BackendUnavailable(ModelLoadFailed):
    """A backend this machine or install cannot run, and why (missing package, no GPU)."""


class Backend(Protocol):
    """Runs a sequence classifier on one padded batch.

    `run` is blocking and may be called from worker threads; it receives int64
    `input_ids` and `attention_mask` of shape [batch, sequence] and returns float32
    logits of shape [batch, num_labels], one row per input row.
    """

    name: str
    static_shapes: bool
    """True when batches must be padded to their length bucket's edge (engines and CUDA
    graphs built per shape); False pads to the batch's longest sequence."""

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Logits for the batch."""
        ...

    def close(self) -> None:
        """Releases the backend's resources."""
        ...
