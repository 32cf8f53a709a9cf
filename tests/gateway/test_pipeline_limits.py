"""The gateway's gRPC Pipeline service keeps the REST routes' limits: a gRPC caller cannot
send more texts than MAX_TEXTS by going around /v1/sentiment."""

from __future__ import annotations

import grpc
import httpx
import pytest

from shared.errors import ERROR_TYPE_METADATA_KEY
from shared.pb import pipeline_pb2 as pipeline_pb
from shared.pb import pipeline_pb2_grpc as pipeline_grpc
from tests.reliability import Observed


@pytest.mark.reliability(
    "Limits", "gRPC Classify with 9 texts (MAX_TEXTS 8)", "INVALID_ARGUMENT naming the limit, as REST answers 413"
)
async def test_grpc_classify_applies_max_texts(client: httpx.AsyncClient, observed: Observed) -> None:
    # The `client` fixture's gateway has max_texts=8 (tests/gateway/conftest.py).
    texts = [f"Acme headline {i}" for i in range(9)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{client.headers['x-test-grpc-port']}") as channel:
        stub = pipeline_grpc.PipelineStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pipeline_pb.ClassifyRequest(texts=texts))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "request has 9 texts; max is 8"
        assert (ERROR_TYPE_METADATA_KEY, "InputTooLarge") in tuple(caught.value.trailing_metadata() or ())
        observed.record(f"{caught.value.code().name}: {caught.value.details()}")

        at_the_limit = await stub.Classify(pipeline_pb.ClassifyRequest(texts=texts[:8]))
        assert len(at_the_limit.results) == 8
    rest = await client.post("/v1/sentiment", json={"texts": texts})
    assert rest.status_code == 413 and rest.json()["detail"] == caught.value.details()
