"""Right-padding of token sequences into the int64 [batch, longest] arrays models take."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]


def pad_right(
    sequences: Sequence[Sequence[int] | Int64Array], length: int | None = None
) -> tuple[Int64Array, Int64Array]:
    """`input_ids` padded with 0 to the longest sequence (or to `length`, for engines
    built for fixed shapes), and the matching attention mask."""
    longest = max(max(len(sequence) for sequence in sequences), length or 0)
    input_ids = np.zeros((len(sequences), longest), dtype=np.int64)
    attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask
