"""Calibrated probabilities for token sequences through the inference service's OIP v2
API, so occlusion and faithfulness work with whatever backend serves the model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
import numpy.typing as npt

from shared import oip
from shared.errors import from_grpc_error
from shared.padding import pad_right
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc


class OipProbabilities:
    """One model version's probabilities; versions share the caller's channel."""

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceAsyncStub,
        model_name: str,
        model_version: str,
        rows_per_call: int = 64,
    ) -> None:
        self._stub = stub
        self.model_name = model_name
        self.model_version = model_version
        self.rows_per_call = rows_per_call

    async def probabilities(self, sequences: Sequence[Sequence[int]], timeout: float) -> npt.NDArray[np.float64]:
        """Row i: the calibrated probabilities of sequences[i] (sequences need no padding)."""
        groups = [sequences[i : i + self.rows_per_call] for i in range(0, len(sequences), self.rows_per_call)]
        try:
            parts = await asyncio.gather(*(self._call(group, timeout) for group in groups))
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None
        return np.concatenate(parts)

    async def _call(self, sequences: Sequence[Sequence[int]], timeout: float) -> npt.NDArray[np.float64]:
        input_ids, attention_mask = pad_right(sequences)
        request = pb.ModelInferRequest(
            model_name=self.model_name,
            model_version=self.model_version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=list(input_ids.shape)),
                pb.ModelInferRequest.InferInputTensor(
                    name="attention_mask", datatype="INT64", shape=list(attention_mask.shape)
                ),
            ],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            raw_input_contents=[input_ids.tobytes(), attention_mask.tobytes()],
        )
        response = await self._stub.ModelInfer(request, timeout=timeout)
        output = response.outputs[0]
        array = oip.decode_raw(output.name, output.datatype, list(output.shape), response.raw_output_contents[0])
        return np.asarray(array, dtype=np.float64)
