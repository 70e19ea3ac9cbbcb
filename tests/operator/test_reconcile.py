"""The operator, in-process, against the real control plane: pods on kwok GPU nodes, their exits
simulated by patching pod status as the admin (kwok completes only Job-owned pods by itself)."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from controlplane import GPU, KWOK_TOLERATION, exit_pod, gpu_node, pv_for, wait_until
from kubernetes import client
from operator_runner import start_operator
from rlsdrun_samples import run_manifest

from rlsd_operator import names

pytestmark = pytest.mark.k8s
LEARNERS_A1 = ["demo-learner-a1-0", "demo-learner-a1-1"]
LEARNERS_A2 = ["demo-learner-a2-0", "demo-learner-a2-1"]
SERVERS = ["demo-rollout-0", "demo-rollout-1"]


class Cluster:
    """What a test does to, and reads from, one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def apply(self, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.PLURAL, manifest
        )

    def run(self, name: str = "demo") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.PLURAL, name
        )

    def patch_spec(self, spec: dict[str, Any], name: str = "demo") -> None:
        self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.PLURAL, name, {"spec": spec}
        )

    def status(self, name: str = "demo") -> dict[str, Any]:
        return self.run(name).get("status") or {}

    def condition(self, kind: str, name: str = "demo") -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == kind), {})

    def wait_phase(self, phase: str, name: str = "demo", timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            lambda: self.status(name).get("phase") == phase and self.status(name), f"phase {phase}", timeout
        )

    def pods(self, live: bool = False) -> dict[str, client.V1Pod]:
        """The namespace's pods; only those whose containers have not stopped when `live`."""
        pods = self.core.list_namespaced_pod(self.namespace).items
        return {p.metadata.name: p for p in pods if not live or p.status.phase not in ("Succeeded", "Failed")}

    def wait_pods_running(self, expected: list[str], timeout: float = 60) -> dict[str, client.V1Pod]:
        """Waits until exactly `expected` pods are live (stopped ones may stay) and all are Running."""

        def exactly_running() -> dict[str, client.V1Pod] | None:
            pods = self.pods(live=True)
            ok = sorted(pods) == sorted(expected) and all(p.status.phase == "Running" for p in pods.values())
            return pods if ok else None

        return wait_until(
            exactly_running, f"exactly {expected} Running (have {sorted(self.pods())})", timeout
        )

    def exit(self, pod: str, code: int, message: str = "") -> None:
        """The pod's container exits with `code`, as a kubelet would report it."""
        exit_pod(self.core, self.namespace, pod, code, message)

    def columns(self, name: str = "demo") -> dict[str, Any]:
        """The run's row as the API server serves it to `kubectl get rlsd -o wide`: column -> cell."""
        path = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{self.namespace}/{names.PLURAL}/{name}"
        api = self.custom.api_client
        accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
        request = api.param_serialize("GET", path, header_params=accept, auth_settings=["BearerToken"])
        response = api.call_api(*request[:4])
        response.read()
        table = json.loads(response.data)
        (row,) = table["rows"]
        return {
            column["name"]: cell
            for column, cell in zip(table["columnDefinitions"], row["cells"], strict=True)
        }

    def events(self, reason: str) -> list[str]:
        events = self.core.list_namespaced_event(self.namespace, field_selector=f"reason={reason}").items
        return [e.message for e in events]

    def wait_events(self, reason: str) -> list[str]:
        """The events of `reason` once there is one: kopf posts events in the background, after the
        status patch that a test may have seen first."""
        return wait_until(lambda: self.events(reason), f"a {reason} event")


@pytest.fixture
def cluster(api_client: client.ApiClient, namespace: str, checkpoint_claim: str) -> Cluster:
    return Cluster(api_client, namespace)


def start_run(cluster: Cluster, spec: dict[str, Any] | None = None, name: str = "demo") -> None:
    cluster.apply(run_manifest(name, spec))


def test_create_makes_owned_pods_config_and_services(cluster: Cluster, operator: Any) -> None:
    secret = {"metadata": {"name": "hf"}, "data": {"token": base64.b64encode(b"hf_x").decode()}}
    cluster.core.create_namespaced_secret(cluster.namespace, secret)
    start_run(
        cluster,
        {
            "huggingFaceTokenSecret": {"name": "hf"},
            "teacher": {"placement": "remote", "replicas": 1, "image": "rlsd/trainer:gpu"},
        },
    )
    pods = cluster.wait_pods_running([*LEARNERS_A1, *SERVERS, "demo-teacher-0"])
    status = cluster.wait_phase("Running")
    run = cluster.run()
    assert status["attempt"] == 1 and status["startTime"]
    assert cluster.condition("Ready")["status"] == "True"
    for pod in pods.values():
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.uid, owner.controller) == ("RLSDRun", run["metadata"]["uid"], True)
    learner = pods["demo-learner-a1-1"].spec
    env = {e.name: e for e in learner.containers[0].env}
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "hf"
    assert learner.hostname == "demo-learner-1" and learner.subdomain == "demo-learners"
    assert "--node-rank" in learner.containers[0].command
    config_map = cluster.core.read_namespaced_config_map("demo-config", cluster.namespace)
    config = yaml.safe_load(config_map.data["config.yaml"])
    domain = f"{cluster.namespace}.svc.cluster.local"
    assert config["rollout"]["servers"]["urls"] == [
        f"http://demo-rollout-{i}.demo-rollout.{domain}:8000" for i in (0, 1)
    ]
    assert config["teacher"]["servers"]["urls"] == [f"http://demo-teacher-0.demo-teacher.{domain}:8000"]
    services = {s.metadata.name for s in cluster.core.list_namespaced_service(cluster.namespace).items}
    assert services == {"demo-learners", "demo-rollout", "demo-teacher"}
    assert cluster.wait_events("AttemptStarted") and cluster.wait_events("Running")


@pytest.fixture
def metrics_server() -> Iterator[dict[str, Any]]:
    """A local HTTP server answering /metrics with `served["text"]`."""
    served: dict[str, Any] = {"text": "", "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served["requests"] += 1
            body = served["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served["url"] = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    yield served
    server.shutdown()


def test_progress_is_read_from_learner_0s_own_address_only(
    cluster: Cluster, operator: Any, metrics_server: dict[str, Any]
) -> None:
    """The operator reads a run's progress from the address of the current attempt's rank-0 learner
    pod, and from nowhere a run's author could name: an annotation pointing at a server that answers
    (what the operator once honoured) changes nothing. On kwok nodes nothing listens at a pod's
    address, so the scrape fails, which is a condition, never an error; tests/e2e reads real progress
    from a real learner."""
    metrics_server["text"] = "rlsd_policy_version 47.0\nrlsd_reward_mean 0.625\n"
    manifest = run_manifest()
    manifest["metadata"]["annotations"] = {"rlsd.io/metrics-url": metrics_server["url"]}
    cluster.apply(manifest)
    cluster.wait_phase("Running")
    rank0 = cluster.core.read_namespaced_pod(LEARNERS_A1[0], cluster.namespace)
    failed = wait_until(
        lambda: (
            cluster.condition("MetricsAvailable").get("reason") == "ScrapeFailed"
            and cluster.condition("MetricsAvailable")
        ),
        "a failed scrape in the status",
    )
    assert failed["message"].startswith(f"http://{rank0.status.pod_ip}:{names.METRICS_PORT}/metrics: ")
    assert metrics_server["requests"] == 0
    status = cluster.status()
    assert status["phase"] == "Running" and "step" not in status and "reward" not in status


def disrupt(cluster: Cluster, how: str) -> None:
    pod = "demo-learner-a1-1"
    if how == "disruption-target":
        # With its transition time, or the disruption controller resets it at once as stale.
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "PreemptionByScheduler",
            "lastTransitionTime": now,
        }
        cluster.core.patch_namespaced_pod_status(
            pod, cluster.namespace, {"status": {"conditions": [condition]}}
        )
    elif how == "eviction":
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": cluster.namespace},
        }
        cluster.core.create_namespaced_pod_eviction(pod, cluster.namespace, eviction)
    elif how == "deletion":
        cluster.core.delete_namespaced_pod(pod, cluster.namespace)
    else:
        cluster.exit(pod, int(how.removeprefix("exit-")))


@pytest.mark.parametrize("how", ["disruption-target", "eviction", "deletion", "exit-75", "exit-76"])
def test_preemption_restarts_the_whole_gang_without_counting_a_failure(
    cluster: Cluster, operator: Any, how: str
) -> None:
    start_run(cluster)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.wait_phase("Running")
    servers_before = {name: pod.metadata.uid for name, pod in cluster.pods().items() if "rollout" in name}

    disrupt(cluster, how)

    def next_attempt_running() -> bool:
        pods = cluster.pods(live=True)
        learners = sorted(name for name in pods if "learner" in name)
        return learners == LEARNERS_A2 and all(pods[n].status.phase == "Running" for n in LEARNERS_A2)

    wait_until(next_attempt_running, "the learners of attempt 2 (and only them) to run")
    status = cluster.wait_phase("Running")
    assert (status["attempt"], status.get("preemptions"), status.get("restarts", 0)) == (2, 1, 0)
    servers_after = {name: pod.metadata.uid for name, pod in cluster.pods().items() if "rollout" in name}
    assert servers_after == servers_before  # the servers are not part of the gang
    assert cluster.wait_events("Preempted")


def test_application_failures_back_off_then_fail_the_run(cluster: Cluster, operator: Any) -> None:
    start_run(cluster, {"restartPolicy": {"backoffLimit": 1, "backoffSeconds": 2, "maxBackoffSeconds": 2}})
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.exit("demo-learner-a1-0", 1)
    status = cluster.wait_phase("Restarting", timeout=10)
    assert (status["restarts"], status["attempt"]) == (1, 2)
    assert "in 2s" in status["message"]
    cluster.wait_pods_running([*LEARNERS_A2, *SERVERS])

    cluster.exit("demo-learner-a2-1", 1)
    status = cluster.wait_phase("Failed")
    assert status["restarts"] == 2 and status.get("preemptions", 0) == 0
    assert cluster.condition("Failed")["reason"] == "BackoffLimitExceeded"
    assert "exit code 1" in status["message"]
    wait_until(lambda: not any("rollout" in name for name in cluster.pods()), "the servers to be deleted")


def test_bad_config_fails_at_once_with_the_termination_message(cluster: Cluster, operator: Any) -> None:
    start_run(cluster)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.exit(
        "demo-learner-a1-0", 3, "error: invalid configuration\n  algorithm.gruop_size: unknown field"
    )
    status = cluster.wait_phase("Failed")
    assert "algorithm.gruop_size: unknown field" in status["message"]
    assert cluster.condition("Failed")["reason"] == "BadConfig"
    assert status.get("restarts", 0) == 0 and status["attempt"] == 1 and status["completionTime"]


def test_a_lost_rollout_pod_is_recreated_alone(cluster: Cluster, operator: Any) -> None:
    start_run(cluster)
    before = {
        name: pod.metadata.uid for name, pod in cluster.wait_pods_running([*LEARNERS_A1, *SERVERS]).items()
    }

    def replaced(name: str) -> bool:
        pod = cluster.pods(live=True).get(name)
        return pod is not None and pod.metadata.uid != before[name] and pod.status.phase == "Running"

    cluster.exit("demo-rollout-1", 1)
    wait_until(lambda: replaced("demo-rollout-1"), "demo-rollout-1 to be replaced")
    cluster.core.delete_namespaced_pod("demo-rollout-0", cluster.namespace)
    wait_until(lambda: replaced("demo-rollout-0"), "demo-rollout-0 to be replaced")

    after = {
        name: pod.metadata.uid for name, pod in cluster.wait_pods_running([*LEARNERS_A1, *SERVERS]).items()
    }
    assert {n: after[n] for n in LEARNERS_A1} == {n: before[n] for n in LEARNERS_A1}
    status = cluster.wait_phase("Running")
    assert status["attempt"] == 1 and status.get("preemptions", 0) == 0 and status.get("restarts", 0) == 0
    assert cluster.wait_events("ServerLost")


def test_completion_cleans_up_servers_and_honours_the_ttl(cluster: Cluster, operator: Any) -> None:
    start_run(cluster, {"ttlSecondsAfterFinished": 3})
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    for pod in LEARNERS_A1:
        cluster.exit(pod, 0)
    status = cluster.wait_phase("Succeeded")
    assert status["completionTime"] and cluster.condition("Completed")["status"] == "True"
    wait_until(lambda: sorted(cluster.pods()) == LEARNERS_A1, "only the finished learners to remain")

    def run_gone() -> bool:
        try:
            cluster.run()
        except client.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(run_gone, "the run to be deleted after its TTL", timeout=30)
    wait_until(lambda: not cluster.pods(), "the garbage collector to delete the learner pods")


def test_suspend_stops_every_pod_and_resume_starts_the_next_attempt(cluster: Cluster, operator: Any) -> None:
    start_run(cluster)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.patch_spec({"suspend": True})
    wait_until(lambda: not cluster.pods(), "every pod to be deleted")
    assert cluster.wait_phase("Suspended")["message"] == "all pods stopped"

    cluster.patch_spec({"suspend": False})
    cluster.wait_pods_running([*LEARNERS_A2, *SERVERS])
    status = cluster.wait_phase("Running")
    assert (status["attempt"], status.get("preemptions", 0), status.get("restarts", 0)) == (2, 0, 0)


def test_unsafe_spec_changes_wait_for_the_next_attempt(cluster: Cluster, operator: Any) -> None:
    start_run(cluster)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.patch_spec({"learner": {"image": "rlsd/trainer:v2"}, "steps": 200})
    condition = wait_until(lambda: cluster.condition("SpecChangeDeferred"), "SpecChangeDeferred")
    assert condition["message"].startswith("learner.image, steps changed")
    assert cluster.pods()["demo-learner-a1-0"].spec.containers[0].image == "rlsd/trainer:gpu"

    cluster.exit("demo-learner-a1-0", 75)
    pods = cluster.wait_pods_running([*LEARNERS_A2, *SERVERS])
    assert pods["demo-learner-a2-0"].spec.containers[0].image == "rlsd/trainer:v2"
    config = yaml.safe_load(
        cluster.core.read_namespaced_config_map("demo-config", cluster.namespace).data["config.yaml"]
    )
    assert config["run"]["total_steps"] == 200
    wait_until(lambda: not cluster.condition("SpecChangeDeferred"), "the condition to clear")


@pytest.mark.parametrize(
    ("spec", "field", "key"),
    [
        ({"huggingFaceTokenSecret": {"name": "hf"}}, "huggingFaceTokenSecret", "token"),
        (
            {"trackers": {"wandb": {"project": "p", "apiKeySecret": {"name": "hf"}}}},
            "trackers.wandb.apiKeySecret",
            "api-key",
        ),
    ],
)
def test_missing_references_are_reported_then_resolved(
    cluster: Cluster, operator: Any, spec: dict[str, Any], field: str, key: str
) -> None:
    start_run(cluster, spec)
    wait_until(
        lambda: cluster.condition("ReferencesResolved").get("reason") == "MissingSecret", "MissingSecret"
    )
    status = cluster.status()
    assert status["phase"] == "Pending" and f"{field}: Secret 'hf' not found" in status["message"]
    assert cluster.wait_events("MissingSecret") and not cluster.pods()

    secret = {"metadata": {"name": "hf"}, "data": {key: base64.b64encode(b"secret").decode()}}
    cluster.core.create_namespaced_secret(cluster.namespace, secret)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    # The pods are created before the status that says why is patched.
    wait_until(lambda: cluster.condition("ReferencesResolved")["status"] == "True", "ReferencesResolved")


def test_a_config_the_trainer_would_refuse_fails_in_seconds_before_any_pod(
    cluster: Cluster, operator: Any
) -> None:
    start_run(cluster, {"trainerConfig": {"algorithm": {"gruop_size": 4}}})
    status = cluster.wait_phase("Failed", timeout=10)
    assert "spec.trainerConfig.algorithm.gruop_size: unknown field" in status["message"]
    assert cluster.condition("Failed")["reason"] == "InvalidSpec" and cluster.wait_events("InvalidSpec")
    assert not cluster.pods()


@pytest.mark.parametrize("name", ["team.a.run-1", "1st-run." + "x" * 245])
def test_any_run_name_works(cluster: Cluster, operator: Any, name: str) -> None:
    start_run(cluster, {"learner": {"nodes": 1}, "rollout": {"replicas": 1}}, name=name)
    stem = names.stem(name)
    pods = cluster.wait_pods_running([f"{stem}-learner-a1-0", f"{stem}-rollout-0"])
    cluster.wait_phase("Running", name=name)
    assert pods[f"{stem}-learner-a1-0"].spec.subdomain == f"{stem}-learners"
    services = {s.metadata.name for s in cluster.core.list_namespaced_service(cluster.namespace).items}
    assert services == {f"{stem}-learners", f"{stem}-rollout"}
    config_map = cluster.core.read_namespaced_config_map(f"{stem}-config", cluster.namespace)
    assert yaml.safe_load(config_map.data["config.yaml"])["run"]["name"] == name


def test_owned_objects_are_recreated_when_they_go_missing(cluster: Cluster, operator: Any) -> None:
    start_run(cluster)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.wait_phase("Running")
    ns = cluster.namespace
    before = cluster.core.read_namespaced_service("demo-learners", ns).metadata.uid
    cluster.core.delete_namespaced_service("demo-learners", ns)
    cluster.core.delete_namespaced_config_map("demo-config", ns)

    def recreated() -> bool:
        service = cluster.core.read_namespaced_service("demo-learners", ns)
        return service.metadata.uid != before and bool(
            cluster.core.read_namespaced_config_map("demo-config", ns)
        )

    wait_until(recreated, "the Service and the ConfigMap to be recreated")
    assert cluster.status()["attempt"] == 1 and cluster.status()["phase"] == "Running"


def test_a_name_held_by_another_object_is_reported_then_taken_once_free(
    cluster: Cluster, operator: Any
) -> None:
    foreign = {"metadata": {"name": "demo-learners"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    cluster.core.create_namespaced_service(cluster.namespace, foreign)
    start_run(cluster)
    wait_until(lambda: cluster.condition("Ready").get("reason") == "NameConflict", "NameConflict")
    assert (
        "Service demo-learners exists and is not owned by this run" in cluster.condition("Ready")["message"]
    )
    assert cluster.wait_events("NameConflict")
    assert cluster.status()["phase"] == "Pending" and not cluster.status().get("attemptLaunched")
    cluster.core.delete_namespaced_service("demo-learners", cluster.namespace)
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
    cluster.wait_phase("Running")


RWO_TEMPLATE = {
    "accessModes": ["ReadWriteOnce"],
    "storageClassName": "",
    "resources": {"requests": {"storage": "1Gi"}},
}


def test_a_read_write_once_claim_puts_every_pod_of_the_run_on_one_node(
    cluster: Cluster, operator: Any
) -> None:
    one_gpu = {"nprocPerNode": 1, "resources": {"limits": {"nvidia.com/gpu": 1}}}
    with pv_for(cluster.core, cluster.namespace, "demo-checkpoints"):
        start_run(
            cluster,
            {
                "learner": {"nodes": 1, **one_gpu},
                "rollout": {"replicas": 3},
                "checkpoint": {"volume": {"claimName": None, "claimTemplate": RWO_TEMPLATE}},
            },
        )
        pods = cluster.wait_pods_running(
            ["demo-learner-a1-0", "demo-rollout-0", "demo-rollout-1", "demo-rollout-2"]
        )
        assert len({pod.spec.node_name for pod in pods.values()}) == 1, {
            name: pod.spec.node_name for name, pod in pods.items()
        }
        cluster.wait_phase("Running")


POOL_LABEL = "rlsd.io/test-pool"


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[Callable[..., str]]:
    """Adds kwok nodes of the test's own (labelled with its namespace, which the run selects: the
    session's kwok GPU nodes stay out of it), Ready before it returns; deletes them afterwards.
    `add(name, gpus, cpu, memory)` returns the node's name."""
    added: list[str] = []

    def add(name: str, gpus: int, cpu: str = "16", memory: str = "64Gi") -> str:
        name = f"{cluster.namespace}-{name}"
        node = gpu_node(name, {GPU: str(gpus), "cpu": cpu, "memory": memory, "pods": "110"})
        node["metadata"]["labels"][POOL_LABEL] = cluster.namespace
        cluster.core.create_node(node)
        added.append(name)

        def ready() -> bool:
            found = cluster.core.read_node(name)
            conditions = {c.type: c.status for c in found.status.conditions or []}
            return conditions.get("Ready") == "True" and not any(
                t.key.startswith("node.kubernetes.io/") for t in found.spec.taints or []
            )

        wait_until(ready, f"node {name} Ready")
        return name

    yield add
    for name in added:
        cluster.core.delete_node(name)


# 1 learner and 2 rollout servers of 1 GPU each, on a ReadWriteOnce claim: 3 pods on one node.
ONE_NODE_RUN = {
    "learner": {"nodes": 1, "nprocPerNode": 1, "resources": {"limits": {GPU: 1, "cpu": 1, "memory": "1Gi"}}},
    "rollout": {"replicas": 2, "resources": {"limits": {GPU: 1, "cpu": 1, "memory": "1Gi"}}},
    "checkpoint": {"volume": {"claimName": None, "claimTemplate": RWO_TEMPLATE}},
}
ONE_NODE_PODS = ["demo-learner-a1-0", "demo-rollout-0", "demo-rollout-1"]


def start_in_pool(cluster: Cluster) -> None:
    start_run(cluster, {**ONE_NODE_RUN, "scheduling": {"nodeSelector": {POOL_LABEL: cluster.namespace}}})


def nodes_of(pods: dict[str, client.V1Pod]) -> dict[str, str]:
    return {name: pod.spec.node_name for name, pod in pods.items()}


def test_a_run_whose_pods_share_a_node_goes_whole_to_the_node_with_room_for_all(
    cluster: Cluster, operator: Any, pool: Callable[..., str]
) -> None:
    """The small node has a GPU for one pod of the run and the most cpu and memory free, so the
    scheduler prefers it for whichever pod comes first: pods that followed that one by pod affinity
    would wait there for good ("1 of 1 learner pods pending"). Placed as a unit, the run goes whole to
    the big node."""
    pool("small", gpus=1, cpu="256", memory="2Ti")
    big = pool("big", gpus=3, cpu="8", memory="32Gi")
    with pv_for(cluster.core, cluster.namespace, "demo-checkpoints"):
        start_in_pool(cluster)
        pods = cluster.wait_pods_running(ONE_NODE_PODS)
        assert set(nodes_of(pods).values()) == {big}, nodes_of(pods)
        assert cluster.wait_phase("Running")["placement"] == {"node": big}
        placed = cluster.condition("Placed")
        assert placed["status"] == "True" and f"node {big}, which has room for" in placed["message"]


def test_a_run_no_node_has_room_for_says_what_each_lacks_then_starts_once_one_has(
    cluster: Cluster, operator: Any, pool: Callable[..., str]
) -> None:
    one, two = pool("one", gpus=1), pool("two", gpus=2)
    with pv_for(cluster.core, cluster.namespace, "demo-checkpoints"):
        start_in_pool(cluster)
        wait_until(lambda: cluster.condition("Placed").get("reason") == "NoNodeFits", "NoNodeFits")
        message = cluster.condition("Placed")["message"]
        assert message.startswith(
            "no node has room for the run's 3 pods together (cpu 3, memory 3Gi, nvidia.com/gpu 3)"
        )
        assert f"node {two} lacks nvidia.com/gpu 1; node {one} lacks nvidia.com/gpu 2" in message
        assert cluster.columns()["Reason"] == "NoNodeFits" and cluster.status()["phase"] == "Pending"
        wait_until(lambda: cluster.events("NoNodeFits") == [message], "one NoNodeFits event")
        assert not cluster.pods()

        three = pool("three", gpus=4)
        pods = cluster.wait_pods_running(ONE_NODE_PODS)
        assert set(nodes_of(pods).values()) == {three}
        cluster.wait_phase("Running")
        assert cluster.condition("Placed")["status"] == "True" and len(cluster.events("NoNodeFits")) == 1


def test_a_run_whose_node_lost_its_room_moves_to_one_with_room_for_all(
    cluster: Cluster, operator: Any, pool: Callable[..., str]
) -> None:
    """A rollout pod is lost while another tenant's pod takes its GPU: the replacement, pinned to the
    run's node, cannot be scheduled. After the grace the run moves, every pod of it, to a node with
    room for all; a new learner attempt that counts neither as a preemption nor as a restart."""
    exact = pool("exact", gpus=3)  # the tightest fit: chosen first
    roomy = pool("roomy", gpus=4)
    with pv_for(cluster.core, cluster.namespace, "demo-checkpoints"):
        start_in_pool(cluster)
        pods = cluster.wait_pods_running(ONE_NODE_PODS)
        assert set(nodes_of(pods).values()) == {exact}
        cluster.wait_phase("Running")
        container = {"name": "x", "image": "x", "resources": {"limits": {GPU: "1"}}}
        other = {
            "metadata": {"name": "other-tenant"},
            "spec": {"nodeName": exact, "containers": [container], "tolerations": [dict(KWOK_TOLERATION)]},
        }
        cluster.core.create_namespaced_pod(cluster.namespace, other)
        cluster.core.delete_namespaced_pod("demo-rollout-1", cluster.namespace)

        stuck = wait_until(
            lambda: (pod := cluster.pods().get("demo-rollout-1")) and pod.status.phase == "Pending" and pod,
            "the replacement of demo-rollout-1 to wait for room",
        )
        assert stuck.spec.node_name is None
        pods = cluster.wait_pods_running(
            ["demo-learner-a2-0", "demo-rollout-0", "demo-rollout-1", "other-tenant"]
        )
        assert {n: node for n, node in nodes_of(pods).items() if n != "other-tenant"} == dict.fromkeys(
            ["demo-learner-a2-0", "demo-rollout-0", "demo-rollout-1"], roomy
        )
        status = cluster.wait_phase("Running")
        assert (status["attempt"], status.get("preemptions", 0), status.get("restarts", 0)) == (2, 0, 0)
        assert status["placement"] == {"node": roomy}
        (moved,) = wait_until(lambda: cluster.events("Moved"), "the Moved event")
        assert moved.startswith(f"node {exact}: the scheduler has not fit demo-rollout-1 there for ")
        assert moved.endswith(f"moving every pod of the run to node {roomy}")


def test_a_read_write_once_claim_for_a_gang_across_nodes_is_refused(cluster: Cluster, operator: Any) -> None:
    claim = {"metadata": {"name": "rwo"}, "spec": RWO_TEMPLATE}
    with pv_for(cluster.core, cluster.namespace, "rwo"):
        cluster.core.create_namespaced_persistent_volume_claim(cluster.namespace, claim)
        start_run(cluster, {"checkpoint": {"volume": {"claimName": "rwo"}}})
        status = cluster.wait_phase("Failed", timeout=10)
        assert (
            "claim 'rwo' is ReadWriteOnce" in status["message"] and "learner.nodes is 2" in status["message"]
        )
        assert cluster.condition("Failed")["reason"] == "InvalidSpec" and not cluster.pods()


def test_deleting_a_run_leaves_nothing_behind(cluster: Cluster, operator: Any) -> None:
    claim = "demo-checkpoints"
    template = {"storageClassName": "", "resources": {"requests": {"storage": "1Gi"}}}
    with pv_for(cluster.core, cluster.namespace, claim):
        start_run(cluster, {"checkpoint": {"volume": {"claimName": None, "claimTemplate": template}}})
        cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
        assert cluster.core.read_namespaced_persistent_volume_claim(
            claim, cluster.namespace
        ).metadata.owner_references
        cluster.custom.delete_namespaced_custom_object(
            names.GROUP, names.VERSION, cluster.namespace, names.PLURAL, "demo"
        )

        def nothing_left() -> bool:
            ns = cluster.namespace
            config_maps = [
                c
                for c in cluster.core.list_namespaced_config_map(ns).items
                if c.metadata.name != "kube-root-ca.crt"
            ]
            claims = [
                c
                for c in cluster.core.list_namespaced_persistent_volume_claim(ns).items
                if c.metadata.name == claim
            ]
            left = [*cluster.pods(), *cluster.core.list_namespaced_service(ns).items, *config_maps]
            return not left and all(c.metadata.deletion_timestamp for c in claims)

        wait_until(nothing_left, "the garbage collector to delete everything the run owned")


def test_one_operator_reconciles_many_runs(cluster: Cluster, operator: Any) -> None:
    start_run(cluster, {"rollout": {"backend": "local"}, "learner": {"nodes": 1}}, name="one")
    start_run(cluster, {"rollout": {"backend": "local"}, "learner": {"nodes": 1}}, name="two")
    cluster.wait_pods_running(["one-learner-a1-0", "two-learner-a1-0"])
    cluster.wait_phase("Running", name="one")
    cluster.wait_phase("Running", name="two")
    cluster.exit("one-learner-a1-0", 75)
    cluster.wait_pods_running(["one-learner-a2-0", "two-learner-a1-0"])
    assert cluster.status("two")["attempt"] == 1


def test_an_operator_killed_mid_reconcile_resumes_without_duplicates(
    cluster: Cluster, operator_env: None
) -> None:
    with start_operator():
        start_run(cluster)
        wait_until(lambda: cluster.pods(), "the first pod")  # stopped mid-way through creating the pods
    with start_operator():
        cluster.wait_pods_running([*LEARNERS_A1, *SERVERS])
        cluster.wait_phase("Running")
    # Down again: a learner is lost meanwhile; the next operator sees it and restarts the gang once.
    cluster.core.delete_namespaced_pod("demo-learner-a1-0", cluster.namespace)
    wait_until(lambda: "demo-learner-a1-0" not in cluster.pods(), "the learner to go")
    with start_operator():
        cluster.wait_pods_running([*LEARNERS_A2, *SERVERS])
        status = cluster.wait_phase("Running")
    assert (status["attempt"], status["preemptions"]) == (2, 1)
    assert json.dumps(status).count("learner-a3") == 0
