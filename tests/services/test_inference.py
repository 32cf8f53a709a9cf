from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from tokenizers import Tokenizer

from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from shared.model_repository import ModelConfig
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import MODEL
from tests.reliability import Observed

HEADLINES = ["Shares of Acme plunge after profit warning", "Acme beats estimates and raises guidance"]
Input = pb.ModelInferRequest.InferInputTensor


def encode(built_model: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


def raw_request(ids: np.ndarray, mask: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    fields.setdefault("model_name", MODEL)
    return pb.ModelInferRequest(
        inputs=[
            Input(name="input_ids", datatype="INT64", shape=list(ids.shape)),
            Input(name="attention_mask", datatype="INT64", shape=list(mask.shape)),
        ],
        raw_input_contents=[ids.tobytes(), mask.tobytes()],
        **fields,  # type: ignore[arg-type]
    )


def typed_request(ids: np.ndarray, mask: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    fields.setdefault("model_name", MODEL)
    return pb.ModelInferRequest(
        inputs=[
            Input(
                name="input_ids",
                datatype="INT64",
                shape=list(ids.shape),
                contents=pb.InferTensorContents(int64_contents=ids.ravel().tolist()),
            ),
            Input(
                name="attention_mask",
                datatype="INT64",
                shape=list(mask.shape),
                contents=pb.InferTensorContents(int64_contents=mask.ravel().tolist()),
            ),
        ],
        **fields,  # type: ignore[arg-type]
    )


def output(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            raw = response.raw_output_contents[index]
            if tensor.datatype == "BYTES":
                items, offset = [], 0
                while offset < len(raw):
                    (length,) = struct.unpack_from("<I", raw, offset)
                    items.append(raw[offset + 4 : offset + 4 + length].decode())
                    offset += 4 + length
                return np.array(items)
            return np.frombuffer(raw, dtype=np.float32).reshape(list(tensor.shape))
    raise KeyError(name)


async def test_server_and_model_metadata(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub, built_model: Path
) -> None:
    assert (await inference_stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await inference_stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await inference_stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert (await inference_stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"))).ready
    server = await inference_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "infermesh"
    metadata = await inference_stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert list(metadata.versions) == ["1", "2"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    # The primary head's plain outputs first, then each further head's (`topic_logits`, ...).
    config = ModelConfig.model_validate_json((built_model / "config.json").read_text())
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        (name, datatype, shape)
        for head in config.heads
        for name, datatype, shape in (
            (head.output_name("logits"), "FP32", [-1, len(head.labels)]),
            (head.output_name("probabilities"), "FP32", [-1, len(head.labels)]),
            (head.output_name("label"), "BYTES", [-1]),
        )
    ]
    assert [t.name for t in metadata.outputs[:3]] == ["logits", "probabilities", "label"]


async def test_raw_and_typed_contents_give_the_same_answer(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub, built_model: Path
) -> None:
    ids, mask = encode(built_model, HEADLINES)
    raw = await inference_stub.ModelInfer(raw_request(ids, mask, id="req-1"))
    typed = await inference_stub.ModelInfer(typed_request(ids, mask))
    assert raw.id == "req-1" and raw.model_version == "2"
    np.testing.assert_allclose(output(raw, "logits"), output(typed, "logits"), atol=1e-5)
    assert list(output(raw, "label")) == ["negative", "positive"]
    probabilities = output(raw, "probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


async def test_version_can_be_pinned_and_requested_outputs_are_honoured(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub, built_model: Path
) -> None:
    ids, mask = encode(built_model, HEADLINES)
    outputs = [pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")]
    v1 = await inference_stub.ModelInfer(raw_request(ids, mask, model_version="1", outputs=outputs))
    v2 = await inference_stub.ModelInfer(raw_request(ids, mask, model_version="2", outputs=outputs))
    assert [t.name for t in v1.outputs] == ["probabilities"]
    assert v1.model_version == "1" and v2.model_version == "2"
    # Version 2 has a higher temperature: the same logits give flatter probabilities.
    assert output(v1, "probabilities").max() > output(v2, "probabilities").max()


async def test_padding_does_not_change_the_answer(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub, built_model: Path
) -> None:
    ids, mask = encode(built_model, HEADLINES[:1])
    padded_ids = np.pad(ids, ((0, 0), (0, 20)))
    padded_mask = np.pad(mask, ((0, 0), (0, 20)))
    tight = await inference_stub.ModelInfer(raw_request(ids, mask))
    padded = await inference_stub.ModelInfer(raw_request(padded_ids, padded_mask))
    np.testing.assert_allclose(output(tight, "logits"), output(padded, "logits"), atol=1e-4)


def _mixed(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = raw_request(ids, mask)
    request.inputs[0].contents.int64_contents.extend(ids.ravel().tolist())
    return request


def _short_raw(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = raw_request(ids, mask)
    request.raw_input_contents[1] = mask.tobytes()[:-8]
    return request


def _as_int32(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = raw_request(ids.astype(np.int32), mask)
    request.inputs[0].datatype = "INT32"
    return request


def _bytes_input(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            Input(
                name="input_ids", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"])
            ),
            Input(
                name="attention_mask", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[1])
            ),
        ],
    )


def _wrong_count(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = typed_request(ids, mask)
    request.inputs[0].shape[1] += 1
    return request


def _unknown_model(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(ids, mask, model_name="no-such-model")


def _unknown_version(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(ids, mask, model_version="7")


def _too_long(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(np.ones((1, 200), dtype=np.int64), np.ones((1, 200), dtype=np.int64))


def _too_many(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(np.ones((129, 4), dtype=np.int64), np.ones((129, 4), dtype=np.int64))


def _bad_token(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    bad = ids.copy()
    bad[0, 1] = 10**9
    return raw_request(bad, mask)


def _left_padded(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(np.pad(ids, ((0, 0), (3, 0))), np.pad(mask, ((0, 0), (3, 0))))


def _unknown_output(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    return raw_request(ids, mask, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="embedding")])


def _missing_input(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = raw_request(ids, mask)
    del request.inputs[1]
    del request.raw_input_contents[1]
    return request


@pytest.mark.parametrize(
    ("build", "code", "detail"),
    [
        (_mixed, grpc.StatusCode.INVALID_ARGUMENT, "mixing both is not allowed"),
        (_short_raw, grpc.StatusCode.INVALID_ARGUMENT, "needs"),
        (_as_int32, grpc.StatusCode.INVALID_ARGUMENT, "datatype INT32; the model expects INT64"),
        (_bytes_input, grpc.StatusCode.INVALID_ARGUMENT, "datatype BYTES"),
        (_wrong_count, grpc.StatusCode.INVALID_ARGUMENT, "contents hold"),
        (_unknown_model, grpc.StatusCode.NOT_FOUND, "'no-such-model'"),
        (_unknown_version, grpc.StatusCode.NOT_FOUND, "version '7'"),
        (_too_long, grpc.StatusCode.INVALID_ARGUMENT, "200 tokens; max is 128"),
        (_too_many, grpc.StatusCode.INVALID_ARGUMENT, "129 sequences; max is 128"),
        (_bad_token, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (_unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "no output 'embedding'"),
        (_left_padded, grpc.StatusCode.INVALID_ARGUMENT, "right padding"),
        (_missing_input, grpc.StatusCode.INVALID_ARGUMENT, "'attention_mask' is missing"),
    ],
    ids=[
        "raw and typed contents mixed",
        "raw bytes fewer than the shape says",
        "INT32 ids",
        "BYTES input",
        "contents count lies about the shape",
        "unknown model",
        "unknown version",
        "200 tokens in a row",
        "129 sequences",
        "token id outside the vocabulary",
        "unknown output asked for",
        "left padding",
        "attention_mask missing",
    ],
)
@pytest.mark.reliability(
    "Hostile input",
    "OIP ModelInfer request",
    "the precise status (INVALID_ARGUMENT / NOT_FOUND) with what is wrong; no traceback; the server keeps serving",
)
async def test_bad_requests_get_precise_errors_and_the_server_keeps_serving(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub,
    built_model: Path,
    build: Callable[[np.ndarray, np.ndarray], pb.ModelInferRequest],
    code: grpc.StatusCode,
    detail: str,
    observed: Observed,
) -> None:
    ids, mask = encode(built_model, HEADLINES)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inference_stub.ModelInfer(build(ids, mask))
    assert caught.value.code() == code
    assert detail in (caught.value.details() or "")
    assert "Traceback" not in (caught.value.details() or "")
    ok = await inference_stub.ModelInfer(raw_request(ids, mask))
    assert list(output(ok, "label")) == ["negative", "positive"]
    observed.record(f"{caught.value.code().name}: {caught.value.details()}; the next request answered")


async def test_model_ready_and_metadata_for_unknown_model_are_not_found(
    inference_stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    for call in (
        inference_stub.ModelReady(pb.ModelReadyRequest(name="missing")),
        inference_stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="3")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_full_queue_answers_resource_exhausted_and_recovers(model_repository: Path, built_model: Path) -> None:
    settings = InferenceSettings(
        grpc_port=0, model_repository=model_repository, max_queue_size=8, max_sequences_per_request=8
    )
    running, core = await start_inference(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # Eight full-length sequences per request, twenty requests at once: while one
            # batch runs, the bounded queue fills and the rest are turned away, not queued.
            ids = np.full((8, 128), 2000, dtype=np.int64)
            mask = np.ones((8, 128), dtype=np.int64)
            outcomes = await asyncio.gather(
                *(stub.ModelInfer(raw_request(ids, mask)) for _ in range(20)), return_exceptions=True
            )
            rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            served = [o for o in outcomes if isinstance(o, pb.ModelInferResponse)]
            assert rejected and served and len(rejected) + len(served) == 20
            for error in rejected:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit of 8" in (error.details() or "")
            ids, mask = encode(built_model, HEADLINES)
            after = await stub.ModelInfer(raw_request(ids, mask))
            assert list(output(after, "label")) == ["negative", "positive"]
    finally:
        await running.stop(0)
        await core.close()


def test_settings_refuse_a_request_limit_above_the_queue() -> None:
    with pytest.raises(ValueError, match="could never be queued"):
        InferenceSettings(max_queue_size=4, max_sequences_per_request=5)
