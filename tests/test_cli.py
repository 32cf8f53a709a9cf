"""`infermesh run` and `infermesh classify` as a user runs them, as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from typer.testing import CliRunner

from gateway.settings import GatewaySettings
from infermesh.broker import EmbeddedBroker
from infermesh.cli import Topic, app
from infermesh.mesh import DEFAULT_OTLP_RECEIVER_PORT, SERVICES, WORKER_METRICS_PORT
from services.explainer.settings import ExplainerSettings
from services.inference.settings import InferenceSettings
from services.postprocessor.settings import PostprocessorSettings
from services.tokenizer.settings import TokenizerSettings
from shared.settings import BaseServiceSettings
from tests.conftest import free_port
from tests.test_pipeline import CLEAR_HEADLINES
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics


def test_run_serves_classify_prints_json_and_ctrl_c_stops_everything(model_repository: Path) -> None:
    infermesh = shutil.which("infermesh", path=str(Path(sys.executable).parent))
    assert infermesh, "the infermesh console script is not installed"
    ports = {name: free_port() for name in ("TOKENIZER", "INFERENCE", "POSTPROCESSOR", "EXPLAINER")}
    env = dict(os.environ) | {f"INFERMESH_{name}_GRPC_PORT": str(port) for name, port in ports.items()}
    metrics_ports = {name: free_port() for name in (*ports, "WORKER")}
    env |= {f"INFERMESH_{name}_METRICS_PORT": str(port) for name, port in metrics_ports.items()}
    env["INFERMESH_GATEWAY_OTLP_RECEIVER_PORT"] = str(free_port())
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        env.pop(variable, None)
    broker_port = free_port()
    env["INFERMESH_BROKER_PORT"] = str(broker_port)
    gateway_port = free_port()
    env["INFERMESH_GATEWAY_HTTP_PORT"] = str(gateway_port)
    env["INFERMESH_GATEWAY_GRPC_PORT"] = str(free_port())
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    mesh = subprocess.Popen(
        [infermesh, "run", "--repository", str(model_repository)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert mesh.stdout is not None
        while time.monotonic() < deadline:
            line = mesh.stdout.readline()
            assert line, "infermesh run exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("ready."):
                break
        output = "".join(lines)
        assert f"grpc://127.0.0.1:{ports['INFERENCE']}" in output
        assert f"127.0.0.1:{broker_port} (embedded" in output
        assert f"http://127.0.0.1:{gateway_port}/dashboard" in output

        texts = list(CLEAR_HEADLINES)[:3]
        classify = subprocess.run(
            [
                infermesh,
                "classify",
                *texts,
                "--tokenizer",
                f"127.0.0.1:{ports['TOKENIZER']}",
                "--inference",
                f"127.0.0.1:{ports['INFERENCE']}",
                "--postprocessor",
                f"127.0.0.1:{ports['POSTPROCESSOR']}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert classify.returncode == 0, classify.stderr
        printed = json.loads(classify.stdout)
        assert printed["model_name"] == "finance-sentiment"
        assert [r["label"] for r in printed["results"]] == [CLEAR_HEADLINES[t] for t in texts]

        bad = subprocess.run(
            [infermesh, "classify", " ", "--tokenizer", f"127.0.0.1:{ports['TOKENIZER']}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1
        assert json.loads(bad.stderr) == {"error": "Invalid input", "detail": "text 0 is empty"}

        # The demo feed's scripted TSLA episode reaches the alerts topic through the
        # embedded broker and the worker, well within a minute.
        alerts = subprocess.run(
            [infermesh, "tail", "alerts", "--limit", "1", "--idle-seconds", "90"],
            env=env | {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker_port}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert alerts.returncode == 0, alerts.stderr
        alert = json.loads(alerts.stdout)
        assert alert["ticker"] == "TSLA" and alert["window"]["share_negative"] >= 0.5
        assert alert["window"]["top_negative"]

        gateway = f"http://127.0.0.1:{gateway_port}"
        assert _get(f"{gateway}/readyz")[0] == 200
        sentiment = urllib.request.Request(
            f"{gateway}/v1/sentiment",
            data=json.dumps({"texts": [texts[0]]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(sentiment, timeout=30) as reply:
            assert reply.status == 200
        _assert_every_process_exports_its_metrics(metrics_ports, gateway)
        assert _get(f"http://127.0.0.1:{metrics_ports['WORKER']}/readyz")[0] == 200
        _assert_traces_cross_every_process(gateway)
    finally:
        mesh.send_signal(signal.SIGINT)
        rest, _ = mesh.communicate(timeout=30)
    assert mesh.returncode == 0, rest
    assert rest.rstrip().endswith("stopped")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, from a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


def _assert_every_process_exports_its_metrics(ports: dict[str, int], gateway: str) -> None:
    """Each process has its own endpoint, and the series of its area moved with the demo's traffic."""
    moved = {
        "TOKENIZER": ["infermesh_tokenizer_texts_total", "infermesh_grpc_server_requests_total"],
        "INFERENCE": [
            "infermesh_inference_sequences_total",
            "infermesh_inference_batch_size_sequences_count",
            "infermesh_inference_batch_tokens_sum",
            "infermesh_inference_model_execution_seconds_count",
        ],
        "POSTPROCESSOR": ["infermesh_postprocess_documents_total"],
        "WORKER": [
            "infermesh_kafka_consumed_records_total",
            "infermesh_kafka_produced_records_total",
            "infermesh_worker_windows_closed_total",
            "infermesh_worker_alerts_total",
            "infermesh_worker_batch_duration_seconds_count",
            "infermesh_pipeline_round_texts_count",
        ],
    }
    for process, names in moved.items():
        status, text = _get(f"http://127.0.0.1:{ports[process]}/metrics")
        assert status == 200, process
        samples = _samples(text)
        for name in names:
            assert _total(samples, name) > 0, f"{name} did not move in the {process.lower()} process"
    status, text = _get(f"http://127.0.0.1:{ports['EXPLAINER']}/metrics")
    assert status == 200 and "infermesh_explainer_explanations_total" in text
    worker = _samples(_get(f"http://127.0.0.1:{ports['WORKER']}/metrics")[1])
    assert any(key.startswith("infermesh_kafka_consumer_lag_records{") for key in worker)
    assert (
        _samples(_get(f"{gateway}/metrics")[1])[
            'infermesh_http_server_requests_total{method="POST",route="/v1/sentiment",status="200"}'
        ]
        == 1
    )


def _assert_traces_cross_every_process(gateway: str) -> None:
    """The processes export to the gateway's OTLP receiver: a REST call's trace spans the
    gateway and the three services; a Kafka batch's spans the worker and the three services."""
    wanted = {
        "infermesh-gateway": {
            "infermesh-gateway",
            "infermesh-tokenizer",
            "infermesh-inference",
            "infermesh-postprocessor",
        },
        "infermesh-worker": {
            "infermesh-worker",
            "infermesh-tokenizer",
            "infermesh-inference",
            "infermesh-postprocessor",
        },
    }
    found: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 30  # exporters send every second
    while time.monotonic() < deadline and len(found) < len(wanted):
        for summary in json.loads(_get(f"{gateway}/traces/api/traces?limit=500")[1]):
            root = str(summary["root_service"])
            if root in wanted and wanted[root] <= set(summary["services"]):
                found.setdefault(root, summary)
        time.sleep(0.5)
    assert set(found) == set(wanted), f"traces seen: {found}"
    spans = json.loads(_get(f"{gateway}/traces/api/traces/{found['infermesh-gateway']['trace_id']}")[1])
    by_id = {span["span_id"]: span for span in spans}
    execute = next(span for span in spans if span["name"] == "model execute")
    assert execute["service"] == "infermesh-inference"
    chain = []
    span = execute
    while span["parent_span_id"] in by_id:
        span = by_id[span["parent_span_id"]]
        chain.append((span["service"], span["name"]))
    assert chain[-1][0] == "infermesh-gateway" and chain[-1][1].startswith("POST /v1/sentiment")


def test_make_run_default_ports_come_from_the_settings_and_never_collide() -> None:
    """`make run` starts every process on its default ports next to the embedded broker; a
    metrics port on Kafka's 9092 once kept the post-processor from starting."""
    settings_classes: dict[str, type[BaseServiceSettings]] = {
        "tokenizer": TokenizerSettings,
        "inference": InferenceSettings,
        "postprocessor": PostprocessorSettings,
        "explainer": ExplainerSettings,
    }
    ports: dict[str, int] = {}
    for spec in SERVICES:
        fields = settings_classes[spec.name].model_fields
        assert (spec.port, spec.metrics_port) == (fields["grpc_port"].default, fields["metrics_port"].default)
        ports[f"{spec.name} gRPC"], ports[f"{spec.name} metrics"] = spec.port, spec.metrics_port
    assert MonitorSettings.model_fields["metrics_port"].default == WORKER_METRICS_PORT
    gateway = GatewaySettings.model_fields
    ports |= {
        "worker metrics": WORKER_METRICS_PORT,
        "gateway HTTP": gateway["http_port"].default,
        "gateway gRPC": gateway["grpc_port"].default,
        "OTLP receiver": DEFAULT_OTLP_RECEIVER_PORT,
        "embedded Kafka": EmbeddedBroker().port,
    }
    by_port: dict[int, list[str]] = {}
    for name, port in ports.items():
        by_port.setdefault(port, []).append(name)
    assert {port: names for port, names in by_port.items() if len(names) > 1} == {}


def test_tail_prints_every_topic_of_the_monitor_by_its_choice(kafka_config: dict[str, Any]) -> None:
    """Every topic the monitor creates can be tailed, the topic stage's three included, and
    each choice reads its own topic."""
    names = [spec.name for spec in monitor_topics()]
    producer = KafkaProducer(**kafka_config, acks="all")
    for name in names:
        producer.send(name, key=b"k", value=json.dumps({"on": name}).encode(), headers=[("error-type", b"schema")])
    producer.flush()
    producer.close()

    runner = CliRunner()
    env = {"KAFKA_BOOTSTRAP_SERVERS": ",".join(kafka_config["bootstrap_servers"])}
    read: dict[str, str] = {}
    for choice in Topic:
        result = runner.invoke(app, ["tail", choice.value, "--limit", "1", "--idle-seconds", "20"], env=env)
        assert result.exit_code == 0, result.output
        printed = json.loads(result.stdout)
        if choice is Topic.dlq:
            assert printed["headers"] == {"error-type": "schema"}
            printed = json.loads(printed["value"])
        read[choice.value] = printed["on"]
    assert sorted(read.values()) == sorted(names)
    assert read["topics"] == "finance.sentiment.topics.v1"
    assert read["topic-windows"] == "finance.topics.windows.v1"
    assert read["topic-alerts"] == "finance.topics.alerts.v1"
