"""Length-bucketed batching in the inference core, without a network: which sequences
share a batch and what shapes a backend receives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from services.inference.core import InferenceCore, VersionPolicy
from services.inference.types import InferenceRequest, Tensor
from shared.batching import BatchPolicy
from shared.errors import ModelLoadFailed
from shared.model_repository import ModelConfig, ModelRepository
from tests.conftest import MODEL, link_version


class ShapeRecorder:
    """A backend that records the shapes and attention it gets and returns zero logits."""

    name = "recorder"

    def __init__(self, static_shapes: bool, labels: int) -> None:
        self.static_shapes = static_shapes
        self.labels = labels
        self.batches: list[tuple[tuple[int, int], list[int]]] = []

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        self.batches.append((input_ids.shape, sorted(int(n) for n in attention_mask.sum(axis=1))))
        return np.zeros((input_ids.shape[0], self.labels), dtype=np.float32)

    def close(self) -> None:
        pass


def request(length: int, version: str = "") -> InferenceRequest:
    ids = np.full((1, length), 1000, dtype=np.int64)
    return InferenceRequest(
        model_name=MODEL,
        model_version=version,
        inputs=[Tensor("input_ids", "INT64", ids), Tensor("attention_mask", "INT64", np.ones_like(ids))],
    )


async def run_lengths(model_repository: Path, static_shapes: bool, lengths: list[int]) -> ShapeRecorder:
    recorders: list[ShapeRecorder] = []

    def factory(config: ModelConfig, path: Path) -> ShapeRecorder:
        recorders.append(ShapeRecorder(static_shapes, config.num_logits))
        return recorders[-1]

    policy = BatchPolicy(max_batch_size=16, max_queue_delay_seconds=0.05, length_buckets=(8, 16, 32))
    core = InferenceCore(ModelRepository(model_repository), factory, policy)
    await core.load()
    await asyncio.gather(*(core.infer(request(n)) for n in lengths))
    await core.close()
    return recorders[0]


async def test_sequences_are_batched_by_bucket_and_padded_to_their_longest(model_repository: Path) -> None:
    recorder = await run_lengths(model_repository, static_shapes=False, lengths=[5, 20, 7, 12, 6, 30, 14])
    # The oldest waiting sequence's bucket goes first: (5, 7, 6), then (20, 30), then (12, 14),
    # each padded to its own longest.
    assert sorted(recorder.batches) == [((2, 14), [12, 14]), ((2, 30), [20, 30]), ((3, 7), [5, 6, 7])]


async def test_static_shape_backends_get_the_bucket_edge(model_repository: Path) -> None:
    recorder = await run_lengths(model_repository, static_shapes=True, lengths=[5, 20, 7, 12])
    assert sorted(recorder.batches) == [((1, 16), [12]), ((1, 32), [20]), ((2, 8), [5, 7])]


async def test_a_model_version_can_set_its_own_batching(built_model: Path, tmp_path: Path) -> None:
    """`dynamic_batching` in one version's config.json wins over the service's policy for
    that version; the other version keeps the service's."""
    link_version(tmp_path, built_model, "1")
    link_version(tmp_path, built_model, "2", dynamic_batching={"max_batch_size": 2, "length_buckets": [64]})
    recorders: dict[str, ShapeRecorder] = {}

    def factory(config: ModelConfig, path: Path) -> ShapeRecorder:
        recorders[config.version] = ShapeRecorder(static_shapes=True, labels=config.num_logits)
        return recorders[config.version]

    policy = BatchPolicy(max_batch_size=16, max_queue_delay_seconds=0.05, length_buckets=(8, 16, 32))
    core = InferenceCore(ModelRepository(tmp_path), factory, policy, version_policy=VersionPolicy(all=True))
    await core.load()
    for version in ("1", "2"):
        await asyncio.gather(*(core.infer(request(5, version)) for _ in range(5)))
    await core.close()
    assert recorders["1"].batches == [((5, 8), [5] * 5)]
    assert sorted(recorders["2"].batches) == [((1, 64), [5]), ((2, 64), [5, 5]), ((2, 64), [5, 5])]


async def test_invalid_model_batching_fails_that_load_with_the_reason(built_model: Path, tmp_path: Path) -> None:
    link_version(tmp_path, built_model, "1", dynamic_batching={"length_buckets": [64, 32]})
    core = InferenceCore(ModelRepository(tmp_path), lambda config, path: ShapeRecorder(False, 3), BatchPolicy())
    with pytest.raises(ModelLoadFailed, match="length_buckets must be positive and ascending"):
        await core.load()
    await core.close()
