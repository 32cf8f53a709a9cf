"""Transport-free request and response types of the inference core."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Parameter = bool | int | float | str


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    data: npt.NDArray[np.generic]


@dataclass(frozen=True)
class InferenceRequest:
    model_name: str
    inputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    requested_outputs: list[str] = field(default_factory=list)
    """Empty means every output."""
    parameters: dict[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
