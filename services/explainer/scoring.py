"""Calibrated probabilities for token sequences through the inference service's OIP v2
API, so occlusion and faithfulness work with whatever backend serves the model.

The explainer asks for logits and calibrates them itself, one head at a time, with
`shared.calibration.calibrated` (the inference service's own rule): `logits` exists for
every version, on our inference service and on a stock Triton serving the same graph. A
version with several heads has every head's columns side by side in the graph's logits;
where the service answers `logits` with the primary head's columns alone, a further
head's come from its own output, `<head>_logits`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
import numpy.typing as npt

from shared import oip
from shared.calibration import calibrated
from shared.errors import InfermeshError, from_grpc_error
from shared.model_repository import Head
from shared.padding import pad_right
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc

LOGITS = "logits"


class OipProbabilities:
    """One model version's probabilities; versions share the caller's channel."""

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceAsyncStub,
        model_name: str,
        model_version: str,
        num_logits: int,
        rows_per_call: int = 64,
    ) -> None:
        self._stub = stub
        self.model_name = model_name
        self.model_version = model_version
        self.num_logits = num_logits
        """Columns of the version's graph logits: every head's labels."""
        self.rows_per_call = rows_per_call
        self._outputs: dict[str, str] = {}
        """The output each head's columns come from, once the service has shown it."""

    async def probabilities(
        self, sequences: Sequence[Sequence[int]], timeout: float, head: Head
    ) -> npt.NDArray[np.float64]:
        """Row i: `head`'s calibrated probabilities of sequences[i] (sequences need no
        padding), over its labels alone."""
        return calibrated(await self.logits(sequences, timeout, head), head)

    async def logits(self, sequences: Sequence[Sequence[int]], timeout: float, head: Head) -> npt.NDArray[np.float64]:
        """Row i: the served logits of sequences[i] in `head`'s columns."""
        output = self._outputs.get(head.name, LOGITS)
        columns = self._columns(await self._infer(sequences, timeout, output), output, head)
        if columns is None and output == LOGITS and not head.primary:
            # This service answers `logits` with the primary head's columns only.
            output = head.output_name(LOGITS)
            columns = self._columns(await self._infer(sequences, timeout, output), output, head)
        if columns is None:
            raise InfermeshError(
                f"the inference service's {output!r} for {self.model_name} version {self.model_version} does not "
                f"hold head {head.name!r}'s {len(head.labels)} columns (the version has {self.num_logits} logits)"
            )
        self._outputs[head.name] = output
        return columns

    def _columns(self, logits: npt.NDArray[np.float64], output: str, head: Head) -> npt.NDArray[np.float64] | None:
        """`head`'s columns of `output`: a slice of every head's logits, or all of the
        head's own output; None when `output` holds neither."""
        width = logits.shape[-1]
        if width == self.num_logits:
            return logits[:, head.start : head.stop]
        if output == head.output_name(LOGITS) and width == len(head.labels):
            return logits
        return None

    async def _infer(self, sequences: Sequence[Sequence[int]], timeout: float, output: str) -> npt.NDArray[np.float64]:
        groups = [sequences[i : i + self.rows_per_call] for i in range(0, len(sequences), self.rows_per_call)]
        try:
            parts = await asyncio.gather(*(self._call(group, timeout, output) for group in groups))
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error) from None
        return np.concatenate(parts)

    async def _call(self, sequences: Sequence[Sequence[int]], timeout: float, output: str) -> npt.NDArray[np.float64]:
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
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=output)],
            raw_input_contents=[input_ids.tobytes(), attention_mask.tobytes()],
        )
        response = await self._stub.ModelInfer(request, timeout=timeout)
        answered = response.outputs[0]
        array = oip.decode_raw(answered.name, answered.datatype, list(answered.shape), response.raw_output_contents[0])
        return np.asarray(array, dtype=np.float64).reshape(len(sequences), -1)
