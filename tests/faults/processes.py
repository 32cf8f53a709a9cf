"""Services and workers as separate processes on loopback, so a test can kill, slow or
restart one the way production loses a pod."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infermesh.mesh import wait_until_serving
from tests.conftest import free_port
from workers.sentiment_monitor.consumer import TEST_PAUSE_BEFORE_COMMIT_ENV


@dataclass
class ServiceProcess:
    """`python -m <module>` with its settings in the environment, on a port that stays
    the same across restarts (clients keep their target)."""

    module: str
    env: Mapping[str, str]
    grpc_port_env: str | None = None
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    metrics_port_env: str | None = None
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="infermesh-", suffix=".log")[1]))
    """Its stdout and stderr, every run appended: `log_tail()` explains a failed test."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_serving: bool = True, timeout_seconds: float = 60.0) -> ServiceProcess:
        env = dict(os.environ) | dict(self.env)
        if self.grpc_port_env:
            env[self.grpc_port_env] = str(self.port)
        if self.metrics_port_env:
            env[self.metrics_port_env] = str(self.metrics_port)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_serving and not wait_until_serving(self.target, time.monotonic() + timeout_seconds):
            self.stop()
            raise RuntimeError(f"{self.module} did not become SERVING on {self.target}")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_seconds: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_seconds)

    def stop(self) -> None:
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def resident_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def readiness(self) -> str:
        """The process's /readyz answer (worker: partitions assigned, broker reachable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as reply:
                return f"{reply.status} {reply.read().decode()}"
        except urllib.error.HTTPError as error:
            return f"{error.code} {error.read().decode()}"

    def metric(self, name: str) -> float:
        """Sum of a Prometheus series' samples (every label set) from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
        )


def inference_process(model_repository: Path, **settings: str) -> ServiceProcess:
    env = {"INFERMESH_INFERENCE_MODEL_REPOSITORY": str(model_repository)}
    env |= {f"INFERMESH_INFERENCE_{key.upper()}": value for key, value in settings.items()}
    return ServiceProcess(
        "services.inference",
        env,
        grpc_port_env="INFERMESH_INFERENCE_GRPC_PORT",
        metrics_port_env="INFERMESH_INFERENCE_METRICS_PORT",
    )


def worker_process(
    bootstrap: str,
    tokenizer: str,
    inference: str,
    postprocessor: str,
    *,
    pause_before_commit: Path | None = None,
    **settings: str,
) -> ServiceProcess:
    """`pause_before_commit`: a path for the scoring stage's test hook (TEST_PAUSE_BEFORE_COMMIT_ENV)."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "INFERMESH_WORKER_TOKENIZER": tokenizer,
        "INFERMESH_WORKER_INFERENCE": inference,
        "INFERMESH_WORKER_POSTPROCESSOR": postprocessor,
        "INFERMESH_WORKER_STAGES": '["score"]',
        "INFERMESH_WORKER_PARTITIONS": "2",
    }
    env |= {f"INFERMESH_WORKER_{key.upper()}": value for key, value in settings.items()}
    if pause_before_commit is not None:
        env[TEST_PAUSE_BEFORE_COMMIT_ENV] = str(pause_before_commit)
    return ServiceProcess("workers.sentiment_monitor", env, metrics_port_env="INFERMESH_WORKER_METRICS_PORT")
