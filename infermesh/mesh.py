"""Runs the whole mesh on one machine: each service as its own process, health-checked,
stopped together. `infermesh run` and `make run` use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_client import blocking_channel


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    env_prefix: str
    port: int
    metrics_port: int


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("tokenizer", "services.tokenizer", "INFERMESH_TOKENIZER_", 50051, 9101),
    ServiceSpec("inference", "services.inference", "INFERMESH_INFERENCE_", 8001, 8002),
    ServiceSpec("postprocessor", "services.postprocessor", "INFERMESH_POSTPROCESSOR_", 50052, 9102),
    ServiceSpec("explainer", "services.explainer", "INFERMESH_EXPLAINER_", 50053, 9103),
)
WORKER_METRICS_PORT = 9104
DEFAULT_OTLP_RECEIVER_PORT = 4317


def trace_viewer_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment that makes every process export traces to the gateway's OTLP
    receiver, unless the user already points OTLP somewhere (Jaeger, Tempo, a collector)."""
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return {}
    port = environ.get("INFERMESH_GATEWAY_OTLP_RECEIVER_PORT") or str(DEFAULT_OTLP_RECEIVER_PORT)
    return {
        "INFERMESH_GATEWAY_OTLP_RECEIVER_PORT": port,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        # Spans show up within a second rather than the default five.
        "OTEL_BSP_SCHEDULE_DELAY": environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000"),
    }


def service(name: str) -> ServiceSpec:
    return next(spec for spec in SERVICES if spec.name == name)


def wait_until_serving(target: str, deadline: float) -> bool:
    """Polls the gRPC health service until it says SERVING or the deadline passes."""
    with blocking_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


class LocalMesh:
    """Child processes of the services, started in order and stopped in reverse."""

    def __init__(self, repository: Path, host: str = "127.0.0.1", extra_env: Mapping[str, str] | None = None):
        self.repository = repository
        self.host = host
        self.extra_env = dict(extra_env or {})
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout_seconds: float = 120.0) -> None:
        for spec in SERVICES:
            env = dict(os.environ)
            env.update(self.extra_env)
            env[f"{spec.env_prefix}MODEL_REPOSITORY"] = str(self.repository)
            env[f"{spec.env_prefix}HOST"] = self.host
            env.setdefault(f"{spec.env_prefix}GRPC_PORT", str(spec.port))
            env.setdefault(f"{spec.env_prefix}METRICS_PORT", str(spec.metrics_port))
            if spec.name == "explainer":
                env["INFERMESH_EXPLAINER_INFERENCE"] = self.address(service("inference"))
            self.processes[spec.name] = subprocess.Popen([sys.executable, "-m", spec.module], env=env)
        deadline = time.monotonic() + timeout_seconds
        for spec in SERVICES:
            if not wait_until_serving(self.address(spec), deadline):
                self.stop()
                raise RuntimeError(f"{spec.name} did not become SERVING on {self.address(spec)}")

    def start_worker(self, kafka_bootstrap: str, extra_env: Mapping[str, str] | None = None) -> None:
        """The sentiment monitor worker, pointed at these services and that Kafka."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(extra_env or {})
        addresses = {spec.name: self.address(spec) for spec in SERVICES}
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
        env["INFERMESH_WORKER_TOKENIZER"] = addresses["tokenizer"]
        env["INFERMESH_WORKER_INFERENCE"] = addresses["inference"]
        env["INFERMESH_WORKER_POSTPROCESSOR"] = addresses["postprocessor"]
        self.processes["worker"] = subprocess.Popen([sys.executable, "-m", "workers.sentiment_monitor"], env=env)

    def start_gateway(self, kafka_bootstrap: str, http_port: int, timeout_seconds: float = 60.0) -> str:
        """The REST gateway and dashboard; returns its base URL once /healthz answers."""
        env = dict(os.environ)
        env.update(self.extra_env)
        addresses = {spec.name: self.address(spec) for spec in SERVICES}
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
        env["INFERMESH_GATEWAY_HOST"] = self.host
        env["INFERMESH_GATEWAY_HTTP_PORT"] = str(http_port)
        env["INFERMESH_GATEWAY_DASHBOARD"] = "true" if kafka_bootstrap else "false"
        env["INFERMESH_GATEWAY_TOKENIZER"] = addresses["tokenizer"]
        env["INFERMESH_GATEWAY_INFERENCE"] = addresses["inference"]
        env["INFERMESH_GATEWAY_POSTPROCESSOR"] = addresses["postprocessor"]
        env["INFERMESH_GATEWAY_EXPLAINER"] = addresses["explainer"]
        self.processes["gateway"] = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
        url = f"http://{self.host}:{http_port}"
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        return url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the gateway did not answer on {url}")

    def address(self, spec: ServiceSpec) -> str:
        return f"{self.host}:{self._setting(spec.env_prefix + 'GRPC_PORT', spec.port)}"

    def metrics_url(self, name: str) -> str:
        """Where a process (a service, `worker` or `gateway`) serves /metrics."""
        if name == "gateway":
            return f"http://{self.host}:{self._setting('INFERMESH_GATEWAY_HTTP_PORT', 8080)}/metrics"
        if name == "worker":
            return f"http://{self.host}:{self._setting('INFERMESH_WORKER_METRICS_PORT', WORKER_METRICS_PORT)}/metrics"
        spec = service(name)
        return f"http://{self.host}:{self._setting(spec.env_prefix + 'METRICS_PORT', spec.metrics_port)}/metrics"

    def _setting(self, key: str, default: int) -> str:
        return self.extra_env.get(key) or os.environ.get(key) or str(default)

    def wait(self) -> str | None:
        """Blocks until a child exits; returns its name."""
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    return name
            time.sleep(0.5)

    def stop(self, grace_seconds: float = 10.0) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
