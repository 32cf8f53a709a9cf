"""A real S3-compatible server for the model store's tests: moto's standalone server
(`python -m moto.server`), a separate process speaking S3's HTTP API on a loopback port
it picks itself. boto3, the client under test, is the one the services use, unmocked.
(Debian packages neither MinIO nor SeaweedFS; moto's server is what installs here.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from pydantic import SecretStr

from shared.model_store import StoreSettings
from tests.conftest import MODEL

#: moto accepts any credentials; these only have to be consistent.
ACCESS_KEY = "infermesh-test"
SECRET_KEY = "infermesh-test-secret"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if found:
                port = int(found.group(1))
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's S3 server did not start:\n{log.read_text(errors='replace')}")
            else:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def s3_settings(endpoint: str, **changes: object) -> StoreSettings:
    """Settings for a new, empty bucket on the test server."""
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)  # fmt: skip
    return StoreSettings(
        url=f"s3://{bucket}/infermesh",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id=SecretStr(ACCESS_KEY),
        secret_access_key=SecretStr(SECRET_KEY),
        **changes,  # type: ignore[arg-type]
    )


def store_environment(settings: StoreSettings) -> dict[str, str]:
    """The INFERMESH_STORE_* variables a service process reads for `settings`."""
    env = {
        "INFERMESH_STORE_URL": settings.url,
        "INFERMESH_STORE_ENDPOINT_URL": settings.endpoint_url,
        "INFERMESH_STORE_REGION": settings.region,
        "INFERMESH_STORE_POLL_SECONDS": str(settings.poll_seconds),
    }
    if settings.access_key_id and settings.secret_access_key:
        env["INFERMESH_STORE_ACCESS_KEY_ID"] = settings.access_key_id.get_secret_value()
        env["INFERMESH_STORE_SECRET_ACCESS_KEY"] = settings.secret_access_key.get_secret_value()
    return env


@pytest.fixture(params=["s3", "folder"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """Both backends: S3 on the moto server, and a shared folder."""
    if request.param == "s3":
        return s3_settings(request.getfixturevalue("s3_endpoint"))
    folder = tmp_path / "shared-volume"
    folder.mkdir()
    return StoreSettings(url=folder.as_uri())


def slim_version(root: Path, built_model: Path, version: str, **config_changes: object) -> Path:
    """`root/MODEL/version` with only what the inference service needs (the int8 graph
    and the tokenizer, linked from the built model), so tests move 23 MB, not 200."""
    folder = root / MODEL / version
    folder.mkdir(parents=True)
    config = json.loads((built_model / "config.json").read_text())
    keep = {"model.int8.onnx", "tokenizer.json"}
    for name in keep:
        (folder / name).symlink_to(built_model / name)
    config |= {
        "version": version,
        "variants": {"int8": "model.int8.onnx"},
        "default_variant": "int8",
        "sha256": {k: v for k, v in config["sha256"].items() if k in keep},
    }
    (folder / "config.json").write_text(json.dumps(config | config_changes))
    return folder


def export_store_credentials(monkeypatch: pytest.MonkeyPatch, settings: StoreSettings) -> None:
    """The CLI reads where the store is and how to log in as every process does, from
    INFERMESH_STORE_* (only `--store` names the URL)."""
    for name, value in store_environment(settings).items():
        if name != "INFERMESH_STORE_URL":
            monkeypatch.setenv(name, value)
