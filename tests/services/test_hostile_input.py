"""Hostile input, generated: whatever arrives, a service answers or says what is wrong
with it (InvalidInput / InputTooLarge, INVALID_ARGUMENT over gRPC), and never crashes.

Examples are derandomized so CI tries the same inputs every run."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from services.inference.converters import request_from_pb
from services.inference.core import InferenceCore
from services.inference.server import build_core
from services.inference.settings import InferenceSettings
from services.postprocessor.core import Aggregation, Postprocessor
from services.tokenizer.core import Overflow, TokenizedText, Tokenizer, TokenizerLimits
from shared import oip
from shared.errors import InfermeshError, InputTooLarge, InvalidInput
from shared.grpc_server import RunningServer
from shared.model_repository import ModelRepository
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from shared.pb import tokenizer_pb2 as tok_pb
from shared.pb import tokenizer_pb2_grpc as tok_grpc
from tests.conftest import MODEL, link_version
from tests.properties import hypothesis_settings
from tests.reliability import Observed

Input = pb.ModelInferRequest.InferInputTensor
ACCEPTED = (InvalidInput, InputTooLarge)
CLS, SEP, PAD, MASK = 101, 102, 0, 103


def rejected_as_expected(error: Exception) -> str:
    """The error's class name if it is one a caller may see for bad input, else fail."""
    assert isinstance(error, ACCEPTED), f"{type(error).__name__}: {error}"
    assert error.detail
    return type(error).__name__


# --- Tokenizer -------------------------------------------------------------------------

TRICKY = [
    "\x00",
    "\x07",
    "\x1b[31m",
    "\r\n",
    "\t",
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u200e",  # left-to-right mark
    "\u200f",  # right-to-left mark
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\ufeff",  # byte order mark
    "\ufffd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family: an emoji ZWJ sequence
    "\U0001f1fa\U0001f1f8",  # a flag: two regional indicators
    "e\u0301\u0302\u0303\u0304",  # stacked combining marks
    "\u0301",  # a combining mark with nothing to combine with
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew
    "\ufdfd",  # one Arabic ligature, many letters
    "\u0130",  # İ lower-cases to two characters
    "\ufb01",  # ﬁ
    "\U0001d54f",
    "[SEP]",
    "[PAD]",
    "[CLS]",
    "[MASK]",
    "[UNK]",
    "Acme",
    " ",
    "$189.50",
]
_unicode = st.lists(
    st.sampled_from(TRICKY) | st.text(st.characters(exclude_categories=["Cs"]), max_size=12), max_size=16
).map("".join)


@st.composite
def texts(draw: st.DrawFn) -> str:
    text = draw(_unicode)
    if draw(st.integers(0, 4)) == 4:  # one in five: a lone surrogate, which a Python caller can pass
        position = draw(st.integers(0, len(text)))
        text = text[:position] + chr(draw(st.integers(0xD800, 0xDFFF))) + text[position:]
    return text


@st.composite
def _mostly_default(draw: st.DrawFn, numbers: st.SearchStrategy[int]) -> int | None:
    return draw(numbers) if draw(st.integers(0, 3)) == 3 else None


@pytest.fixture(scope="module")
def tokenizer(built_model: Path) -> Tokenizer:
    return Tokenizer(built_model / "tokenizer.json", MODEL, TokenizerLimits(128, 32, max_texts=8, max_text_bytes=4096))


def assert_well_formed(text: str, result: TokenizedText, max_length: int, vocab_size: int) -> None:
    """Ids in the vocabulary, offsets inside the text and in order, chunks within max_length."""
    assert result.chunks and result.num_tokens > 0
    for chunk in result.chunks:
        ids, offsets, words = chunk.input_ids, chunk.offsets, chunk.word_ids
        assert offsets is not None and words is not None
        assert 3 <= len(ids) <= max_length
        assert len(chunk.attention_mask) == len(offsets) == len(words) == len(ids)
        assert set(chunk.attention_mask) == {1}
        assert all(0 <= i < vocab_size for i in ids)
        assert (ids[0], ids[-1], offsets[0], offsets[-1], words[0], words[-1]) == (CLS, SEP, (0, 0), (0, 0), -1, -1)
        content = list(zip(ids[1:-1], offsets[1:-1], words[1:-1], strict=True))
        # Text that spells "[SEP]" is text: no control token comes from inside a text.
        assert not {i for i, _, _ in content} & {CLS, SEP, PAD, MASK}
        assert all(0 <= start < end <= len(text) and word >= 0 for _, (start, end), word in content)
        starts = [start for _, (start, _), _ in content]
        assert starts == sorted(starts)
        assert (chunk.char_start, chunk.char_end) == (offsets[1][0], offsets[-2][1])
    assert [c.char_start for c in result.chunks] == sorted(c.char_start for c in result.chunks)


@pytest.mark.reliability(
    "Hostile input",
    "Tokenizer: generated Unicode text (NUL and control characters, lone surrogates, zero-width joiners, "
    "RTL marks, Arabic, Hebrew, emoji ZWJ sequences, combining marks, typed [SEP]/[PAD]), odd max_length/stride",
    "ids in the vocabulary, offsets inside the text, chunks within max_length; or InvalidInput; nothing else",
)
def test_any_unicode_text_tokenizes_cleanly_or_is_rejected(tokenizer: Tokenizer, observed: Observed) -> None:
    seen: Counter[str] = Counter()

    @hypothesis_settings(400)
    @given(
        text=texts(),
        max_length=_mostly_default(st.integers(-3, 200)),
        stride=_mostly_default(st.integers(-3, 130)),
        overflow=st.sampled_from(Overflow),
    )
    def check(text: str, max_length: int | None, stride: int | None, overflow: Overflow) -> None:
        try:
            (result,) = tokenizer.tokenize([text], max_length, stride, overflow, return_offsets=True)
        except Exception as error:
            seen[rejected_as_expected(error)] += 1
            return
        seen["tokenized"] += 1
        assert_well_formed(text, result, max_length or tokenizer.limits.max_length, tokenizer.vocab_size)
        if overflow is Overflow.TRUNCATE:
            assert len(result.chunks) == 1

    check()
    total = sum(seen.values())
    observed.record(
        f"{total} generated texts: {seen['tokenized']} tokenized, {seen['InvalidInput']} InvalidInput, "
        f"{seen['InputTooLarge']} InputTooLarge; no other exception"
    )
    assert seen["tokenized"] > total // 4 and seen["InvalidInput"] > 0


def test_lone_surrogates_and_negative_strides_are_invalid_input(tokenizer: Tokenizer) -> None:
    # Both used to leak a TypeError / OverflowError from the Rust tokenizer.
    with pytest.raises(InvalidInput, match="lone surrogate at character 5"):
        tokenizer.tokenize(["Acme \ud800 rallies"])
    with pytest.raises(InvalidInput, match="stride is -1"):
        tokenizer.tokenize(["Acme rallies"], stride=-1)


def test_typed_special_tokens_are_plain_text(tokenizer: Tokenizer) -> None:
    (result,) = tokenizer.tokenize(["Acme [SEP] [PAD] rallies"])
    ids = result.chunks[0].input_ids
    assert ids.count(SEP) == 1 and PAD not in ids


def test_texts_past_the_size_limits_get_input_too_large(tokenizer: Tokenizer) -> None:
    limit = tokenizer.limits.max_text_bytes

    @hypothesis_settings(40)
    @given(size=st.integers(limit - 8, 3 * limit), char=st.sampled_from(["a", "é", "€", "\U0001f600", " ", "\x00"]))
    def check(size: int, char: str) -> None:
        text = char * (size // len(char.encode()))
        try:
            (result,) = tokenizer.tokenize([text], max_length=128)
        except Exception as error:
            name = rejected_as_expected(error)
            assert (name == "InputTooLarge") == (len(text.encode()) > limit)
            return
        assert len(text.encode()) <= limit
        assert all(len(c.input_ids) <= 128 for c in result.chunks)

    check()
    with pytest.raises(InputTooLarge, match="9 texts"):
        tokenizer.tokenize(["Acme"] * 9)


async def test_tokenizer_server_answers_generated_text_or_invalid_argument(tokenizer_server: RunningServer) -> None:
    port = tokenizer_server.port
    seen: Counter[str] = Counter()
    # Protobuf strings are UTF-8: surrogates cannot be sent at all.
    sendable = texts().map(lambda t: t.encode("utf-8", "replace").decode("utf-8"))

    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tok_grpc.TokenizerServiceStub(channel)

            @hypothesis_settings(40)
            @given(batch=st.lists(sendable, max_size=4), max_length=st.integers(0, 200))
            def check(batch: list[str], max_length: int) -> None:
                request = tok_pb.TokenizeRequest(texts=batch, max_length=max_length, return_offsets=True)
                try:
                    reply = stub.Tokenize(request, timeout=10)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                    seen["INVALID_ARGUMENT"] += 1
                    return
                seen["OK"] += 1
                assert len(reply.results) == len(batch)
                for text, result in zip(batch, reply.results, strict=True):
                    for chunk in result.chunks:
                        assert len(chunk.input_ids) <= (max_length or 128)
                        assert all(end <= len(text) for end in chunk.offset_ends)

            check()

    await asyncio.to_thread(run)  # the server answers on this event loop
    assert seen["OK"] and seen["INVALID_ARGUMENT"]


# --- OIP v2 tensors and the inference core ----------------------------------------------

VOCAB = 30522
WRAPPING_SHAPES = [([2**32, 2**32], 0), ([2**62, 4], 0), ([0, 2**62], 0), ([1] * 40, 1), ([1] * 65, 0)]
DATATYPES = [*oip.NUMPY_DTYPES, "INT128", ""]


def _typed(datatype: str, values: list[int]) -> pb.InferTensorContents:
    """`values` in the contents field `datatype` travels in, squeezed to fit its wire type."""
    field = oip.CONTENTS_FIELDS.get(datatype, "int64_contents")
    by_field: dict[str, list[object]] = {
        "bool_contents": [bool(v) for v in values],
        "fp32_contents": [float(v) for v in values],
        "fp64_contents": [float(v) for v in values],
        "bytes_contents": [str(v).encode() for v in values],
        "int_contents": [int(np.clip(v, -(2**31), 2**31 - 1)) for v in values],
        "uint_contents": [min(abs(v), 2**32 - 1) for v in values],
        "uint64_contents": [abs(v) for v in values],
    }
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(by_field.get(field, values))
    return contents


def _sometimes_wrong(draw: st.DrawFn, chance: int) -> bool:
    """True about one time in `chance`: each fault is rare enough that many requests are
    valid (and a valid request is the simplest example, which failures shrink towards)."""
    return draw(st.sampled_from([False] * (chance - 1) + [True]))


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request, then, each now and then, one of the ways a client gets it wrong."""
    rows = draw(st.integers(0, 3) if _sometimes_wrong(draw, 8) else st.integers(1, 3))
    length = draw(st.integers(0, 6) if _sometimes_wrong(draw, 8) else st.integers(1, 6))
    if _sometimes_wrong(draw, 8):  # ids outside the vocabulary, or anywhere in int64
        ids = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows * length, max_size=rows * length))
    else:
        ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=rows * length, max_size=rows * length))
    if _sometimes_wrong(draw, 8):  # masks that are not 0/1 right padding
        mask = draw(st.lists(st.integers(-2, 3), min_size=rows * length, max_size=rows * length))
    else:
        kept = draw(st.lists(st.integers(1, max(1, length)), min_size=rows, max_size=rows))
        mask = [int(column < keep) for keep in kept for column in range(length)]
    names = ["input_ids", "attention_mask"]
    if _sometimes_wrong(draw, 8):  # missing, doubled, extra or unnamed inputs
        names = draw(st.lists(st.sampled_from(["input_ids", "attention_mask", "token_type_ids", ""]), max_size=3))
    encoding = "mixed" if _sometimes_wrong(draw, 8) else draw(st.sampled_from(["raw", "typed"]))
    wrapping = _sometimes_wrong(draw, 8)
    message = pb.ModelInferRequest(model_name=MODEL)
    raw_contents: list[bytes] = []
    for index, name in enumerate(names):
        values = ids if name == "input_ids" else mask
        datatype = draw(st.sampled_from(DATATYPES)) if _sometimes_wrong(draw, 8) else "INT64"
        shape = [rows, length]
        if index == 0 and wrapping:
            # A product that wraps around to 0 in int64, a zero-size shape numpy cannot
            # hold, too many dimensions; with a payload that agrees with the naive count.
            shape, count = draw(st.sampled_from(WRAPPING_SHAPES))
            values = [1] * count
        elif _sometimes_wrong(draw, 8):  # a shape that lies: wrong, negative or huge dimensions
            shape = draw(st.lists(st.integers(-3, 8) | st.integers(2**31, 2**63 - 1), max_size=4))
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        if encoding == "raw" or (encoding == "mixed" and index % 2 == 0):
            data = np.asarray(values, dtype=np.int64).tobytes()
            lie = draw(st.sampled_from([-8, -1, 1, 3])) if _sometimes_wrong(draw, 8) else 0
            raw_contents.append(data[: len(data) + lie] if lie < 0 else data + b"\0" * lie)
        else:
            tensor.contents.CopyFrom(_typed(datatype, values))
    if raw_contents:
        extra = draw(st.sampled_from([-1, 1])) if _sometimes_wrong(draw, 8) else 0  # one raw entry off
        message.raw_input_contents.extend(raw_contents[:-1] if extra < 0 else raw_contents + [b""] * extra)
    outputs = ["logits", "label", "probabilities"] + (["embeddings"] if _sometimes_wrong(draw, 8) else [])
    for output in draw(st.lists(st.sampled_from(outputs), max_size=2)):
        message.outputs.add(name=output)
    return message


@pytest_asyncio.fixture(scope="module")
async def inference_core(model_repository: Path) -> AsyncIterator[InferenceCore]:
    """The service's own core (ONNX Runtime) behind no network."""
    core = build_core(InferenceSettings(model_repository=model_repository, max_sequences_per_request=8))
    await core.load()
    yield core
    await core.close()


async def test_generated_oip_requests_are_answered_or_invalid(inference_core: InferenceCore) -> None:
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()

    @hypothesis_settings(250)
    @given(message=infer_requests())
    def check(message: pb.ModelInferRequest) -> None:
        try:
            request = request_from_pb(message)
            response = asyncio.run_coroutine_threadsafe(inference_core.infer(request), loop).result(timeout=30)
        except Exception as error:
            seen[rejected_as_expected(error)] += 1
            return
        seen["answered"] += 1
        rows = request.inputs[0].data.shape[0]
        for tensor in response.outputs:
            assert tensor.data.shape[0] == rows
            if tensor.name == "probabilities":
                assert np.isfinite(tensor.data).all()
                np.testing.assert_allclose(tensor.data.sum(axis=1), 1.0, rtol=1e-5)

    # The core's batcher runs on this loop: the examples are generated in a thread.
    await asyncio.to_thread(check)
    assert seen["answered"] and seen["InvalidInput"]


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([2**32, 2**32], b"", "more elements than any tensor can hold"),  # wrapped to 0 in int64
        ([0, 2**62], b"", "more elements than any tensor can hold"),
        ([1] * 40, b"\0" * 8, "40 dimensions"),
        ([-1, 2], b"\0" * 16, "must not be negative"),
        ([1, 2], b"\0" * 15, "raw data has 15 bytes"),
    ],
)
def test_lying_shapes_and_byte_lengths_are_invalid_input(shape: list[int], data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        oip.decode_raw("input_ids", "INT64", shape, data)


@pytest.mark.reliability(
    "Hostile input",
    "OIP v2 ModelInfer over gRPC: generated tensors with lying shapes and byte lengths, wrong datatypes, "
    "raw/typed mixes, missing and extra inputs, ids outside the vocabulary, masks not 0/1",
    "an answer or INVALID_ARGUMENT with a message; never INTERNAL",
)
async def test_inference_server_answers_generated_requests_or_invalid_argument(
    inference_target: str, observed: Observed
) -> None:
    seen: Counter[str] = Counter()

    def run() -> None:
        with grpc.insecure_channel(inference_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            @hypothesis_settings(50)
            @given(message=infer_requests())
            def check(message: pb.ModelInferRequest) -> None:
                try:
                    stub.ModelInfer(message, timeout=30)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
                    assert error.details()
                    seen["INVALID_ARGUMENT"] += 1
                    return
                seen["OK"] += 1

            check()

    await asyncio.to_thread(run)  # the server answers on this event loop
    observed.record(
        f"{sum(seen.values())} generated requests: {seen['OK']} answered, "
        f"{seen['INVALID_ARGUMENT']} INVALID_ARGUMENT; no INTERNAL"
    )
    assert seen["OK"] and seen["INVALID_ARGUMENT"]


# --- Post-processor ---------------------------------------------------------------------

HOSTILE_FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324, 0.0, -0.0]
)


PostprocessRequest = tuple[list[float], int, list[int], list[float]]


@st.composite
def postprocess_requests(draw: st.DrawFn) -> PostprocessRequest:
    """(logits, num_labels, document_index, row_weights): hostile values in some rows, and
    now and then a wrong width, label count, document numbering or weight."""
    rows = draw(st.integers(1, 4))
    values = HOSTILE_FLOATS | st.floats(-50, 50) if _sometimes_wrong(draw, 2) else st.floats(-50, 50)
    logits = draw(st.lists(values, min_size=3 * rows, max_size=3 * rows))
    if _sometimes_wrong(draw, 8):
        logits = logits[: draw(st.integers(0, len(logits) - 1))]
    num_labels = draw(st.sampled_from([0, 2, 4, -3])) if _sometimes_wrong(draw, 8) else 3
    documents: list[int] = []
    if _sometimes_wrong(draw, 8):
        documents = draw(st.lists(st.integers(-2, 4), max_size=4))
    elif draw(st.booleans()):  # chunks of documents: 0, 0, 1, ...
        documents = sorted(draw(st.lists(st.integers(0, rows - 1), min_size=rows, max_size=rows)))
        documents = [sorted(set(documents)).index(d) for d in documents]
    weights: list[float] = []
    if draw(st.booleans()):
        weight = HOSTILE_FLOATS if _sometimes_wrong(draw, 4) else st.floats(5e-324, 1.7e308)
        weights = draw(st.lists(weight, min_size=rows, max_size=rows + 1))
    return logits, num_labels, documents, weights


@pytest.fixture(scope="module")
def postprocessors(
    model_repository: Path, built_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Postprocessor]:
    """One over the test model, one over a version whose temperature is below 1 (which
    scales large logits up)."""
    cold = tmp_path_factory.mktemp("cold-models")
    link_version(cold, built_model, "1", temperature=0.25)
    return [Postprocessor(ModelRepository(root)) for root in (model_repository, cold)]


@pytest.mark.reliability(
    "Hostile input",
    "Post-processor: generated logits with NaN, ±inf, ±1e308 and subnormals, wrong widths, odd weights and "
    "document indexes, temperatures above and below 1",
    "finite probabilities in [0, 1] summing to 1, or InvalidInput; never NaN",
)
def test_any_logits_give_probabilities_or_invalid_input(
    postprocessors: list[Postprocessor], observed: Observed
) -> None:
    seen: Counter[str] = Counter()

    @hypothesis_settings(400)
    @given(which=st.sampled_from([0, 1]), request=postprocess_requests(), aggregation=st.sampled_from(Aggregation))
    def check(which: int, request: PostprocessRequest, aggregation: Aggregation) -> None:
        logits, num_labels, documents, weights = request
        try:
            result = postprocessors[which].process(
                MODEL, "1", logits, num_labels, documents, weights, aggregation=aggregation
            )
        except Exception as error:
            seen[rejected_as_expected(error)] += 1
            return
        seen["processed"] += 1
        assert result.results
        for document in result.results:
            probabilities = np.array(document.probabilities)
            assert np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1).all()
            assert abs(probabilities.sum() - 1) < 1e-9
            assert document.label in result.labels

    check()
    observed.record(
        f"{sum(seen.values())} generated requests: {seen['processed']} gave probabilities, "
        f"{seen['InvalidInput']} InvalidInput; no NaN, no other exception"
    )
    assert seen["processed"] and seen["InvalidInput"]


def test_extreme_finite_logits_and_weights_still_give_probabilities(postprocessors: list[Postprocessor]) -> None:
    # A temperature below 1 used to turn 1e308 into inf, then NaN; 1e300 weights overflowed.
    cold = postprocessors[1]
    result = cold.process(MODEL, "1", [1e308, -1e308, 0.0, 2.0, 1.0, 0.0], 3, (0, 0), row_weights=(1e300, 1e300))
    (document,) = result.results
    assert document.probabilities == pytest.approx([0.9908, 0.0090, 0.0002], abs=1e-4)
    assert document.label == "negative"
    with pytest.raises(InvalidInput, match="document_index holds -1"):
        cold.process(MODEL, "1", [0.0] * 6, 3, document_index=(-1, 0))


def test_rejections_quote_positions_not_the_text(tokenizer: Tokenizer) -> None:
    for bad in (["secret-text-\ud800"], ["secret-text " * 400], ["", "secret-text"]):
        with pytest.raises(InfermeshError) as caught:
            tokenizer.tokenize(bad)
        assert "secret" not in caught.value.detail
