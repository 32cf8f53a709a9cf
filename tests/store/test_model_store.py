"""The model store on both backends (S3 on a real S3-compatible server, and a shared
folder): a version is published once and copied whole and checked, or not at all; the
rollout rule is changed compare-and-set; the CLI drives both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from infermesh.cli import app
from shared.model_repository import ModelRepository, RolloutRule
from shared.model_store import (
    S3Backend,
    StoreConflict,
    StoreError,
    StoreFollower,
    StoreRepository,
    StoreSettings,
    open_store,
)
from tests.conftest import MODEL
from tests.store.conftest import export_store_credentials, s3_settings, slim_version
from tests.test_pipeline import CLEAR_HEADLINES
from tests.test_rollout import SWAPPED_LABELS

runner = CliRunner()


def test_a_published_version_is_copied_whole_and_checked(
    store_settings: StoreSettings, built_model: Path, tmp_path: Path
) -> None:
    store = open_store(store_settings)
    source = slim_version(tmp_path / "built", built_model, "1")
    manifest = store.publish(source, MODEL, "1")
    assert set(manifest) == {"config.json", "model.int8.onnx", "tokenizer.json"}
    assert store.versions(MODEL) == ["1"]
    assert store.read_rule(MODEL).rule == RolloutRule(serving="1")  # the first version serves

    local = tmp_path / "replica"
    assert StoreFollower(store, local, 1.0).sync_once() is True
    copied = local / MODEL / "1"
    for file in manifest:
        assert (copied / file).read_bytes() == (source / file).read_bytes()
    assert ModelRepository(local).rollout(MODEL) == RolloutRule(serving="1")
    assert StoreFollower(store, local, 1.0).sync_once() is False  # nothing new

    with pytest.raises(StoreError, match="already published"):
        store.publish(source, MODEL, "1")
    with pytest.raises(StoreError, match="describes finance-sentiment version 1, not finance-sentiment version 2"):
        store.publish(source, MODEL, "2")


def test_half_published_or_corrupt_versions_never_reach_a_replica(
    store_settings: StoreSettings, built_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(store_settings)
    built = tmp_path / "built"
    store.publish(slim_version(built, built_model, "1"), MODEL, "1")
    # A publisher that died before its marker: files, no marker.
    half = slim_version(built, built_model, "2")
    for file in ("config.json", "tokenizer.json"):
        store.backend.upload(half / file, f"{MODEL}/2/{file}")
    # A published version whose graph was replaced afterwards.
    store.publish(slim_version(built, built_model, "3"), MODEL, "3")
    store.backend.upload(built / MODEL / "3" / "tokenizer.json", f"{MODEL}/3/model.int8.onnx")

    local = tmp_path / "replica"
    with caplog.at_level(logging.ERROR, logger="shared.model_store"):
        StoreFollower(store, local, 1.0).sync_once()
    assert ModelRepository(local).versions(MODEL) == ["1"]
    assert "version 3 not copied: finance-sentiment version 3: model.int8.onnx does not match its sha256" in caplog.text
    assert sorted(p.name for p in (local / MODEL).iterdir()) == ["1", "rollout.json"], "no staging folder left"
    # A version folder whose files disagree with its own config.json is refused at publish.
    bad = slim_version(built, built_model, "4")
    config = json.loads((bad / "config.json").read_text())
    config["sha256"]["tokenizer.json"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreError, match="tokenizer.json does not match the sha256 its config.json records"):
        store.publish(bad, MODEL, "4")
    assert store.versions(MODEL) == ["1", "3"]


def test_a_new_version_waits_and_a_rule_naming_a_missing_version_is_held_back(
    store_settings: StoreSettings, built_model: Path, tmp_path: Path
) -> None:
    store = open_store(store_settings)
    built = tmp_path / "built"
    store.publish(slim_version(built, built_model, "1"), MODEL, "1")
    store.publish(slim_version(built, built_model, "2"), MODEL, "2")
    assert store.read_rule(MODEL).rule == RolloutRule(serving="1"), "a second version does not take over"
    with pytest.raises(Exception, match="version '9'"):
        store.write_rule(MODEL, RolloutRule(serving="9"), store.read_rule(MODEL))


def test_two_operators_cannot_silently_overwrite_each_others_rule(
    store_settings: StoreSettings, built_model: Path, tmp_path: Path
) -> None:
    store = open_store(store_settings)
    built = tmp_path / "built"
    for version in ("1", "2", "3"):
        store.publish(slim_version(built, built_model, version), MODEL, version)
    alice, bob = (StoreRepository(open_store(store_settings), tmp_path / who) for who in ("alice", "bob"))
    assert alice.rollout(MODEL) == bob.rollout(MODEL) == RolloutRule(serving="1")
    alice.write_rollout(MODEL, RolloutRule(serving="1", candidate="2", canary_share=0.1))
    with pytest.raises(StoreConflict, match="changed in the store since it was read"):
        bob.write_rollout(MODEL, RolloutRule(serving="1", candidate="3", canary_share=0.5))
    assert store.read_rule(MODEL).rule == RolloutRule(serving="1", candidate="2", canary_share=0.1)
    assert store.read_rule(MODEL).revision == 2
    bob.rollout(MODEL)  # reading again is the way forward
    bob.write_rollout(MODEL, RolloutRule(serving="1", candidate="3", canary_share=0.5))
    assert store.read_rule(MODEL).rule == RolloutRule(serving="1", candidate="3", canary_share=0.5)


def test_the_s3_server_itself_refuses_a_stale_if_match(s3_endpoint: str, built_model: Path, tmp_path: Path) -> None:
    """The compare-and-set does not rest on our own read: the server checks If-Match
    (and If-None-Match) too, so a write racing ours between read and put fails there."""
    store = open_store(s3_settings(s3_endpoint))
    assert isinstance(store.backend, S3Backend)
    store.publish(slim_version(tmp_path, built_model, "1"), MODEL, "1")
    backend = store.backend
    key = f"{backend.prefix}{MODEL}/rollout.json"
    stale = store.read_rule(MODEL).etag
    assert stale is not None
    backend.client.put_object(Bucket=backend.bucket, Key=key, Body=b"{}", IfMatch=stale)
    for condition in ({"IfMatch": stale}, {"IfNoneMatch": "*"}):
        with pytest.raises(ClientError) as refused:
            backend.client.put_object(Bucket=backend.bucket, Key=key, Body=b"[]", **condition)  # type: ignore[arg-type]
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_publish_rollout_promote_and_rollback_on_the_store(
    s3_endpoint: str, built_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = s3_settings(s3_endpoint)
    export_store_credentials(monkeypatch, settings)
    built = tmp_path / "built"
    store = ("--store", settings.url)
    for version, changes in (("1", {}), ("2", {"labels": SWAPPED_LABELS}), ("3", {})):
        folder = slim_version(built, built_model, version, **changes)
        code, output = cli("publish", str(folder), *store, "--model", MODEL, "--version", version)
        assert code == 0, output
        assert json.loads(output)["rule"] == RolloutRule(serving="1").model_dump()
    code, output = cli("publish", str(built / MODEL / "1"), *store, "--model", MODEL, "--version", "1")
    assert code == 1 and "already published" in output and "Traceback" not in output

    code, output = cli("rollout", "--model", MODEL, "--candidate", "3", "--canary", "0.2", *store)
    assert code == 0, output
    assert f"written to {settings.url}" in output
    rules = open_store(settings)
    assert rules.read_rule(MODEL).rule == RolloutRule(serving="1", candidate="3", canary_share=0.2)

    data = tmp_path / "clear.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in CLEAR_HEADLINES.items()))
    code, output = cli("promote", "--model", MODEL, "--candidate", "2", "--data", str(data), *store)
    assert code == 1 and "refused: version 2 macro-F1" in output, output  # the gate still scores both
    code, output = cli("promote", "--model", MODEL, "--data", str(data), *store)
    assert code == 0, output  # the rule's candidate, 3: as good as what serves
    assert rules.read_rule(MODEL).rule == RolloutRule(serving="3", history=["1"])
    code, output = cli("rollback", "--model", MODEL, *store)
    assert code == 0, output
    assert rules.read_rule(MODEL).rule == RolloutRule(serving="1")

    code, output = cli("rollout", "--model", MODEL, "--candidate", "3", "--canary", "0.2", "--store", "ftp://x/y")
    assert code == 1 and "use s3://bucket/prefix or file:///path" in output
    monkeypatch.setenv("INFERMESH_STORE_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    code, output = cli("rollback", "--model", MODEL, *store)
    assert code == 1 and f"error: model store {settings.url}: " in output and "Traceback" not in output
