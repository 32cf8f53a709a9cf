from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_server import RunningServer
from shared.pb import tokenizer_pb2 as pb
from shared.pb import tokenizer_pb2_grpc as pb_grpc
from tests.reliability import Observed

LONG_TEXT = " ".join(
    f"Company {i} reported quarterly revenue of {i * 3} million dollars, above analyst estimates." for i in range(40)
)


async def test_tokenize_returns_ids_offsets_and_word_ids(tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub) -> None:
    text = "Tesla stock soars"
    reply = await tokenizer_stub.Tokenize(pb.TokenizeRequest(texts=[text], return_offsets=True))
    (result,) = reply.results
    (chunk,) = result.chunks
    assert chunk.input_ids[0] == 101 and chunk.input_ids[-1] == 102  # [CLS] ... [SEP]
    assert list(chunk.attention_mask) == [1] * len(chunk.input_ids)
    words = [
        text[s:e] for s, e, w in zip(chunk.offset_starts, chunk.offset_ends, chunk.word_ids, strict=True) if w >= 0
    ]
    assert "".join(words).lower() == "teslastocksoars"
    assert chunk.word_ids[0] == -1 and chunk.word_ids[-1] == -1
    assert result.num_tokens == len(chunk.input_ids) - 2
    assert not result.truncated


async def test_long_text_is_chunked_with_overlap_and_fully_covered(
    tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub,
) -> None:
    reply = await tokenizer_stub.Tokenize(
        pb.TokenizeRequest(texts=[LONG_TEXT], max_length=64, stride=16, return_offsets=True)
    )
    (result,) = reply.results
    assert len(result.chunks) > 5
    assert all(len(chunk.input_ids) <= 64 for chunk in result.chunks)
    # Every character of every word lies in some chunk, and consecutive chunks overlap.
    covered: set[int] = set()
    for chunk in result.chunks:
        for start, end in zip(chunk.offset_starts, chunk.offset_ends, strict=True):
            covered.update(range(start, end))
    assert {i for i, ch in enumerate(LONG_TEXT) if not ch.isspace()} <= covered
    for before, after in zip(result.chunks, result.chunks[1:], strict=False):
        assert after.char_start < before.char_end
    assert result.chunks[0].char_start == 0 and result.chunks[-1].char_end == len(LONG_TEXT)
    whole = sum(len(c.input_ids) - 2 for c in result.chunks) - 16 * (len(result.chunks) - 1)
    assert result.num_tokens == whole


async def test_truncate_keeps_first_chunk_and_says_so(tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub) -> None:
    reply = await tokenizer_stub.Tokenize(
        pb.TokenizeRequest(texts=[LONG_TEXT, "short"], max_length=32, overflow=pb.OVERFLOW_TRUNCATE)
    )
    long_result, short_result = reply.results
    assert len(long_result.chunks) == 1 and long_result.truncated
    assert long_result.num_tokens > 32
    assert not short_result.truncated


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (pb.TokenizeRequest(texts=[]), grpc.StatusCode.INVALID_ARGUMENT, "texts is empty"),
        (pb.TokenizeRequest(texts=["ok", "  "]), grpc.StatusCode.INVALID_ARGUMENT, "text 1 is empty"),
        (pb.TokenizeRequest(texts=["\u200b\u200d\x00"]), grpc.StatusCode.INVALID_ARGUMENT, "text 0 has no tokens"),
        (
            pb.TokenizeRequest(texts=["x" * 20_001]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text 0 has 20001 bytes; max is 20000",
        ),
        (pb.TokenizeRequest(texts=["a"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "65 texts; max is 64"),
        (pb.TokenizeRequest(texts=["a"], max_length=600), grpc.StatusCode.INVALID_ARGUMENT, "max_length is 600"),
        (pb.TokenizeRequest(texts=["a"], max_length=32, stride=30), grpc.StatusCode.INVALID_ARGUMENT, "stride is 30"),
    ],
)
async def test_bad_input_is_rejected_with_a_precise_message(
    tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub, request_: pb.TokenizeRequest, code: grpc.StatusCode, detail: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tokenizer_stub.Tokenize(request_)
    assert caught.value.code() == code
    assert detail in (caught.value.details() or "")
    # ... and the service keeps serving.
    reply = await tokenizer_stub.Tokenize(pb.TokenizeRequest(texts=["still here"]))
    assert len(reply.results) == 1


async def test_info_and_health(
    tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub, tokenizer_server: RunningServer
) -> None:
    info = await tokenizer_stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest())
    assert info.vocab_size == 30522 and info.max_length == 128 and info.max_texts == 64
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokenizer_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "infermesh.tokenizer.v1.TokenizerService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.reliability(
    "Limits", "a 20 MB gRPC message to the tokenizer (limit 16 MiB)", "RESOURCE_EXHAUSTED before it is parsed"
)
async def test_a_message_over_the_grpc_size_limit_is_resource_exhausted(
    tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub, observed: Observed
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tokenizer_stub.Tokenize(pb.TokenizeRequest(texts=["word " * 1_000_000] * 4))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    observed.record(f"{caught.value.code().name}: {caught.value.details()}")
