"""Policy checks over the rendered overlays: every container is probed, sized and locked
down; every environment variable, port and address agrees with the settings classes the
process reads (the code is the source of truth, not a list kept here); the network
policies let exactly the callers the manifests configure reach each service; each
Deployment is scaled on its own signal."""

from __future__ import annotations

import re
from typing import Any

import opentelemetry.sdk.environment_variables as otel_variables
import pytest
import yaml
from pydantic_settings import BaseSettings

from shared import metrics
from shared.grpc_server import LIVENESS_SERVICE
from tests.k8s.manifests import (
    GPU_IMAGE,
    IMAGE_MODEL_REPOSITORY,
    OPTIONAL_MODULES,
    EnvRef,
    Manifests,
    Obj,
    Process,
    entry_module,
    env_name,
    import_graph,
    load_settings,
    own_settings,
    pod_labels,
    pod_spec,
    quantity,
    selects,
    settings_classes,
)

#: The OpenTelemetry SDK's own variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER,
#: ...), which shared/telemetry.py leaves to the SDK.
OTEL_VARIABLES = {
    value for key, value in vars(otel_variables).items() if key.startswith("OTEL_") and isinstance(value, str)
}

ADDRESS = re.compile(r"^dns:///(?P<host>[a-z0-9-]+):(?P<port>[0-9]+)$")


def field_value(settings: BaseSettings, name: str) -> Any:
    assert name in type(settings).model_fields, f"{type(settings).__name__} has no field {name!r}"
    return getattr(settings, name)


def settings_of(manifests: Manifests, process: Process) -> BaseSettings:
    return load_settings(own_settings(process.module), manifests.environment(process.container))


# --- every container -----------------------------------------------------------------------


def test_every_container_is_probed_sized_and_locked_down(manifests: Manifests) -> None:
    deployments = manifests.of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {
        "tokenizer",
        "inference",
        "postprocessor",
        "explainer",
        "gateway",
        "worker",
        "otel-collector",
    }
    for deployment, container in manifests.containers():
        where = f"{manifests.overlay}: {deployment['metadata']['name']}/{container['name']}"
        pod = pod_spec(deployment)
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{where}: no {probe}"
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), f"{where}: no {resource} {kind}"
            assert quantity(resources["limits"][resource]) >= quantity(resources["requests"][resource]), where
        pod_security = pod.get("securityContext", {})
        security = container.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
        assert security.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
        assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
        assert security.get("privileged", False) is False, where
        assert True in (security.get("runAsNonRoot"), pod_security.get("runAsNonRoot")), f"{where}: may run as root"
        assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, f"{where}: runs as UID 0"
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp profile"
        image = str(container["image"])
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: unpinned image {image}"


def test_infermesh_processes_are_probed_with_the_health_protocol(manifests: Manifests) -> None:
    """gRPC services: grpc.health.v1 probes on their gRPC port (SERVING only once ready);
    a start-up probe covers model loading so liveness never kills a loading pod."""
    processes = manifests.processes()
    assert {p.module for p in processes} == {
        "services.tokenizer",
        "services.inference",
        "services.postprocessor",
        "services.explainer",
        "gateway",
        "workers.sentiment_monitor",
    }
    for process in processes:
        where = f"{manifests.overlay}: {process.app}"
        assert "startupProbe" in process.container, f"{where}: no startupProbe"
        assert process.pod.get("automountServiceAccountToken") is False, f"{where}: API token mounted"
        probes = [process.container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        if process.module.startswith("services."):
            grpc_port = process.port("grpc")
            for probe in probes:
                assert probe.get("grpc", {}).get("port") == grpc_port, f"{where}: {probe} is not a gRPC health probe"
        else:
            for probe in probes:
                port = probe.get("httpGet", {}).get("port")
                assert isinstance(port, str) and process.port(port) is not None, f"{where}: probe on {port!r}"
            assert process.container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert process.container["livenessProbe"]["httpGet"]["path"] == "/healthz", where


#: Deployments whose liveness may be their readiness, and why: the collector's health_check
#: extension is its one health endpoint and reports the collector's own state (200 once its
#: pipelines started), never its exporters' backends, so neither probe follows a downstream.
SAME_LIVENESS_AND_READINESS = {"otel-collector"}


def probe_signal(probe: Obj) -> tuple[object, ...]:
    """What a probe asks, whatever its timing: the gRPC health service name ("" is the
    overall health), the HTTP path, or the TCP port."""
    if "grpc" in probe:
        return ("grpc", probe["grpc"]["port"], probe["grpc"].get("service", ""))
    if "httpGet" in probe:
        return ("http", probe["httpGet"]["port"], probe["httpGet"].get("path", "/"))
    if "tcpSocket" in probe:
        return ("tcp", probe["tcpSocket"]["port"])
    return ("exec", tuple(probe["exec"]["command"]))


def downstreams(manifests: Manifests, process: Process) -> list[str]:
    """The services a process calls (its dns:/// addresses)."""
    env = manifests.environment(process.container)
    return sorted(value for value in env.values() if isinstance(value, str) and ADDRESS.match(value))


def test_liveness_never_depends_on_downstreams(manifests: Manifests) -> None:
    """A failed liveness (or startup) probe restarts the container; a failed readiness probe
    only takes it out of its Service. So liveness asks whether the process itself answers
    (gRPC health service "liveness", which shared.grpc_server keeps SERVING while the server
    runs; HTTP /healthz) and readiness asks the overall health ("", /readyz), which follows
    model loading and downstreams: an inference outage makes explainers unready, and
    restarts none (each restart would reload torch)."""
    for deployment, container in manifests.containers():
        app = deployment["metadata"]["name"]
        if app in SAME_LIVENESS_AND_READINESS:
            continue
        liveness, readiness = probe_signal(container["livenessProbe"]), probe_signal(container["readinessProbe"])
        assert liveness != readiness, f"{manifests.overlay}: {app}/{container['name']} probes {liveness} for both"
    for process in manifests.processes():
        where = f"{manifests.overlay}: {process.app}"
        kinds = ("startup", "readiness", "liveness")
        probes = {kind: probe_signal(process.container[f"{kind}Probe"]) for kind in kinds}
        if process.module.startswith("services."):
            port = process.port("grpc")
            assert probes["liveness"] == ("grpc", port, LIVENESS_SERVICE), f"{where}: liveness {probes['liveness']}"
            assert probes["readiness"] == ("grpc", port, ""), f"{where}: readiness {probes['readiness']}"
            if downstreams(manifests, process):
                # Its overall health follows those services: starting must not wait for them.
                assert probes["startup"] == probes["liveness"], f"{where}: startup asks {probes['startup']}"
            else:
                assert probes["startup"] in (probes["liveness"], probes["readiness"]), where
        else:
            assert probes["liveness"][2] == "/healthz", f"{where}: liveness asks {probes['liveness']}"
            assert probes["readiness"][2] == "/readyz", f"{where}: readiness asks {probes['readiness']}"
            assert probes["startup"] == probes["liveness"], f"{where}: startup asks {probes['startup']}"


# --- environment, ports, addresses ----------------------------------------------------------


def test_every_environment_variable_is_one_the_process_reads(manifests: Manifests) -> None:
    for process in manifests.processes():
        readable = {
            env_name(settings, field)
            for settings in settings_classes(process.module)
            for field in settings.model_fields
        }
        for name in manifests.environment(process.container):
            assert name in readable or name in OTEL_VARIABLES, (
                f"{manifests.overlay}: {process.app} sets {name}, which no settings class that "
                f"`python -m {process.module}` imports reads ({sorted(readable)})"
            )


def test_settings_parse_and_bind_every_interface(manifests: Manifests) -> None:
    """Each process's own settings load from its environment (types and validators
    apply), and a process that binds `host` binds every interface, not loopback."""
    for process in manifests.processes():
        settings = settings_of(manifests, process)
        fields = type(settings).model_fields
        if "host" in fields:
            host = field_value(settings, "host")
            assert host == "0.0.0.0", f"{manifests.overlay}: {process.app} listens on {host}"
        if "model_repository" in fields:
            assert str(field_value(settings, "model_repository")) == IMAGE_MODEL_REPOSITORY, process.app


def test_ports_are_the_settings_ports(manifests: Manifests) -> None:
    """Container ports carry the settings' values, which are the settings classes'
    defaults (so every default address in the code agrees with the cluster)."""
    port_fields = {"grpc": "grpc_port", "metrics": "metrics_port", "http": "http_port"}
    for process in manifests.processes():
        settings = settings_of(manifests, process)
        declared = {port["name"]: int(port["containerPort"]) for port in process.container["ports"]}
        assert declared, f"{process.app} declares no ports"
        for port_name, number in declared.items():
            field = port_fields[port_name]
            value = field_value(settings, field)
            default = type(settings).model_fields[field].default
            where = f"{manifests.overlay}: {process.app} port {port_name}"
            assert number == value == default, f"{where} is {number}; {field} is {value} (default {default})"
        if process.module == "gateway":
            assert set(declared) == {"http", "grpc"}, "the gateway serves /metrics on its HTTP port"
        else:
            assert "metrics" in declared, f"{process.app}: no metrics port"
        annotations = process.deployment["spec"]["template"]["metadata"].get("annotations", {})
        metrics_port = declared.get("metrics", declared.get("http"))
        assert annotations.get("prometheus.io/port") == str(metrics_port), process.app
        assert annotations.get("prometheus.io/path") == "/metrics", process.app


def test_services_expose_the_container_ports(manifests: Manifests) -> None:
    """Headless Services hand out pod addresses, so clients connect to the Service port on
    the pod itself: it must be the container's port number."""
    for service in manifests.of_kind("Service"):
        spec = service["spec"]
        selected = manifests.pods_selected({"matchLabels": spec["selector"]})
        assert selected, f"{manifests.overlay}: Service {service['metadata']['name']} selects no pods"
        for port in spec["ports"]:
            numbers = set()
            for deployment in selected:
                for container in pod_spec(deployment)["containers"]:
                    for declared in container.get("ports", []):
                        if (
                            declared.get("name") == port["targetPort"]
                            or declared["containerPort"] == port["targetPort"]
                        ):
                            numbers.add(declared["containerPort"])
            assert numbers, f"{service['metadata']['name']}: target port {port['targetPort']} is on no container"
            if spec.get("clusterIP") == "None":
                assert numbers == {port["port"]}, f"headless {service['metadata']['name']}: {port} vs {numbers}"


def call_graph(manifests: Manifests) -> dict[str, set[str]]:
    """callee Deployment to the Deployments whose settings point at it."""
    callers: dict[str, set[str]] = {}
    for process in manifests.processes():
        settings = settings_of(manifests, process)
        for field, info in type(settings).model_fields.items():
            if not (isinstance(info.default, str) and re.fullmatch(r"127\.0\.0\.1:[0-9]+", info.default)):
                continue
            value = str(field_value(settings, field))
            where = f"{manifests.overlay}: {process.app} {env_name(type(settings), field)}={value}"
            match = ADDRESS.fullmatch(value)
            assert match, f"{where}: a service address must be dns:///<service>:<port> (client-side balancing)"
            service = manifests.get("Service", match["host"])
            assert service["spec"].get("clusterIP") == "None", f"{where}: the Service is not headless"
            grpc_ports = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc_ports == [int(match["port"])], f"{where}: the Service's gRPC port is {grpc_ports}"
            (callee,) = manifests.pods_selected({"matchLabels": service["spec"]["selector"]})
            callers.setdefault(callee["metadata"]["name"], set()).add(process.app)
    return callers


def test_every_service_address_is_a_headless_service(manifests: Manifests) -> None:
    graph = call_graph(manifests)
    assert graph == {
        "tokenizer": {"gateway", "worker"},
        "inference": {"gateway", "worker", "explainer"},
        "postprocessor": {"gateway", "worker"},
        "explainer": {"gateway"},
    }


def test_otlp_goes_to_the_collector(manifests: Manifests) -> None:
    collector = manifests.get("Deployment", "otel-collector")
    (container,) = pod_spec(collector)["containers"]
    (volume,) = [v for v in pod_spec(collector)["volumes"] if v["name"] == "config"]
    config_map = manifests.get("ConfigMap", volume["configMap"]["name"])
    config: dict[str, Any] = {}
    for arg in container["args"]:
        merge(config, yaml.safe_load(config_map["data"][arg.removeprefix("--config=/conf/")]))
    endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    receiver_port = int(endpoint.rsplit(":", 1)[1])
    assert endpoint.startswith("0.0.0.0:")
    service = manifests.get("Service", "otel-collector")
    assert [p["port"] for p in service["spec"]["ports"] if p["name"] == "otlp-grpc"] == [receiver_port]
    for process in manifests.processes():
        env = manifests.environment(process.container)
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == f"http://otel-collector:{receiver_port}", process.app
    pipeline = config["service"]["pipelines"]["traces"]
    for section, names in (("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")):
        for name in pipeline[names]:
            assert name in config[section], f"{manifests.overlay}: pipeline uses undefined {section} {name}"
    health = int(config["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1])
    assert {p["containerPort"] for p in container["ports"] if p["name"] == "health"} == {health}
    telemetry = config["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert {p["containerPort"] for p in container["ports"] if p["name"] == "metrics"} == {telemetry["port"]}


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """The collector's merge of several --config files: maps merge, everything else is replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def test_thread_pools_fit_the_cpu_limit(manifests: Manifests) -> None:
    for module, field in (("services.inference", "intra_op_threads"), ("services.explainer", "torch_threads")):
        process = manifests.process(module)
        threads = int(field_value(settings_of(manifests, process), field))
        limit = quantity(process.container["resources"]["limits"]["cpu"])
        assert 1 <= threads <= limit, f"{manifests.overlay}: {process.app} {field}={threads}, CPU limit {limit}"


def test_shutdown_fits_the_grace_period(manifests: Manifests) -> None:
    for process in manifests.processes():
        settings = settings_of(manifests, process)
        drain = float(getattr(settings, "shutdown_grace_seconds", 0.0))
        pre_stop = process.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = process.pod["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + drain + 5, f"{manifests.overlay}: {process.app}: {grace}s < {pre_stop}+{drain}+5"


# --- images ---------------------------------------------------------------------------------


def test_only_the_process_that_imports_torch_gets_the_torch_image(manifests: Manifests) -> None:
    for process in manifests.processes():
        third_party = import_graph(entry_module(process.module))[1]
        needs_torch = any(name.split(".")[0] == "torch" for name in third_party)
        repository = str(process.container["image"]).rsplit(":", 1)[0].rsplit("/", 1)[-1]
        if repository == GPU_IMAGE:
            # docker/Dockerfile.gpu serves every inference backend (tests/k8s/test_gpu.py).
            assert process.module == "services.inference", f"{manifests.overlay}: {process.app} runs {repository}"
            continue
        expected = "infermesh-explainer" if needs_torch else "infermesh"
        assert repository == expected, f"{manifests.overlay}: {process.app} runs {repository}, needs {expected}"
    assert (
        manifests.process("services.explainer").container["image"].rsplit("/", 1)[-1].startswith("infermesh-explainer:")
    )
    # A setting that switches on a torch-only module needs the torch image too.
    for process in manifests.processes():
        environment = manifests.environment(process.container)
        for variable, value in OPTIONAL_MODULES.values():
            if environment.get(variable) == value:
                image = str(process.container["image"])
                assert "infermesh-explainer:" in image or f"{GPU_IMAGE}:" in image, f"{process.app} sets {variable}"


# --- network policies -----------------------------------------------------------------------


def allowed_peers(manifests: Manifests, target: Obj, port_name: str) -> tuple[set[str], list[Obj]]:
    """(Deployments of this namespace, other peers) that the NetworkPolicies let reach
    `target`'s port `port_name`."""
    labels = pod_labels(target)
    container_ports = {
        p["name"]: p["containerPort"] for c in pod_spec(target)["containers"] for p in c.get("ports", [])
    }
    local: set[str] = set()
    other: list[Obj] = []
    for policy in manifests.of_kind("NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {container_ports.get(p["port"], p["port"]) for p in rule.get("ports", [])}
            if rule.get("ports") and container_ports[port_name] not in ports:
                continue
            for peer in rule.get("from", []):
                if set(peer) == {"podSelector"}:
                    local |= {d["metadata"]["name"] for d in manifests.pods_selected(peer["podSelector"])}
                else:
                    other.append(peer)
    return local, other


def test_every_pod_denies_ingress_by_default(manifests: Manifests) -> None:
    deny = [
        p
        for p in manifests.of_kind("NetworkPolicy")
        if p["spec"].get("policyTypes") == ["Ingress"] and not p["spec"].get("ingress")
    ]
    assert len(deny) == 1
    for deployment in manifests.of_kind("Deployment"):
        assert selects(deny[0]["spec"]["podSelector"], pod_labels(deployment)), deployment["metadata"]["name"]


def test_only_the_callers_reach_each_grpc_service(manifests: Manifests) -> None:
    for callee, callers in call_graph(manifests).items():
        local, other = allowed_peers(manifests, manifests.get("Deployment", callee), "grpc")
        assert local == callers, f"{manifests.overlay}: {callee}'s gRPC port is open to {local}, callers are {callers}"
        assert other == [], f"{manifests.overlay}: {callee}'s gRPC port is open to {other}"


def test_metrics_ports_are_open_to_prometheus_only(manifests: Manifests) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for process in manifests.processes():
        port = "metrics" if process.port("metrics") else "http"
        local, other = allowed_peers(manifests, process.deployment, port)
        assert monitoring in other, f"{manifests.overlay}: Prometheus cannot scrape {process.app}"
        if port == "metrics":
            assert (local, other) == (set(), [monitoring]), f"{process.app}: metrics open to {local} {other}"


# --- replicas and autoscaling -----------------------------------------------------------------


def autoscalers(manifests: Manifests) -> dict[str, list[Obj]]:
    by_target: dict[str, list[Obj]] = {}
    for obj in [*manifests.of_kind("HorizontalPodAutoscaler"), *manifests.of_kind("ScaledObject")]:
        by_target.setdefault(obj["spec"]["scaleTargetRef"]["name"], []).append(obj)
    return by_target


def test_dev_runs_one_replica_of_everything_without_autoscalers(dev: Manifests) -> None:
    assert autoscalers(dev) == {}
    for deployment in dev.of_kind("Deployment"):
        assert deployment["spec"]["replicas"] == 1, deployment["metadata"]["name"]


def test_prod_scales_each_deployment_on_its_own_signal(prod: Manifests) -> None:
    scaled = autoscalers(prod)
    for deployment in prod.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        if name == "otel-collector":
            assert deployment["spec"]["replicas"] >= 2
            continue
        assert len(scaled.get(name, [])) == 1, f"{name}: expected one autoscaler, found {scaled.get(name)}"
        assert "replicas" not in deployment["spec"], f"{name}: spec.replicas would fight the autoscaler"
    for name in ("tokenizer", "postprocessor", "explainer", "gateway"):
        (hpa,) = scaled[name]
        assert hpa["kind"] == "HorizontalPodAutoscaler"
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
    for name in ("inference", "worker"):
        (scaled_object,) = scaled[name]
        assert scaled_object["kind"] == "ScaledObject"
        assert 2 <= scaled_object["spec"]["minReplicaCount"] <= scaled_object["spec"]["maxReplicaCount"], name
    (inference,) = scaled["inference"]
    queue = [t for t in inference["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(queue) == 1 and queue[0]["metricType"] == "AverageValue"
    (family,) = metrics.INFERENCE_QUEUE_DEPTH.describe()
    metric = family.name
    assert re.fullmatch(rf'sum\({metric}\{{namespace="{prod.namespace}"\}}\)', queue[0]["metadata"]["query"])
    (worker,) = scaled["worker"]
    assert {t["type"] for t in worker["spec"]["triggers"]} == {"kafka"}


def test_every_deployment_has_a_disruption_budget_that_lets_nodes_drain(manifests: Manifests) -> None:
    budgets = manifests.of_kind("PodDisruptionBudget")
    for deployment in manifests.of_kind("Deployment"):
        covering = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(deployment))]
        assert len(covering) == 1, deployment["metadata"]["name"]
        assert covering[0]["spec"].get("maxUnavailable") == 1, deployment["metadata"]["name"]


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"])
def test_our_objects_carry_the_part_of_label(manifests: Manifests, kind: str) -> None:
    for obj in manifests.of_kind(kind):
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "infermesh", obj["metadata"]["name"]


def test_secrets_come_from_secret_refs(manifests: Manifests) -> None:
    """Settings typed SecretStr (API keys, the Kafka password) are never literal values."""
    for process in manifests.processes():
        env = manifests.environment(process.container)
        for settings in settings_classes(process.module):
            for field, info in settings.model_fields.items():
                name = env_name(settings, field)
                if name in env and "Secret" in str(info.annotation):
                    value = env[name]
                    assert isinstance(value, EnvRef) and value.source == "secretKeyRef", f"{process.app}: {name}"
