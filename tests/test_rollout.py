"""Rolling a new version out on a real inference service: canary share, shadow mode,
promotion that refuses a worse candidate, and rollback, through the CLI a user runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from pydantic import SecretStr
from tokenizers import Tokenizer
from typer.testing import CliRunner

from infermesh.cli import app
from services.inference.server import start as start_inference
from services.inference.settings import InferenceSettings
from shared.grpc_client import channel
from shared.model_repository import ModelRepository, RolloutRule
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from tests.conftest import MODEL, link_version
from tests.test_pipeline import CLEAR_HEADLINES

runner = CliRunner()
#: The inference service's admin token: the rollout commands reload it through RepositoryModelLoad.
ADMIN_TOKEN = "rollout-admin-token-0123456789"
#: Version 2 reads the same logits with negative and positive swapped: a clearly worse model.
SWAPPED_LABELS = ["positive", "neutral", "negative"]


@pytest.fixture
def repository(built_model: Path, tmp_path: Path) -> Path:
    link_version(tmp_path, built_model, "1")
    link_version(tmp_path, built_model, "2", labels=SWAPPED_LABELS)
    link_version(tmp_path, built_model, "3")
    ModelRepository(tmp_path).write_rollout(MODEL, RolloutRule(serving="1"))
    return tmp_path


@pytest_asyncio.fixture
async def inference(repository: Path) -> AsyncIterator[str]:
    settings = InferenceSettings(
        grpc_port=0, model_repository=repository, model_control_mode="explicit", admin_token=SecretStr(ADMIN_TOKEN)
    )
    running, core = await start_inference(settings)
    yield f"127.0.0.1:{running.port}"
    await running.stop(0)
    await core.close()


def request_for(texts: list[str], built_model: Path, version: str = "") -> pb.ModelInferRequest:
    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    request = pb.ModelInferRequest(model_name=MODEL, model_version=version)
    for name, rows in (
        ("input_ids", [e.ids for e in encodings]),
        ("attention_mask", [e.attention_mask for e in encodings]),
    ):
        array = np.array(rows, dtype=np.int64)
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        tensor.contents.int64_contents.extend(array.ravel().tolist())
    request.outputs.add(name="label")
    return request


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


async def async_cli(*args: str) -> tuple[int, str]:
    """The CLI runs its own event loop, so from a test's loop it runs in a thread."""
    return await asyncio.to_thread(cli, *args)


async def answering_versions(inference: str, request: pb.ModelInferRequest, count: int) -> Counter[str]:
    async with channel(inference) as ch:
        stub = infer_grpc.GRPCInferenceServiceStub(ch)
        semaphore = asyncio.Semaphore(16)

        async def one() -> str:
            async with semaphore:
                return (await stub.ModelInfer(request)).model_version

        return Counter(await asyncio.gather(*(one() for _ in range(count))))


def routed(version: str, route: str) -> float:
    labels = {"model": MODEL, "version": version, "route": route}
    return REGISTRY.get_sample_value("infermesh_inference_routed_requests_total", labels) or 0.0


async def test_a_canary_answers_its_share_of_unpinned_requests(
    inference: str, repository: Path, built_model: Path
) -> None:
    code, output = await async_cli(
        "rollout", "--model", MODEL, "--candidate", "3", "--canary", "0.25",
        "--repository", str(repository), "--inference", inference, "--admin-token", ADMIN_TOKEN,
    )  # fmt: skip
    assert code == 0, output
    assert f"applied by {inference}" in output
    canary_before = routed("3", "canary")
    versions = await answering_versions(inference, request_for(["Acme shares soar"], built_model), 800)
    assert set(versions) == {"1", "3"}
    share = versions["3"] / 800
    assert abs(share - 0.25) < 0.06, share  # about 4 standard deviations of a fair 25% draw
    assert routed("3", "canary") - canary_before == versions["3"]
    pinned = await answering_versions(inference, request_for(["Acme shares soar"], built_model, "1"), 20)
    assert pinned == Counter({"1": 20}), "a pinned version is never rerouted"


async def test_shadow_mode_scores_the_candidate_but_returns_only_the_serving_answer(
    inference: str, repository: Path, built_model: Path
) -> None:
    code, output = await async_cli(
        "rollout", "--model", MODEL, "--candidate", "2", "--shadow",
        "--repository", str(repository), "--inference", inference, "--admin-token", ADMIN_TOKEN,
    )  # fmt: skip
    assert code == 0, output

    def shadowed(outcome: str) -> float:
        labels = {"model": MODEL, "candidate": "2", "outcome": outcome}
        return REGISTRY.get_sample_value("infermesh_inference_shadow_sequences_total", labels) or 0.0

    before = {outcome: shadowed(outcome) for outcome in ("agree", "disagree")}
    texts = list(CLEAR_HEADLINES)
    async with channel(inference) as ch:
        stub = infer_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(5):
            response = await stub.ModelInfer(request_for(texts, built_model))
            assert response.model_version == "1"
    await asyncio.sleep(0.2)  # the shadow comparison finishes after the answer
    agreed = shadowed("agree") - before["agree"]
    disagreed = shadowed("disagree") - before["disagree"]
    assert agreed + disagreed == 5 * len(texts)
    # The swapped-label candidate agrees on neutral headlines only.
    neutral = sum(label == "neutral" for label in CLEAR_HEADLINES.values())
    assert agreed == 5 * neutral


async def test_promotion_refuses_a_worse_candidate_unless_forced_and_rollback_returns(
    inference: str, repository: Path, built_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = tmp_path_factory.mktemp("data") / "clear.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in CLEAR_HEADLINES.items()))
    where = ("--repository", str(repository), "--inference", inference, "--admin-token", ADMIN_TOKEN)
    request = request_for(["Acme shares soar after record profit"], built_model)

    code, output = await async_cli("promote", "--model", MODEL, "--candidate", "2", "--data", str(data), *where)
    assert code == 1
    assert "refused: version 2 macro-F1" in output and "below serving version 1's" in output
    assert ModelRepository(repository).rollout(MODEL) == RolloutRule(serving="1")
    assert await answering_versions(inference, request, 5) == Counter({"1": 5})

    code, output = await async_cli("promote", "--model", MODEL, "--candidate", "3", "--data", str(data), *where)
    assert code == 0, output  # as good as what serves: accepted
    assert await answering_versions(inference, request, 5) == Counter({"3": 5})

    code, output = await async_cli("promote", "--model", MODEL, "--candidate", "2", "--force", *where)
    assert code == 0, output
    assert ModelRepository(repository).rollout(MODEL) == RolloutRule(serving="2", history=["1", "3"])
    assert await answering_versions(inference, request, 5) == Counter({"2": 5})

    code, output = await async_cli("rollback", "--model", MODEL, *where)
    assert code == 0, output
    assert await answering_versions(inference, request, 5) == Counter({"3": 5})
    code, output = await async_cli("rollback", "--model", MODEL, *where)
    assert code == 0 and ModelRepository(repository).rollout(MODEL) == RolloutRule(serving="1")
    code, output = await async_cli("rollback", "--model", MODEL, *where)
    assert code == 1 and "no earlier serving version" in output


async def test_without_the_admin_token_the_rule_is_written_but_not_applied(inference: str, repository: Path) -> None:
    where = ("--repository", str(repository), "--inference", inference)
    code, output = await async_cli("rollout", "--model", MODEL, "--candidate", "3", "--canary", "0.1", *where)
    assert code == 0, output
    assert f"not applied: {inference} answered UNAUTHENTICATED" in output
    assert ModelRepository(repository).rollout(MODEL) == RolloutRule(
        serving="1", candidate="3", mode="canary", canary_share=0.1
    )


def test_rollout_mistakes_are_refused_with_a_reason(repository: Path) -> None:
    where = ("--repository", str(repository), "--inference", "")
    code, output = cli("rollout", "--model", MODEL, "--candidate", "9", "--canary", "0.1", *where)
    assert code == 1 and "version '9'" in output
    code, output = cli("rollout", "--model", MODEL, "--candidate", "1", "--canary", "0.1", *where)
    assert code == 1 and "already serving" in output
    code, output = cli("promote", "--model", MODEL, *where)
    assert code == 1 and "no candidate" in output
    code, output = cli("promote", "--model", MODEL, "--candidate", "3", *where)
    assert code == 1 and "give --data, or --force" in output
    assert "Traceback" not in output
