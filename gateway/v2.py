"""The KServe v2 (Open Inference Protocol) REST binding, mapped onto the inference
service's gRPC API: JSON tensors in, JSON tensors out, errors as problem+json."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from gateway.admission import admit_caller
from gateway.routes import PROBLEMS
from shared import oip
from shared.errors import InvalidInput, from_grpc_error
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] = Field(description="Row-major values; nested lists are flattened.")


class RequestOutput(BaseModel):
    name: str


class InferenceRequest(BaseModel):
    id: str = ""
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] = Field(default_factory=list)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


def _stub(request: Request) -> pb_grpc.GRPCInferenceServiceAsyncStub:
    stub: pb_grpc.GRPCInferenceServiceAsyncStub = request.app.state.inference
    return stub


def _flatten(values: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for value in values:
        if isinstance(value, list):
            flat.extend(_flatten(value))
        else:
            flat.append(value)
    return flat


def _input_to_pb(tensor: RequestInput) -> pb.ModelInferRequest.InferInputTensor:
    field = oip.CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype!r} cannot travel as JSON")
    values = _flatten(tensor.data)
    try:
        message = pb.ModelInferRequest.InferInputTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    except ValueError:
        raise InvalidInput(f"input {tensor.name!r}: a shape dimension does not fit int64") from None
    try:
        if tensor.datatype == "BYTES":
            getattr(message.contents, field).extend(str(v).encode() for v in values)
        else:
            getattr(message.contents, field).extend(values)
    except (TypeError, ValueError):
        raise InvalidInput(f"input {tensor.name!r}: data does not fit datatype {tensor.datatype}") from None
    return message


def _output_from_pb(response: pb.ModelInferResponse, index: int) -> ResponseOutput:
    tensor = response.outputs[index]
    array = oip.decode_raw(tensor.name, tensor.datatype, list(tensor.shape), response.raw_output_contents[index])
    flat = array.reshape(-1)
    data = flat.tolist()
    if tensor.datatype == "BYTES":
        data = [item.decode("utf-8", "replace") for item in data]
    if tensor.datatype in ("FP32", "FP64"):
        data = [float(np.round(value, 7)) for value in data]
    return ResponseOutput(name=tensor.name, shape=list(tensor.shape), datatype=tensor.datatype, data=data)


router = APIRouter(prefix="/v2", tags=["KServe v2"], responses=PROBLEMS)


async def _call(coroutine: Any) -> Any:
    try:
        return await coroutine
    except grpc.aio.AioRpcError as error:
        raise from_grpc_error(error) from None


@router.get("/health/live")
async def live(request: Request) -> dict[str, bool]:
    reply = await _call(_stub(request).ServerLive(pb.ServerLiveRequest(), timeout=5))
    return {"live": reply.live}


@router.get("/health/ready")
async def ready(request: Request) -> dict[str, bool]:
    reply = await _call(_stub(request).ServerReady(pb.ServerReadyRequest(), timeout=5))
    return {"ready": reply.ready}


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    reply = await _call(_stub(request).ServerMetadata(pb.ServerMetadataRequest(), timeout=5))
    return {"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)}


@router.get("/models/{name}", response_model=ModelMetadata)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
async def model_metadata(name: str, request: Request, version: str = "") -> ModelMetadata:
    reply = await _call(_stub(request).ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=5))
    return ModelMetadata(
        name=reply.name,
        versions=list(reply.versions),
        platform=reply.platform,
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in reply.inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in reply.outputs],
    )


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str = "") -> dict[str, Any]:
    reply = await _call(_stub(request).ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=5))
    return {"name": name, "ready": reply.ready}


@router.post("/models/{name}/infer", response_model=InferenceResponse, dependencies=[Depends(admit_caller)])
@router.post(
    "/models/{name}/versions/{version}/infer", response_model=InferenceResponse, dependencies=[Depends(admit_caller)]
)
async def infer(name: str, body: InferenceRequest, request: Request, version: str = "") -> InferenceResponse:
    message = pb.ModelInferRequest(
        model_name=name,
        model_version=version,
        id=body.id,
        inputs=[_input_to_pb(tensor) for tensor in body.inputs],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o.name) for o in body.outputs],
    )
    settings = request.app.state.settings
    reply = await _call(_stub(request).ModelInfer(message, timeout=settings.request_timeout_seconds))
    return InferenceResponse(
        model_name=reply.model_name,
        model_version=reply.model_version,
        id=reply.id,
        outputs=[_output_from_pb(reply, index) for index in range(len(reply.outputs))],
    )
