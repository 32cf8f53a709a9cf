"""Run as a separate process by test_triton_client.py: tritonclient registers the
`inference.*` protobuf symbols too, so it cannot share a process with our generated code
(exactly as with any Triton client program). Prints what it saw as JSON."""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as triton
from tokenizers import Tokenizer
from tritonclient.grpc import service_pb2, service_pb2_grpc


def main(url: str, tokenizer_path: str, model: str, texts: list[str]) -> dict[str, object]:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)

    client = triton.InferenceServerClient(url=url)
    seen: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model, as_json=True),
        "server": client.get_server_metadata(as_json=True),
        "index": client.get_model_repository_index(as_json=True),
    }
    inputs = [
        triton.InferInput("input_ids", list(ids.shape), "INT64"),
        triton.InferInput("attention_mask", list(mask.shape), "INT64"),
    ]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    outputs = [triton.InferRequestedOutput(name) for name in ("label", "probabilities", "logits")]
    result = client.infer(model, inputs, outputs=outputs, request_id="triton-1")
    seen["raw"] = {
        "labels": [label.decode() for label in result.as_numpy("label")],
        "probabilities": result.as_numpy("probabilities").tolist(),
        "logits": result.as_numpy("logits").tolist(),
        "id": result.get_response().id,
        "version": result.get_response().model_version,
    }
    try:
        client.infer("no-such-model", inputs)
    except triton.InferenceServerException as error:
        seen["unknown_model_error"] = {"status": error.status(), "message": error.message()}
    client.close()

    # tritonclient's infer() always sends raw bytes; typed contents through its own protobuf module.
    request = service_pb2.ModelInferRequest(model_name=model, model_version="1")
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        tensor.contents.int64_contents.extend(array.ravel().tolist())
    request.outputs.add(name="label")
    request.outputs.add(name="logits")
    with grpc.insecure_channel(url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    typed = triton.InferResult(response)
    seen["typed"] = {
        "labels": [label.decode() for label in typed.as_numpy("label")],
        "logits": typed.as_numpy("logits").tolist(),
        "version": response.model_version,
    }
    return seen


if __name__ == "__main__":
    url, tokenizer_path, model, *texts = sys.argv[1:]
    print(json.dumps(main(url, tokenizer_path, model, texts)))
