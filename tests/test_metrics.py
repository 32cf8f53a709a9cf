"""Prometheus series move when traffic flows: the services run in this process, so they
share one registry; tests/test_cli.py scrapes each real process's own endpoint."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from shared.batching import BatchPolicy, DynamicBatcher
from shared.errors import Overloaded
from shared.metrics import BatcherMetrics, MetricsServer, inference_batcher_metrics
from shared.pb import grpc_predict_v2_pb2 as infer_pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from shared.pb import tokenizer_pb2 as tok_pb
from shared.pb import tokenizer_pb2_grpc as tok_grpc
from shared.pipeline import PipelineClient

TOKENIZE = "/infermesh.tokenizer.v1.TokenizerService/Tokenize"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_metrics_endpoint_serves_metrics_liveness_and_readiness() -> None:
    ready = {"now": False}
    server = MetricsServer("127.0.0.1", 0, lambda: (ready["now"], "ready" if ready["now"] else "no partitions yet"))
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = fetch(f"{base}/metrics")
        assert status == 200 and "# TYPE infermesh_grpc_server_requests_total counter" in body
        assert fetch(f"{base}/healthz")[0] == 200
        assert fetch(f"{base}/readyz") == (503, "no partitions yet\n")
        ready["now"] = True
        assert fetch(f"{base}/readyz") == (200, "ready\n")
        assert fetch(f"{base}/nothing")[0] == 404
    finally:
        server.stop()


async def test_grpc_calls_are_counted_by_method_and_status_code(
    tokenizer_stub: tok_grpc.TokenizerServiceAsyncStub,
) -> None:
    ok_before = sample("infermesh_grpc_server_requests_total", method=TOKENIZE, code="OK")
    bad_before = sample("infermesh_grpc_server_requests_total", method=TOKENIZE, code="INVALID_ARGUMENT")
    timed_before = sample("infermesh_grpc_server_duration_seconds_count", method=TOKENIZE)
    texts_before = sample("infermesh_tokenizer_texts_total")
    await tokenizer_stub.Tokenize(tok_pb.TokenizeRequest(texts=["Acme beats estimates", "Acme misses"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await tokenizer_stub.Tokenize(tok_pb.TokenizeRequest(texts=["   "]))
    # The server counts a call as it finishes, which may be just after the client has its
    # answer: give a loaded machine a moment before reading.
    for _ in range(50):
        if sample("infermesh_grpc_server_duration_seconds_count", method=TOKENIZE) == timed_before + 2:
            break
        await asyncio.sleep(0.02)
    assert sample("infermesh_grpc_server_requests_total", method=TOKENIZE, code="OK") == ok_before + 1
    assert sample("infermesh_grpc_server_requests_total", method=TOKENIZE, code="INVALID_ARGUMENT") == bad_before + 1
    assert sample("infermesh_grpc_server_duration_seconds_count", method=TOKENIZE) == timed_before + 2
    assert sample("infermesh_tokenizer_texts_total") == texts_before + 2


async def test_inference_reports_batches_tokens_queue_and_execution_time_per_version(
    inference_stub: infer_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    labels = {"model": "finance-sentiment", "version": "1"}
    batches_before = sample("infermesh_inference_batch_size_sequences_count", **labels)
    sequences_before = sample("infermesh_inference_sequences_total", **labels)
    tokens_before = sample("infermesh_inference_batch_tokens_sum", **labels)
    executed_before = sample("infermesh_inference_model_execution_seconds_count", **labels, backend="onnxruntime")
    ids = np.array([[101, 2000, 2001, 102], [101, 2002, 102, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    await inference_stub.ModelInfer(
        infer_pb.ModelInferRequest(
            model_name="finance-sentiment",
            model_version="1",
            inputs=[
                infer_pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[2, 4]),
                infer_pb.ModelInferRequest.InferInputTensor(name="attention_mask", datatype="INT64", shape=[2, 4]),
            ],
            raw_input_contents=[ids.tobytes(), mask.tobytes()],
        )
    )
    assert sample("infermesh_inference_sequences_total", **labels) == sequences_before + 2
    assert sample("infermesh_inference_batch_size_sequences_count", **labels) >= batches_before + 1
    assert sample("infermesh_inference_batch_tokens_sum", **labels) >= tokens_before + 8  # 2 rows padded to 4
    assert (
        sample("infermesh_inference_model_execution_seconds_count", **labels, backend="onnxruntime") > executed_before
    )
    assert sample("infermesh_inference_queue_depth_sequences", **labels) == 0


async def test_the_pipeline_counts_its_shared_rounds_and_the_labels_it_returned(pipeline: PipelineClient) -> None:
    rounds_before = sample("infermesh_pipeline_round_size_calls_count")
    documents_before = sum(
        sample("infermesh_postprocess_documents_total", model="finance-sentiment", version="2", label=label)
        for label in ("negative", "neutral", "positive", "abstain")
    )
    await asyncio.gather(*(pipeline.classify([f"Acme {i} shares slump"]) for i in range(6)))
    assert sample("infermesh_pipeline_round_size_calls_count") > rounds_before
    documents_after = sum(
        sample("infermesh_postprocess_documents_total", model="finance-sentiment", version="2", label=label)
        for label in ("negative", "neutral", "positive", "abstain")
    )
    assert documents_after == documents_before + 6


async def test_a_full_queue_is_counted_as_rejected_sequences() -> None:
    release = asyncio.Event()

    async def held(items: list[int]) -> list[int | BaseException]:
        await release.wait()
        return list(items)

    metrics: BatcherMetrics = inference_batcher_metrics("metrics-test", "1")
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        held,
        lambda item: 1,
        BatchPolicy(max_batch_size=1, max_queue_size=3, max_queue_delay_seconds=0),
        metrics=metrics,
    )
    running = [asyncio.create_task(batcher.submit([i])) for i in range(3)]  # one executes, two wait
    await asyncio.sleep(0.02)
    assert sample("infermesh_inference_queue_depth_sequences", model="metrics-test", version="1") == 2
    with pytest.raises(Overloaded):
        await batcher.submit([7, 8])
    assert sample("infermesh_inference_rejected_sequences_total", model="metrics-test", version="1") == 2
    release.set()
    assert await asyncio.gather(*running) == [[0], [1], [2]]
    assert sample("infermesh_inference_queue_depth_sequences", model="metrics-test", version="1") == 0
    assert sample("infermesh_inference_batch_size_sequences_count", model="metrics-test", version="1") == 3
    await batcher.close()
