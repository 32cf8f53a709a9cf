"""Issue 21 on one machine: several inference processes follow one store (S3 on a real
S3-compatible server) and one rule. A promotion and a rollback change what every replica
serves within seconds, a replica started later serves the same, and a client asking all
replicas all along, without retries, gets every answer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from shared.model_repository import RolloutRule
from shared.model_store import open_store
from shared.pb import grpc_predict_v2_pb2 as pb
from shared.pb import grpc_predict_v2_pb2_grpc as infer_grpc
from tests.conftest import MODEL
from tests.faults.processes import ServiceProcess, inference_process
from tests.store.conftest import export_store_credentials, s3_settings, slim_version, store_environment
from tests.test_rollout import async_cli, request_for

#: How long a change may take to reach every replica: a few follower passes and a load.
CHANGE_SECONDS = 30.0


def replica(repository: Path, store_env: dict[str, str]) -> ServiceProcess:
    process = inference_process(repository, intra_op_threads="1", max_queue_delay_ms="2")
    process.env = dict(process.env) | store_env
    return process


class Client:
    """Asks every replica in `targets` for unpinned predictions, over and over, with no
    retries (a plain channel), and records who answered what."""

    def __init__(self, request: pb.ModelInferRequest) -> None:
        self.request = request
        self.targets: list[str] = []
        self.answers: list[tuple[str, str, str]] = []
        """(replica, version that answered or "", status code name)."""
        self._stubs: dict[str, infer_grpc.GRPCInferenceServiceAsyncStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, target: str) -> None:
        channel = grpc.aio.insecure_channel(target)
        self._channels.append(channel)
        self._stubs[target] = infer_grpc.GRPCInferenceServiceStub(channel)
        self.targets.append(target)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            for target in list(self.targets):
                try:
                    reply = await self._stubs[target].ModelInfer(self.request, timeout=20)
                    self.answers.append((target, reply.model_version, "OK"))
                except grpc.aio.AioRpcError as error:
                    self.answers.append((target, "", error.code().name))

    def start(self, concurrency: int = 3) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for channel in self._channels:
            await channel.close()

    def latest(self, target: str, count: int = 6) -> list[str]:
        return [version for t, version, _ in self.answers if t == target][-count:]

    async def wait_all_serve(self, version: str, describe: Callable[[], str]) -> float:
        """Seconds until every replica's last answers all came from `version`."""
        started = time.monotonic()
        mark = len(self.answers)
        while time.monotonic() - started < CHANGE_SECONDS:
            fresh = self.answers[mark:]
            if all(
                len(recent := [v for t, v, _ in fresh if t == target][-6:]) == 6 and set(recent) == {version}
                for target in self.targets
            ):
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        raise AssertionError(f"not every replica serves version {version}: {describe()}")


async def test_replicas_follow_one_store_and_one_rule_and_lose_nothing(
    s3_endpoint: str, built_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = s3_settings(s3_endpoint, poll_seconds=0.5)
    export_store_credentials(monkeypatch, settings)
    store = open_store(settings)
    built = tmp_path / "built"
    store.publish(slim_version(built, built_model, "1"), MODEL, "1")
    env = store_environment(settings)
    replicas = [replica(tmp_path / f"replica-{i}", env) for i in range(2)]
    client = Client(request_for(["Acme shares soar after record profit"], built_model))

    def describe() -> str:
        recent = {t: client.latest(t) for t in client.targets}
        logs = "\n".join(f"--- {r.target}\n{r.log_tail(15)}" for r in replicas)
        return f"{recent}\n{logs}"

    try:
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
        for r in replicas:
            client.add(r.target)
        client.start()
        await client.wait_all_serve("1", describe)

        # A new version is published while they serve: it waits for the rule.
        store.publish(slim_version(built, built_model, "2"), MODEL, "2")
        await asyncio.sleep(2.0)
        assert {v for _, v, _ in client.answers[-20:]} == {"1"}, describe()

        # The rule changes once, in the store; every replica follows.
        code, output = await async_cli(
            "promote", "--model", MODEL, "--candidate", "2", "--force", "--store", settings.url
        )
        assert code == 0, output
        await client.wait_all_serve("2", describe)

        # A replica started now serves what the others serve, from its first answer.
        late = replica(tmp_path / "replica-late", env)
        replicas.append(late)
        await asyncio.to_thread(late.start)
        client.add(late.target)
        await asyncio.sleep(1.0)
        assert client.latest(late.target) and set(client.latest(late.target)) == {"2"}, describe()

        code, output = await async_cli("rollback", "--model", MODEL, "--store", settings.url)
        assert code == 0, output
        await client.wait_all_serve("1", describe)
        assert store.read_rule(MODEL).rule == RolloutRule(serving="1")
    finally:
        await client.stop()
        for r in replicas:
            r.stop()

    outcomes = Counter(code for _, _, code in client.answers)
    assert outcomes == Counter({"OK": len(client.answers)}), f"{outcomes}\n{describe()}"
    assert len(client.answers) > 100
    for target in client.targets[:2]:
        assert {v for t, v, _ in client.answers if t == target} == {"1", "2"}


async def test_tokenizer_and_postprocessor_processes_serve_from_the_store_and_follow_it(
    s3_endpoint: str, built_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They start on an empty folder (SERVING proves the first copy), and their followers
    bring later versions in, which both read on demand (the post-processor per request,
    the explainer likewise; the tokenizer's file is the same for versions a rule pairs)."""
    settings = s3_settings(s3_endpoint, poll_seconds=0.5)
    store = open_store(settings)
    built = tmp_path / "built"
    store.publish(slim_version(built, built_model, "1"), MODEL, "1")
    env = store_environment(settings)
    processes = {
        "tokenizer": ServiceProcess("services.tokenizer", env, grpc_port_env="INFERMESH_TOKENIZER_GRPC_PORT"),
        "postprocessor": ServiceProcess(
            "services.postprocessor", env, grpc_port_env="INFERMESH_POSTPROCESSOR_GRPC_PORT"
        ),
    }
    for name, process in processes.items():
        prefix = f"INFERMESH_{name.upper()}_"
        process.env = dict(process.env) | {
            f"{prefix}MODEL_REPOSITORY": str(tmp_path / f"{name}-models"),
            f"{prefix}METRICS_ENABLED": "false",
        }
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes.values()))
        store.publish(slim_version(built, built_model, "2"), MODEL, "2")
        deadline = time.monotonic() + CHANGE_SECONDS
        copies = [tmp_path / f"{name}-models" / MODEL / "2" / "config.json" for name in processes]
        while not all(copy.is_file() for copy in copies) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert all(copy.is_file() for copy in copies), [p.log_tail(10) for p in processes.values()]
        assert all(p.alive for p in processes.values())
    finally:
        for process in processes.values():
            process.stop()
