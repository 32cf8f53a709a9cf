"""The OIP v2 wire contract: ours must match the canonical field numbers that stock
clients compile in. tritonclient's descriptors are read in a subprocess because both
register `inference.*` in protobuf's global pool."""

from __future__ import annotations

import json
import subprocess
import sys

from google.protobuf.descriptor import Descriptor

from shared.pb import grpc_predict_v2_pb2 as ours

MESSAGES = [
    "ServerLiveResponse",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelMetadataResponse.TensorMetadata",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferRequest.InferInputTensor",
    "ModelInferRequest.InferRequestedOutputTensor",
    "ModelInferResponse",
    "ModelInferResponse.InferOutputTensor",
    "ModelRepositoryParameter",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "RepositoryIndexResponse.ModelIndex",
    "RepositoryModelLoadRequest",
    "RepositoryModelUnloadRequest",
]

DUMP = """
import json, sys
from tritonclient.grpc import service_pb2 as pb
out = {}
for path in sys.argv[1:]:
    d = pb.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
    for part in path.split(".")[1:]:
        d = d.nested_types_by_name[part]
    out[path] = {f.name: [f.number, f.type] for f in d.fields}
methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
out["methods"] = {n: [m.input_type.full_name, m.output_type.full_name] for n, m in methods.items()}
print(json.dumps(out))
"""


def _descriptor(path: str) -> Descriptor:
    descriptor = ours.DESCRIPTOR.message_types_by_name[path.split(".", maxsplit=1)[0]]
    for part in path.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def test_oip_messages_and_methods_match_tritons() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", DUMP, *MESSAGES], capture_output=True, text=True, check=True, timeout=60
    )
    triton = json.loads(completed.stdout)
    for path in MESSAGES:
        mine = {f.name: [f.number, f.type] for f in _descriptor(path).fields}
        assert mine == triton[path], path
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.DESCRIPTOR.package == "inference"
    for name, method in service.methods_by_name.items():
        assert triton["methods"][name] == [method.input_type.full_name, method.output_type.full_name]
