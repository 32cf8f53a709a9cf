"""OIP v2 protobuf messages to and from the inference core's types."""

from __future__ import annotations

from pathlib import PurePath

from services.inference.backends.base import Backend
from services.inference.types import InferenceRequest, InferenceResponse, ModelMetadata, Parameter, Tensor
from shared import oip
from shared.errors import InvalidInput
from shared.model_repository import ModelConfig
from shared.pb import grpc_predict_v2_pb2 as pb

#: ModelMetadata's response headers (gRPC initial metadata) naming what serves the version
#: asked about: the execution backend ("onnxruntime", "torch", "tensorrt") and, where the
#: backend knows it, the variant it runs (a config.json variant such as "int8" or "fp32" for
#: ONNX Runtime, the dtype for torch). Headers, not message fields: neither Triton's nor
#: KServe's ModelMetadataResponse has parameters, `platform` is Triton's model-format name
#: ("onnxruntime_onnx"), and stock clients ignore headers they do not know.
BACKEND_METADATA_KEY = "infermesh-backend"
VARIANT_METADATA_KEY = "infermesh-variant"


def parameter_value(parameter: pb.InferParameter) -> Parameter:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidInput("a parameter has no value")
    value: Parameter = getattr(parameter, choice)
    return value


def _has_typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return tensor.HasField("contents") and any(
        len(getattr(tensor.contents, f)) for f in set(oip.CONTENTS_FIELDS.values())
    )


def request_from_pb(request: pb.ModelInferRequest) -> InferenceRequest:
    """Decodes typed or raw inputs; a request must use one form for all its inputs."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents entries; "
            "send one raw entry per input or use typed contents for all"
        )
    inputs: list[Tensor] = []
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            if _has_typed_contents(tensor):
                raise InvalidInput(
                    f"input {tensor.name!r} has typed contents while the request uses raw_input_contents; "
                    "mixing both is not allowed"
                )
            data = oip.decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            field = oip.CONTENTS_FIELDS.get(tensor.datatype)
            if field is None:
                oip.numpy_dtype(tensor.name, tensor.datatype)  # raises for unknown datatypes
                raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data must be sent as raw_input_contents")
            data = oip.decode_typed(tensor.name, tensor.datatype, shape, getattr(tensor.contents, field))
        inputs.append(Tensor(tensor.name, tensor.datatype, data))
    return InferenceRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=inputs,
        requested_outputs=[output.name for output in request.outputs],
        parameters={key: parameter_value(value) for key, value in request.parameters.items()},
    )


def response_to_pb(response: InferenceResponse) -> pb.ModelInferResponse:
    """Outputs travel as raw_output_contents, as Triton sends them."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.data.shape))
        message.raw_output_contents.append(oip.encode_raw(tensor.data, tensor.datatype))
    return message


def metadata_to_pb(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in metadata.inputs
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in metadata.outputs
        ],
    )


def served_variant(config: ModelConfig, backend: Backend) -> str:
    """The variant `backend` runs of `config`'s version; "" where it cannot say (TensorRT
    builds its engine's precision from the fp32 graph and settings it does not keep)."""
    if backend.name == "onnxruntime":
        path = PurePath(getattr(backend, "model_path", ""))
        for variant, file in config.variants.items():
            parts = PurePath(file).parts
            if parts and path.parts[-len(parts) :] == parts:
                return variant
        return ""
    if backend.name == "torch":
        return str(getattr(backend, "dtype", ""))
    return ""


def served_metadata(config: ModelConfig, backend: Backend) -> tuple[tuple[str, str], ...]:
    """ModelMetadata's response headers for a version served by `backend`."""
    variant = served_variant(config, backend)
    headers = ((BACKEND_METADATA_KEY, backend.name),)
    return (*headers, (VARIANT_METADATA_KEY, variant)) if variant else headers
