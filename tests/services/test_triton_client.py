"""A stock Triton client (tritonclient[grpc] from PyPI) against our inference service."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from tests.conftest import MODEL

HEADLINES = ["Shares of Acme plunge after profit warning", "Acme beats estimates and raises guidance"]


async def test_triton_client_metadata_readiness_and_inference(inference_target: str, built_model: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("triton_client_check.py")),
        inference_target,
        str(built_model / "tokenizer.json"),
        MODEL,
        *HEADLINES,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"]["name"] == "infermesh"
    assert "model_repository" in seen["server"]["extensions"]
    assert {(m["name"], m["version"], m["state"]) for m in seen["index"]["models"]} == {
        (MODEL, "1", "READY"),
        (MODEL, "2", "READY"),
    }
    metadata = seen["metadata"]
    assert metadata["name"] == MODEL and metadata["versions"] == ["1", "2"]
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
        ("input_ids", "INT64"),
        ("attention_mask", "INT64"),
    ]

    raw = seen["raw"]
    assert raw["labels"] == ["negative", "positive"]
    assert raw["id"] == "triton-1" and raw["version"] == "2"
    np.testing.assert_allclose(np.array(raw["probabilities"]).sum(axis=1), 1.0, atol=1e-5)

    typed = seen["typed"]
    assert typed["labels"] == ["negative", "positive"] and typed["version"] == "1"
    np.testing.assert_allclose(typed["logits"], raw["logits"], atol=1e-4)

    assert seen["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in seen["unknown_model_error"]["message"]
