"""`infermesh run` and `infermesh classify` as a user runs them, as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port
from tests.test_pipeline import CLEAR_HEADLINES


def test_run_serves_classify_prints_json_and_ctrl_c_stops_everything(model_repository: Path) -> None:
    infermesh = shutil.which("infermesh", path=str(Path(sys.executable).parent))
    assert infermesh, "the infermesh console script is not installed"
    ports = {name: free_port() for name in ("TOKENIZER", "INFERENCE", "POSTPROCESSOR", "EXPLAINER")}
    env = dict(os.environ) | {f"INFERMESH_{name}_GRPC_PORT": str(port) for name, port in ports.items()}
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
    finally:
        mesh.send_signal(signal.SIGINT)
        rest, _ = mesh.communicate(timeout=30)
    assert mesh.returncode == 0, rest
    assert rest.rstrip().endswith("stopped")
