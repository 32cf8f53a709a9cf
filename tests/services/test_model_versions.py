"""Versions come and go while the inference service serves: the OIP model repository
extension (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) on a real server,
with clients sending requests the whole time."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from pydantic import SecretStr, ValidationError

from services.inference.control import ModelControl
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from shared.errors import AdminUnauthenticated
from shared.grpc_client import channel
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from tests.conftest import MODEL, link_version

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
#: gRPC metadata presenting the admin token.
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
EXPLICIT_CONTROL: dict[str, Any] = {"model_control_mode": "explicit", "admin_token": SecretStr(ADMIN_TOKEN)}
IDS = np.array([[101, 7592, 2015, 17406, 2044, 5618, 5432, 102]], dtype=np.int64)


def add_version(repository: Path, built_model: Path, version: str, broken: bool = False) -> None:
    """A version linking the built model, or one whose model file is not ONNX at all."""
    folder = link_version(repository, built_model, version)
    if broken:
        config = json.loads((folder / "config.json").read_text())
        model_file = folder / config["variants"][config["default_variant"]]
        model_file.unlink()
        model_file.write_bytes(b"not an onnx graph")


@pytest.fixture
def repository(built_model: Path, tmp_path: Path) -> Path:
    for version in ("1", "2"):
        add_version(tmp_path, built_model, version)
    return tmp_path


@asynccontextmanager
async def serving(repository: Path, **settings: Any) -> AsyncIterator[infer_grpc.GRPCInferenceServiceAsyncStub]:
    running, core = await start_inference(InferenceSettings(grpc_port=0, model_repository=repository, **settings))
    try:
        async with channel(f"127.0.0.1:{running.port}") as ch:
            yield infer_grpc.GRPCInferenceServiceStub(ch)
    finally:
        await running.stop(0)
        await core.close()


@pytest_asyncio.fixture
async def stub(repository: Path) -> AsyncIterator[infer_grpc.GRPCInferenceServiceAsyncStub]:
    """A server whose versions may be loaded and unloaded, by the admin token's holder."""
    async with serving(repository, **EXPLICIT_CONTROL) as opened:
        yield opened


def infer_request(version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, model_version=version)
    for name, array in (("input_ids", IDS), ("attention_mask", np.ones_like(IDS))):
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        tensor.contents.int64_contents.extend(array.ravel().tolist())
    request.outputs.add(name="label")
    return request


async def index(stub: infer_grpc.GRPCInferenceServiceAsyncStub) -> dict[str, tuple[str, str]]:
    reply = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    return {m.version: (m.state, m.reason) for m in reply.models if m.name == MODEL}


def load_request(config: dict[str, object] | None = None) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=MODEL)
    if config is not None:
        request.parameters["config"].string_param = json.dumps(config)
    return request


async def test_versions_load_and_unload_under_traffic_without_a_failed_request(
    stub: infer_grpc.GRPCInferenceServiceAsyncStub, repository: Path, built_model: Path
) -> None:
    assert await index(stub) == {"1": ("UNAVAILABLE", "not selected by the version policy"), "2": ("READY", "")}
    served: Counter[str] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                served[(await stub.ModelInfer(infer_request())).model_version] += 1
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(0.3)
    add_version(repository, built_model, "3")
    await stub.RepositoryModelLoad(load_request(), metadata=ADMIN)  # latest 1: 3 replaces 2
    after_swap = dict(served)
    await asyncio.sleep(0.3)
    assert await index(stub) == {
        "1": ("UNAVAILABLE", "not selected by the version policy"),
        "2": ("UNAVAILABLE", "not selected by the version policy"),
        "3": ("READY", ""),
    }
    await stub.RepositoryModelLoad(load_request({"version_policy": {"specific": {"versions": [1, 3]}}}), metadata=ADMIN)
    await asyncio.sleep(0.3)
    assert (await stub.ModelInfer(infer_request("1"))).model_version == "1"
    stop.set()
    await asyncio.gather(*clients)

    assert failures == []
    assert after_swap.get("2", 0) > 0 and served["3"] > 0
    assert set(served) == {"2", "3"}, "unpinned requests go to the newest serving version"
    assert {v for v, (state, _) in (await index(stub)).items() if state == "READY"} == {"1", "3"}
    ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [m.version for m in ready.models] == ["1", "3"]


async def test_unloaded_models_answer_unavailable_and_load_again(
    stub: infer_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(infer_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == f"model {MODEL!r} is not loaded"
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert (await index(stub))["2"] == ("UNAVAILABLE", "unloaded")

    await stub.RepositoryModelLoad(load_request(), metadata=ADMIN)
    assert (await stub.ModelInfer(infer_request())).model_version == "2"
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready


async def test_a_version_that_fails_to_load_changes_nothing(
    stub: infer_grpc.GRPCInferenceServiceAsyncStub, repository: Path, built_model: Path
) -> None:
    add_version(repository, built_model, "3", broken=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(load_request(), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{MODEL} version 3 could not load" in (caught.value.details() or "")
    assert str(repository) not in (caught.value.details() or ""), "no server paths to callers"
    assert (await stub.ModelInfer(infer_request())).model_version == "2"
    state, reason = (await index(stub))["3"]
    assert state == "UNAVAILABLE" and reason.startswith("failed to load")


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (load_request({"version_policy": {"latest": {"num_versions": 0}}}), "INVALID_ARGUMENT", "num_versions > 0"),
        (load_request({"version_policy": {"specific": {"versions": [9]}}}), "INVALID_ARGUMENT", "selects none"),
        (pb.RepositoryModelLoadRequest(model_name="no-such-model"), "NOT_FOUND", "no-such-model"),
    ],
)
async def test_bad_load_requests_are_refused_precisely(
    stub: infer_grpc.GRPCInferenceServiceAsyncStub, request_: pb.RepositoryModelLoadRequest, code: str, detail: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(request_, metadata=ADMIN)
    assert caught.value.code().name == code
    assert detail in (caught.value.details() or "")
    assert (await stub.ModelInfer(infer_request())).model_version == "2"


async def test_unknown_load_parameters_and_bad_json_are_invalid(stub: infer_grpc.GRPCInferenceServiceAsyncStub) -> None:
    request = pb.RepositoryModelLoadRequest(model_name=MODEL)
    request.parameters["file:1/model.onnx"].bytes_param = b"..."
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(request, metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = pb.RepositoryModelLoadRequest(model_name=MODEL)
    request.parameters["config"].string_param = "{not json"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(request, metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not JSON" in (caught.value.details() or "")


async def test_a_swap_answers_the_request_waiting_in_a_forming_batch(repository: Path, built_model: Path) -> None:
    """A request taken into a batch that waits out a long max_queue_delay is answered by the
    version leaving service when a swap retires it, not left to run out its deadline."""
    async with serving(repository, max_queue_delay_ms=60_000, **EXPLICIT_CONTROL) as stub:
        waiting = asyncio.ensure_future(stub.ModelInfer(infer_request(), timeout=20))
        await asyncio.sleep(0.5)  # the request sits in version 2's forming batch
        assert not waiting.done()
        add_version(repository, built_model, "3")
        await stub.RepositoryModelLoad(load_request(), metadata=ADMIN)  # 3 replaces 2
        reply = await asyncio.wait_for(waiting, timeout=10)
        assert reply.model_version == "2"
        assert (await index(stub))["3"] == ("READY", "")


async def test_model_control_is_off_by_default_and_the_model_keeps_serving(repository: Path) -> None:
    """Like Triton's default `--model-control-mode=none`: nobody unloads what serves through
    the data port, whatever credential they present."""
    async with serving(repository) as stub:
        for metadata in ((), ADMIN):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "RepositoryModelUnload is disabled" in (caught.value.details() or "")
            assert "MODEL_CONTROL_MODE=explicit" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RepositoryModelLoad(load_request(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "RepositoryModelLoad is disabled" in (caught.value.details() or "")
        assert (await stub.ModelInfer(infer_request())).model_version == "2"
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
        assert (await index(stub))["2"] == ("READY", ""), "the index stays readable"


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer not-the-admin-token-at-all"),),
        (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
        (("authorization", ADMIN_TOKEN),),  # no scheme
        (("x-api-key", ADMIN_TOKEN),),
    ],
    ids=["none", "wrong", "longer", "no-scheme", "other-key"],
)
async def test_explicit_control_refuses_callers_without_the_admin_token(
    stub: infer_grpc.GRPCInferenceServiceAsyncStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ADMIN_TOKEN not in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(load_request(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await stub.ModelInfer(infer_request())).model_version == "2", "nothing changed"


async def test_explicit_control_with_the_admin_token_unloads(stub: infer_grpc.GRPCInferenceServiceAsyncStub) -> None:
    await stub.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=(("authorization", f"bearer {ADMIN_TOKEN}"),)
    )
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready


def test_an_admin_token_read_from_a_file_with_its_newline_still_matches() -> None:
    """`kubectl create secret --from-file` keeps the file's final newline."""
    control = ModelControl("explicit", SecretStr(ADMIN_TOKEN + "\n"))
    control.check("RepositoryModelUnload", [("authorization", f"Bearer {ADMIN_TOKEN}")], "test")
    with pytest.raises(AdminUnauthenticated):
        control.check("RepositoryModelUnload", [("authorization", f"Bearer {ADMIN_TOKEN}x")], "test")


@pytest.mark.parametrize(
    "settings",
    [{"model_control_mode": "explicit"}, {"model_control_mode": "explicit", "admin_token": SecretStr("short")}],
    ids=["no-token", "short-token"],
)
def test_explicit_control_needs_an_admin_token_of_some_length(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="needs admin_token"):
        InferenceSettings(**settings)
    assert "short" not in repr(InferenceSettings(admin_token=SecretStr("short"))), "the token never shows"
