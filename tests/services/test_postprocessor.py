from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from shared.pb import postprocess_pb2 as pb
from shared.pb import postprocess_pb2_grpc as pb_grpc
from tests.conftest import MODEL, VERSION_2_TEMPERATURE


def _softmax(row: list[float], temperature: float) -> np.ndarray:
    scaled = np.array(row) / temperature
    exp = np.exp(scaled - scaled.max())
    result: np.ndarray = exp / exp.sum()
    return result


async def test_logits_become_calibrated_probabilities_of_the_version(
    postprocessor_stub: pb_grpc.PostprocessServiceAsyncStub, model_config: dict[str, object]
) -> None:
    logits = [2.0, 0.5, -1.0, -1.0, 0.0, 3.0]
    for version, temperature in (("1", float(model_config["temperature"])), ("2", VERSION_2_TEMPERATURE)):  # type: ignore[arg-type]
        reply = await postprocessor_stub.Postprocess(
            pb.PostprocessRequest(model_name=MODEL, model_version=version, logits=logits, num_labels=3)
        )
        assert list(reply.labels) == ["negative", "neutral", "positive"]
        assert reply.model_version == version
        assert [r.label for r in reply.results] == ["negative", "positive"]
        np.testing.assert_allclose(reply.results[0].probabilities, _softmax(logits[:3], temperature), rtol=1e-5)
        assert math.isclose(sum(reply.results[1].probabilities), 1.0, rel_tol=1e-5)


async def test_latest_version_is_the_default(postprocessor_stub: pb_grpc.PostprocessServiceAsyncStub) -> None:
    reply = await postprocessor_stub.Postprocess(
        pb.PostprocessRequest(model_name=MODEL, logits=[1, 0, 0], num_labels=3)
    )
    assert reply.model_version == "2"
    assert math.isclose(reply.temperature, VERSION_2_TEMPERATURE, rel_tol=1e-6)


async def test_chunks_are_aggregated_per_document_by_token_weight(
    postprocessor_stub: pb_grpc.PostprocessServiceAsyncStub,
) -> None:
    # Document 0 has a long neutral chunk and a short negative one; document 1 one positive chunk.
    logits = [0, 4, 0, 4, 0, 0, 0, 0, 4]
    reply = await postprocessor_stub.Postprocess(
        pb.PostprocessRequest(
            model_name=MODEL,
            model_version="2",
            logits=logits,
            num_labels=3,
            document_index=[0, 0, 1],
            row_weights=[120, 10, 30],
        )
    )
    first, second = reply.results
    assert first.num_chunks == 2 and first.label == "neutral" and first.deciding_chunk == 0
    expected = (_softmax([0, 4, 0], 2.5) * 120 + _softmax([4, 0, 0], 2.5) * 10) / 130
    np.testing.assert_allclose(first.probabilities, expected, rtol=1e-5)
    assert second.num_chunks == 1 and second.label == "positive"

    strongest = await postprocessor_stub.Postprocess(
        pb.PostprocessRequest(
            model_name=MODEL,
            model_version="2",
            logits=[0, 1, 0, 6, 0, 0],
            num_labels=3,
            document_index=[0, 0],
            aggregation=pb.AGGREGATION_MAX_CONFIDENCE,
        )
    )
    assert strongest.results[0].label == "negative" and strongest.results[0].deciding_chunk == 1


async def test_threshold_below_top_probability_abstains(
    postprocessor_stub: pb_grpc.PostprocessServiceAsyncStub,
) -> None:
    reply = await postprocessor_stub.Postprocess(
        pb.PostprocessRequest(
            model_name=MODEL,
            model_version="2",
            logits=[1.0, 0.8, 0.0, 0.0, 0.0, 9.0],
            num_labels=3,
            thresholds={"negative": 0.9, "positive": 0.5},
        )
    )
    assert reply.results[0].abstained and reply.results[0].label == reply.abstain_label == "abstain"
    assert not reply.results[1].abstained and reply.results[1].label == "positive"


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (pb.PostprocessRequest(model_name="nope", logits=[1, 2, 3], num_labels=3), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (
            pb.PostprocessRequest(model_name=MODEL, model_version="9", logits=[1, 2, 3], num_labels=3),
            grpc.StatusCode.NOT_FOUND,
            "version '9'",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2], num_labels=2),
            grpc.StatusCode.INVALID_ARGUMENT,
            "3 labels",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2, 3, 4], num_labels=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "multiple",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2, 3, 1, float("nan"), 0], num_labels=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "row 1",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2, 3], num_labels=3, thresholds={"bullish": 0.5}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown label 'bullish'",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2, 3], num_labels=3, document_index=[4294967295]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "must be below 1",
        ),
        (
            pb.PostprocessRequest(model_name=MODEL, logits=[1, 2, 3, 1, 2, 3], num_labels=3, document_index=[1, 1]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "document 0 has no rows",
        ),
    ],
)
async def test_bad_input_is_rejected(
    postprocessor_stub: pb_grpc.PostprocessServiceAsyncStub,
    request_: pb.PostprocessRequest,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await postprocessor_stub.Postprocess(request_)
    assert caught.value.code() == code
    assert detail in (caught.value.details() or "")
