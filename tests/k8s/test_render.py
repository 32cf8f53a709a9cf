"""Every overlay renders, and every object in it validates: built-in kinds against the
Kubernetes API schemas of the oldest Kubernetes we support and the newest one
kubernetes-validate bundles, custom resources against the fields their CRDs define
(tests/k8s/crd_schemas, written from the operators' CRDs)."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from shared.kafka import KafkaSettings
from tests.k8s.manifests import KUSTOMIZE, REPO, Manifests, Obj, load_settings, render_directory

#: The Kubernetes APIs the manifests are checked against: the oldest release we support
#: and the newest kubernetes-validate 1.37 bundles (offline schemas; strict: unknown fields
#: are errors). Below 1.30 the preStop `sleep` action does not exist.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")

CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) to a JSON Schema, from every file in crd_schemas/."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_SCHEMAS.glob("*.yaml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for kind, schema in document["kinds"].items():
            full = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": document["$defs"], **schema}
            jsonschema.Draft202012Validator.check_schema(full)
            schemas[(document["apiVersion"], kind)] = full
    return schemas


def is_custom(obj: Obj) -> bool:
    return (obj["apiVersion"], obj["kind"]) in crd_schemas()


def test_overlay_renders_into_one_namespace(manifests: Manifests) -> None:
    assert manifests.objects, f"{manifests.overlay} rendered nothing"
    namespace = manifests.namespace
    for obj in manifests.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']}/{obj['metadata']['name']}"
    names = Counter((obj["kind"], obj["metadata"]["name"]) for obj in manifests.objects)
    assert [key for key, count in names.items() if count > 1] == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_match_the_kubernetes_api(manifests: Manifests, version: str) -> None:
    checked = 0
    for obj in manifests.objects:
        if is_custom(obj):
            continue
        where = f"{manifests.overlay}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(
                f"{where}: {obj['apiVersion']} {obj['kind']} is in neither Kubernetes {version} "
                "nor tests/k8s/crd_schemas"
            )
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
        checked += 1
    assert checked > 20


def test_custom_resources_match_their_crds(manifests: Manifests) -> None:
    kinds = set()
    for obj in manifests.objects:
        if not is_custom(obj):
            continue
        schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        where = f"{manifests.overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert not errors, where + "".join(f"\n  {'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        kinds.add(obj["kind"])
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"} <= kinds


def test_the_crd_schemas_reject_what_the_crds_reject() -> None:
    """The hand-written schemas are closed and typed: a misplaced field, a wrong enum
    value, a missing required field and a broken CEL rule all fail."""
    schemas = crd_schemas()
    topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t", "labels": {"strimzi.io/cluster": "c"}},
        "spec": {"partitions": 1, "replicas": 1},
    }
    validator = jsonschema.Draft202012Validator(schemas[("kafka.strimzi.io/v1", "KafkaTopic")])
    assert validator.is_valid(topic)
    assert not validator.is_valid({**topic, "spec": {"partitions": 0}})
    assert not validator.is_valid({**topic, "spec": {"partition": 1}})
    assert not validator.is_valid({**topic, "metadata": {"name": "t"}})
    kafka = schemas[("kafka.strimzi.io/v1", "Kafka")]
    listener = {"name": "tls", "port": 9093, "type": "internal", "tls": True}
    base = {"apiVersion": "kafka.strimzi.io/v1", "kind": "Kafka", "metadata": {"name": "k"}}
    assert jsonschema.Draft202012Validator(kafka).is_valid({**base, "spec": {"kafka": {"listeners": [listener]}}})
    broken_specs: list[dict[str, Any]] = [
        {"kafka": {"listeners": [{**listener, "type": "internel"}]}},
        {"kafka": {"listeners": [{**listener, "port": 9000}]}},
        {"kafka": {"listeners": [listener], "rack": {"type": "topology-label"}}},
        {"kafka": {"listeners": []}},
        {"kafka": {"listeners": [listener]}, "zookeeper": {}},
    ]
    for broken in broken_specs:
        assert not jsonschema.Draft202012Validator(kafka).is_valid({**base, "spec": broken}), broken
    trigger = {"type": "kafka", "metadata": {"bootstrapServers": "b:9093", "consumerGroup": "g", "lagThresold": "5"}}
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "s"},
        "spec": {"scaleTargetRef": {"name": "d"}, "triggers": [trigger]},
    }
    assert not jsonschema.Draft202012Validator(schemas[("keda.sh/v1alpha1", "ScaledObject")]).is_valid(scaled)


def test_the_managed_kafka_example_renders_without_strimzi(tmp_path: Path) -> None:
    """docs/kubernetes.md's overlay for a managed Kafka, rendered over prod: no Strimzi
    object is left, every object still validates, and the clients and KEDA read the same
    brokers."""
    docs = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    section = docs.split("## A managed Kafka instead of Strimzi", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "  - ../prod\n" in example
    overlay = tmp_path / "managed"
    overlay.mkdir()
    base = os.path.relpath(REPO / "k8s" / "overlays" / "prod", overlay)
    (overlay / "kustomization.yaml").write_text(example.replace("  - ../prod\n", f"  - {base}\n"), encoding="utf-8")
    manifests = Manifests("managed", render_directory(overlay))
    assert [obj for obj in manifests.objects if obj["apiVersion"].startswith("kafka.strimzi.io/")] == []
    for obj in manifests.objects:
        if is_custom(obj):
            schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
            assert jsonschema.Draft202012Validator(schema).is_valid(obj), obj["metadata"]["name"]
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    servers = set()
    for process in manifests.processes():
        env = manifests.environment(process.container)
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            settings = load_settings(KafkaSettings, env)
            assert isinstance(settings, KafkaSettings)
            servers.add(settings.bootstrap_servers)
    for trigger in manifests.get("ScaledObject", "worker")["spec"]["triggers"]:
        servers.add(trigger["metadata"]["bootstrapServers"])
    assert len(servers) == 1 and "kafka-bootstrap" not in servers.pop()


def test_the_overlays_are_rendered_with_the_documented_kustomize() -> None:
    """The binary is the one k8s/tools/package-lock.json pins, and docs/kubernetes.md names it."""
    lock = json.loads((REPO / "k8s" / "tools" / "package-lock.json").read_text(encoding="utf-8"))
    (pinned,) = [entry["version"] for name, entry in lock["packages"].items() if name.endswith("/" + KUSTOMIZE.name)]
    reported = subprocess.run([str(KUSTOMIZE), "version"], capture_output=True, text=True, timeout=30, check=True)
    assert f"kustomize/v{pinned} " in reported.stdout
    assert f"| kustomize | {pinned} " in (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
