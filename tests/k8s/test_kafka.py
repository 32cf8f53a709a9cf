"""The Strimzi objects against the code: topics as workers/sentiment_monitor/topics.py
declares them, KRaft node pools, the clients' KafkaSettings against the listener and
their KafkaUsers, ACLs covering what the code reads and writes, and KEDA reading the
lag of the worker's real consumer groups."""

from __future__ import annotations

from typing import Any

from shared.kafka import KafkaSettings
from shared.messages import NEWS_TOPIC, SENTIMENT_TOPIC, TOPIC_SENTIMENT_TOPIC
from tests.k8s.manifests import EnvRef, Manifests, Obj, Process, load_settings, pod_spec
from workers.sentiment_monitor.settings import MonitorSettings
from workers.sentiment_monitor.topics import monitor_topics


def cluster(manifests: Manifests) -> Obj:
    (kafka,) = manifests.of_kind("Kafka")
    return kafka


def node_pools(manifests: Manifests, role: str) -> list[Obj]:
    name = cluster(manifests)["metadata"]["name"]
    pools = [p for p in manifests.of_kind("KafkaNodePool") if p["metadata"]["labels"]["strimzi.io/cluster"] == name]
    return [p for p in pools if role in p["spec"]["roles"]]


def brokers(manifests: Manifests) -> int:
    return sum(int(pool["spec"]["replicas"]) for pool in node_pools(manifests, "broker"))


def worker_settings(manifests: Manifests) -> MonitorSettings:
    process = manifests.process("workers.sentiment_monitor")
    settings = load_settings(MonitorSettings, manifests.environment(process.container))
    assert isinstance(settings, MonitorSettings)
    return settings


def kafka_clients(manifests: Manifests) -> list[Process]:
    return [p for p in manifests.processes() if "KAFKA_BOOTSTRAP_SERVERS" in manifests.environment(p.container)]


def acl_allows(user: Obj, resource: str, name: str, operation: str) -> bool:
    for acl in user["spec"]["authorization"]["acls"]:
        target = acl["resource"]
        if acl.get("type", "allow") != "allow" or target["type"] != resource:
            continue
        pattern = target.get("name", "*")
        if target.get("patternType", "literal") == "prefix":
            matches = name.startswith(pattern)
        else:
            matches = pattern in (name, "*")
        if matches and (operation in acl["operations"] or "All" in acl["operations"]):
            return True
    return False


# --- topics ---------------------------------------------------------------------------------


def test_topics_are_the_codes_topics(manifests: Manifests) -> None:
    """Names, partitions (the worker's INFERMESH_WORKER_PARTITIONS) and configuration
    (the dead-letter topic's retention) as monitor_topics() declares them."""
    expected = {spec.name: spec for spec in monitor_topics(worker_settings(manifests).partitions)}
    name = cluster(manifests)["metadata"]["name"]
    topics = {}
    for topic in manifests.of_kind("KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == name
        topics[topic["spec"].get("topicName", topic["metadata"]["name"])] = topic["spec"]
    assert set(topics) == set(expected), f"{manifests.overlay}: KafkaTopics {sorted(topics)} vs code {sorted(expected)}"
    for topic_name, spec in expected.items():
        declared = topics[topic_name]
        assert declared["partitions"] == spec.partitions, f"{manifests.overlay}: {topic_name} partitions"
        for key, value in (spec.configs or {}).items():
            assert str(declared.get("config", {}).get(key)) == value, f"{manifests.overlay}: {topic_name} {key}"


def test_replication_fits_the_brokers(manifests: Manifests) -> None:
    available = brokers(manifests)
    config = cluster(manifests)["spec"]["kafka"]["config"]
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert int(config[key]) <= available, f"{manifests.overlay}: {key}={config[key]} with {available} brokers"
    for topic in manifests.of_kind("KafkaTopic"):
        replicas = int(topic["spec"]["replicas"])
        min_insync = int(topic["spec"]["config"]["min.insync.replicas"])
        where = f"{manifests.overlay}: {topic['metadata']['name']}"
        assert replicas <= available, f"{where}: {replicas} replicas, {available} brokers"
        # acks=all writes must survive one broker down, yet a single broker must accept them.
        assert (min_insync == 1) if replicas == 1 else (1 < min_insync < replicas), f"{where}: min.insync {min_insync}"
    assert config["auto.create.topics.enable"] is False


def test_prod_runs_three_brokers_and_replicates_three_times(prod: Manifests) -> None:
    assert brokers(prod) == 3
    controllers = node_pools(prod, "controller")
    assert sum(p["spec"]["replicas"] for p in controllers) == 3
    for pool in prod.of_kind("KafkaNodePool"):
        volumes = pool["spec"]["storage"]["volumes"]
        assert all(v["type"] == "persistent-claim" and v["deleteClaim"] is False for v in volumes)
    for topic in prod.of_kind("KafkaTopic"):
        assert topic["spec"]["replicas"] == 3, topic["metadata"]["name"]
        assert topic["spec"]["config"]["min.insync.replicas"] == 2, topic["metadata"]["name"]
    config = cluster(prod)["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2 and config["transaction.state.log.min.isr"] == 2


def test_dev_runs_a_single_kraft_node(dev: Manifests) -> None:
    (pool,) = dev.of_kind("KafkaNodePool")
    assert pool["spec"]["replicas"] == 1
    assert sorted(pool["spec"]["roles"]) == ["broker", "controller"]


def test_kraft_has_a_controller_quorum(manifests: Manifests) -> None:
    controllers = sum(int(p["spec"]["replicas"]) for p in node_pools(manifests, "controller"))
    assert controllers % 2 == 1, f"{manifests.overlay}: {controllers} controllers cannot form a majority quorum"
    assert brokers(manifests) >= 1


# --- clients --------------------------------------------------------------------------------


def listener_for(manifests: Manifests, settings: KafkaSettings) -> dict[str, Any]:
    kafka = cluster(manifests)
    name, namespace = kafka["metadata"]["name"], manifests.namespace
    host, port = settings.bootstrap_servers.rsplit(":", 1)
    assert host in (f"{name}-kafka-bootstrap", f"{name}-kafka-bootstrap.{namespace}.svc"), host
    (listener,) = [item for item in kafka["spec"]["kafka"]["listeners"] if item["port"] == int(port)]
    return dict(listener)


def test_clients_speak_the_listeners_protocol_as_their_own_user(manifests: Manifests) -> None:
    clients = kafka_clients(manifests)
    assert {p.app for p in clients} == {"gateway", "worker"}
    kafka_name = cluster(manifests)["metadata"]["name"]
    for process in clients:
        env = manifests.environment(process.container)
        settings = load_settings(KafkaSettings, env)
        assert isinstance(settings, KafkaSettings)
        listener = listener_for(manifests, settings)
        where = f"{manifests.overlay}: {process.app}"
        assert settings.security_protocol == ("SASL_SSL" if listener["tls"] else "SASL_PLAINTEXT"), where
        assert listener["authentication"]["type"] == "scram-sha-512", where
        assert settings.sasl_mechanism == "SCRAM-SHA-512", where
        user = manifests.get("KafkaUser", str(settings.sasl_username))
        assert user["spec"]["authentication"]["type"] == "scram-sha-512", where
        password = env["KAFKA_SASL_PASSWORD"]
        assert password == EnvRef("secretKeyRef", str(settings.sasl_username), "password"), where
        # The CA file is the cluster CA Secret's ca.crt, mounted.
        assert settings.ssl_cafile is not None, where
        mounts = {m["name"]: m["mountPath"] for m in process.container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(process.deployment)["volumes"]}
        found = False
        for volume_name, path in mounts.items():
            secret = volumes[volume_name].get("secret", {})
            for item in secret.get("items", []):
                if f"{path}/{item['path']}" == settings.ssl_cafile:
                    assert secret["secretName"] == f"{kafka_name}-cluster-ca-cert" and item["key"] == "ca.crt"
                    found = True
        assert found, f"{where}: {settings.ssl_cafile} is not mounted from the cluster CA"


def test_only_the_kafka_clients_reach_the_brokers(manifests: Manifests) -> None:
    clients = {p.app for p in kafka_clients(manifests)}
    for listener in cluster(manifests)["spec"]["kafka"]["listeners"]:
        peers = listener.get("networkPolicyPeers")
        assert peers, f"{manifests.overlay}: listener {listener['name']} is open to every pod"
        local = {
            d["metadata"]["name"]
            for peer in peers
            if set(peer) == {"podSelector"}
            for d in manifests.pods_selected(peer["podSelector"])
        }
        assert local == clients
        others = [peer for peer in peers if set(peer) != {"podSelector"}]
        uses_keda = any(t["type"] == "kafka" for s in manifests.of_kind("ScaledObject") for t in s["spec"]["triggers"])
        keda = {"kubernetes.io/metadata.name": "keda"}
        assert [peer["namespaceSelector"]["matchLabels"] for peer in others] == ([keda] if uses_keda else [])


def test_acls_cover_what_the_code_reads_and_writes(manifests: Manifests) -> None:
    settings = worker_settings(manifests)
    topics = [spec.name for spec in monitor_topics(settings.partitions)]
    users = {}
    for process in kafka_clients(manifests):
        username = manifests.environment(process.container)["KAFKA_SASL_USERNAME"]
        users[process.app] = manifests.get("KafkaUser", str(username))
    for topic in topics:
        for operation in ("Describe", "Read", "Write"):
            assert acl_allows(users["worker"], "topic", topic, operation), f"worker: {operation} {topic}"
        for operation in ("Describe", "Read"):
            assert acl_allows(users["gateway"], "topic", topic, operation), f"gateway: {operation} {topic}"
        assert not acl_allows(users["gateway"], "topic", topic, "Write"), f"gateway may write {topic}"
    for group in (settings.scorer_group, settings.windows_group, settings.topics_group):
        assert acl_allows(users["worker"], "group", group, "Read"), f"worker: group {group}"
    assert acl_allows(users["gateway"], "group", settings.scorer_group, "Describe"), "gateway: the scorer's lag"
    for user in manifests.of_kind("KafkaUser"):
        for acl in user["spec"]["authorization"]["acls"]:
            assert acl.get("type", "allow") == "allow"
            assert not {"Create", "Delete", "Alter", "AlterConfigs", "All"} & set(acl["operations"]), (
                f"{user['metadata']['name']}: topics are KafkaTopics; no client creates or alters them"
            )


# --- KEDA -----------------------------------------------------------------------------------


def test_keda_reads_the_lag_of_the_workers_groups(prod: Manifests) -> None:
    settings = worker_settings(prod)
    kafka_name, namespace = cluster(prod)["metadata"]["name"], prod.namespace
    scaled = prod.get("ScaledObject", "worker")
    triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
    assert {(t["metadata"]["consumerGroup"], t["metadata"]["topic"]) for t in triggers} == {
        (settings.scorer_group, NEWS_TOPIC),
        (settings.windows_group, SENTIMENT_TOPIC),
        (settings.topics_group, TOPIC_SENTIMENT_TOPIC),
    }
    partitions = {spec.name: spec.partitions for spec in monitor_topics(settings.partitions)}
    for trigger in triggers:
        metadata = trigger["metadata"]
        host, port = metadata["bootstrapServers"].rsplit(":", 1)
        # KEDA's operator runs in its own namespace: the Service's full name.
        assert host == f"{kafka_name}-kafka-bootstrap.{namespace}.svc"
        (listener,) = [item for item in cluster(prod)["spec"]["kafka"]["listeners"] if item["port"] == int(port)]
        assert metadata["tls"] == ("enable" if listener["tls"] else "disable")
        assert listener["authentication"]["type"] == "scram-sha-512" and metadata["sasl"] == "scram_sha512"
        assert metadata["offsetResetPolicy"] == "earliest"  # the worker's auto_offset_reset
        assert scaled["spec"]["maxReplicaCount"] <= partitions[metadata["topic"]]
        auth = prod.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"] + auth["spec"]["configMapTargetRef"]}
        username = prod.get("ConfigMap", refs["username"]["name"])["data"][refs["username"]["key"]]
        user = prod.get("KafkaUser", username)
        assert (refs["password"]["name"], refs["password"]["key"]) == (username, "password")
        assert (refs["ca"]["name"], refs["ca"]["key"]) == (f"{kafka_name}-cluster-ca-cert", "ca.crt")
        assert acl_allows(user, "topic", metadata["topic"], "Describe")
        assert acl_allows(user, "group", metadata["consumerGroup"], "Describe")
