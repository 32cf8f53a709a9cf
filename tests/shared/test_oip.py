from __future__ import annotations

import numpy as np
import pytest

from shared import oip
from shared.errors import InvalidInput


def test_bytes_round_trip_with_length_prefixes() -> None:
    raw = oip.encode_bytes_elements([b"neg", "ütf-8", b""])
    assert raw[:4] == (3).to_bytes(4, "little")
    decoded = oip.decode_raw("t", "BYTES", [3], raw)
    assert list(decoded) == [b"neg", "ütf-8".encode(), b""]


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ((10).to_bytes(4, "little") + b"abc", "claims 10 bytes; 3 remain"),
        (b"\x01\x00", "ends inside a length prefix"),
        ((1).to_bytes(4, "little") + b"a", "holds 1 elements; its shape needs 2"),
    ],
)
def test_bytes_that_lie_about_their_length_are_rejected(raw: bytes, detail: str) -> None:
    with pytest.raises(InvalidInput, match=detail):
        oip.decode_raw("t", "BYTES", [2], raw)


def test_numeric_raw_and_typed_decoding_check_sizes() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert (oip.decode_raw("x", "INT64", [2, 3], array.tobytes()) == array).all()
    with pytest.raises(InvalidInput, match="needs 48"):
        oip.decode_raw("x", "INT64", [2, 3], array.tobytes()[:-1])
    with pytest.raises(InvalidInput, match="unknown datatype 'INT128'"):
        oip.decode_raw("x", "INT128", [1], b"")
    with pytest.raises(InvalidInput, match="must not be negative"):
        oip.decode_typed("x", "INT64", [-1, 3], [1, 2, 3])
    assert oip.decode_typed("x", "FP32", [2], [0.5, 1.5]).dtype == np.float32
