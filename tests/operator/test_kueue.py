"""Runs queued by a real Kueue (tests/k8s/kueue_manager.py: Kueue v0.17 built from the Go module
proxy, its webhooks on loopback) on the real control plane, with the operator in-process.

The ClusterQueue has 12 GPUs of the kwok flavor; each run asks for 10 (2 learners x 4 + 2 rollout
servers x 1), so one fits at a time. kwok deletes a deleted pod at once, which Kueue's pod finalizer
defeats; a stand-in kubelet stops such pods instead (learners exit 75, as the trainer does after
saving a checkpoint on SIGTERM; servers exit 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import KWOK_NODE_SELECTOR, KWOK_TOLERATION, kubelet_stops_deleted_pods, wait_until
from kubernetes import client
from kueue_manager import GROUP, MANAGED_NAMESPACE_LABEL, VERSION, Kueue, cluster_queue
from rlsdrun_samples import run_manifest
from test_reconcile import Cluster
from test_restricted import RESTRICTED

from rlsd_contracts import exit_codes
from rlsd_contracts.wire import LEARNER
from rlsd_operator import kueue, names

pytestmark = [pytest.mark.k8s, pytest.mark.kueue]
FLAVOR, CLUSTER_QUEUE, QUEUE, HIGH = "kwok-gpu", "rlsd-gpus", "gpus", "rlsd-high"
LEARNERS = ("learner-a1-0", "learner-a1-1")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_queue(kueue: Kueue, api_client: client.ApiClient) -> str:
    """A ResourceFlavor for the kwok GPU nodes, a ClusterQueue of 12 of their GPUs, and a
    WorkloadPriorityClass above the default priority."""
    custom = client.CustomObjectsApi(api_client)
    flavor = {"nodeLabels": dict(KWOK_NODE_SELECTOR), "tolerations": [dict(KWOK_TOLERATION)]}
    high = {"kind": "WorkloadPriorityClass", "metadata": {"name": HIGH}, "value": 1000}
    for plural, obj in [
        ("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": FLAVOR}, "spec": flavor}),
        ("clusterqueues", cluster_queue(CLUSTER_QUEUE, FLAVOR, gpus=12)),
        ("workloadpriorityclasses", high),
    ]:
        obj = {"apiVersion": f"{GROUP}/{VERSION}", **obj}
        custom.create_cluster_custom_object(GROUP, VERSION, plural, obj)
    return CLUSTER_QUEUE


class Queued(Cluster):
    """A namespace Kueue manages, with LocalQueue `gpus` of the ClusterQueue."""

    def workloads(self) -> dict[str, dict[str, Any]]:
        found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "workloads")
        return {w["metadata"]["name"]: w for w in found["items"]}

    def pod(self, run: str, suffix: str) -> client.V1Pod:
        return self.core.read_namespaced_pod(f"{run}-{suffix}", self.namespace)

    def admitted(self, run: str) -> dict[str, Any]:
        return self.condition("Admitted", run)

    def events(self, reason: str) -> list[str]:
        """The operator's events of `reason` on runs only (Kueue posts some of the same reasons on
        Workloads); `wait_events` waits on these."""
        selector = f"reason={reason},involvedObject.kind={names.KIND}"
        events = self.core.list_namespaced_event(self.namespace, field_selector=selector).items
        return [e.message for e in events]

    def wait_running(self, run: str, attempt: int = 1, timeout: float = 90) -> dict[str, Any]:
        expected = [f"{run}-learner-a{attempt}-{r}" for r in (0, 1)]
        expected += [f"{run}-rollout-{i}-a{attempt}" for i in (0, 1)]

        def running() -> dict[str, Any] | None:
            live = {n: p for n, p in self.pods(live=True).items() if n.startswith(f"{run}-")}
            ok = sorted(live) == sorted(expected) and all(p.status.phase == "Running" for p in live.values())
            return self.status(run) if ok and self.status(run).get("phase") == "Running" else None

        return wait_until(running, f"{run}: exactly {expected} Running and the run Running", timeout)

    def wait_queued(self, run: str, timeout: float = 60) -> dict[str, Any]:
        """The run Pending, its Admitted condition False with Kueue's reason."""

        def queued() -> dict[str, Any] | None:
            admitted = self.admitted(run)
            waiting = self.status(run).get("phase") == "Pending" and admitted.get("status") == "False"
            return (
                admitted if waiting and "insufficient unused quota" in admitted.get("message", "") else None
            )

        return wait_until(queued, f"{run} to wait in the queue with Kueue's reason", timeout)

    def finish(self, run: str, attempt: int = 1) -> None:
        for rank in (0, 1):
            self.exit(f"{run}-learner-a{attempt}-{rank}", 0)
        self.wait_phase("Succeeded", run)

    def gone(self, run: str) -> bool:
        prefix = f"{run}-"
        return not any(n.startswith(prefix) for n in self.pods()) and not any(
            n.startswith(prefix) for n in self.workloads()
        )


@pytest.fixture
def queued(
    api_client: client.ApiClient, namespace: str, checkpoint_claim: str, gpu_queue: str
) -> Iterator[Queued]:
    cluster = Queued(api_client, namespace)
    # Kueue's gates and group labels beside the pods' restricted securityContext: every queued pod
    # here is admitted by Pod Security "restricted" too.
    labels = {**MANAGED_NAMESPACE_LABEL, **RESTRICTED}
    cluster.core.patch_namespace(namespace, {"metadata": {"labels": labels}})
    local_queue = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LocalQueue",
        "metadata": {"name": QUEUE},
        "spec": {"clusterQueue": gpu_queue},
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", local_queue)

    def exit_code(pod: client.V1Pod) -> int:
        learner = pod.metadata.labels.get(names.LABEL_ROLE) == LEARNER
        return exit_codes.EXIT_PREEMPTED if learner else 0

    with kubelet_stops_deleted_pods(cluster.core, namespace, exit_code):
        yield cluster
        # Every run goes, and with it every pod Kueue holds (their GPUs are the next test's).
        for run in cluster.custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL
        )["items"]:
            cluster.custom.delete_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.PLURAL, run["metadata"]["name"]
            )
        wait_until(lambda: not cluster.pods() and not cluster.workloads(), "every pod and Workload to go")


def apply(cluster: Queued, name: str, labels: dict[str, str] | None = None, **spec: Any) -> None:
    manifest = run_manifest(name, spec)
    manifest["metadata"]["labels"] = labels or {}
    cluster.apply(manifest)


def test_a_run_waits_in_the_queue_until_quota_frees_then_starts(queued: Queued, operator: Any) -> None:
    apply(queued, "first", queueName=QUEUE)
    queued.wait_running("first")
    pod = queued.pod("first", LEARNERS[0])
    group = pod.metadata.labels[kueue.GROUP_NAME_LABEL]
    assert (
        pod.metadata.labels[kueue.MANAGED_LABEL] == "true" and kueue.MANAGED_LABEL in pod.metadata.finalizers
    )
    admitted = f"Workload {group} admitted by Kueue (ClusterQueue {CLUSTER_QUEUE!r} via LocalQueue {QUEUE!r})"
    wait_until(lambda: queued.admitted("first")["message"] == admitted, "the ClusterQueue in the condition")
    assert queued.workloads()[group]["spec"]["queueName"] == QUEUE

    # The second run, by the label users put on Jobs: no quota left, so it waits, every pod gated.
    apply(queued, "second", labels={kueue.QUEUE_LABEL: QUEUE})
    admitted = queued.wait_queued("second")
    assert admitted["message"].startswith(f"queued in Kueue LocalQueue {QUEUE!r} (Workload second-")
    assert queued.condition("Ready", "second")["reason"] == "Queued"  # `kubectl get rlsd`'s Reason
    second = {n: p for n, p in queued.pods().items() if n.startswith("second-")}
    assert len(second) == 4 and all(not p.spec.node_name for p in second.values())
    assert all(
        kueue.ADMISSION_GATE in [g.name for g in p.spec.scheduling_gates or []] for p in second.values()
    )
    assert all(  # created in a namespace enforcing "restricted": gated and hardened
        p.spec.security_context.run_as_non_root and p.spec.automount_service_account_token is False
        for p in second.values()
    )
    assert any(m.startswith("queued in Kueue LocalQueue") for m in queued.wait_events("Queued"))

    # Suspended while queued: its pods (which never ran) and its Workload go; resumed, it queues again.
    queued.patch_spec({"suspend": True}, "second")
    wait_until(lambda: queued.gone("second"), "the suspended run's pods and Workload to go", timeout=90)
    queued.patch_spec({"suspend": False}, "second")
    queued.wait_queued("second")
    assert queued.status("second")["attempt"] == 2

    # The first run finishes: Kueue releases its quota and admits the second whole.
    queued.finish("first")
    status = queued.wait_running("second", attempt=2)
    assert status.get("restarts", 0) == 0 and status.get("preemptions", 0) == 0
    assert queued.admitted("second")["status"] == "True"

    # (Kueue may admit it as soon as the first run's learners succeed: their quota is reclaimable.)
    def first_finished() -> bool:
        conditions = queued.workloads()[group]["status"]["conditions"]
        return any(c["type"] == "Finished" and c["status"] == "True" for c in conditions)

    wait_until(first_finished, "the first run's Workload to be Finished")

    # Deleting a run leaves nothing behind: Kueue finalizes the stopped pods, its Workload goes.
    queued.custom.delete_namespaced_custom_object(
        names.GROUP, names.VERSION, queued.namespace, names.PLURAL, "second"
    )
    wait_until(lambda: queued.gone("second"), "the deleted run's pods and Workload to go")


def test_a_higher_priority_run_preempts_a_lower_one_which_resumes_later_from_its_checkpoint(
    queued: Queued, operator: Any
) -> None:
    apply(queued, "low", queueName=QUEUE)
    queued.wait_running("low")

    apply(queued, "high", labels={kueue.PRIORITY_CLASS_LABEL: HIGH}, queueName=QUEUE)
    # Kueue evicts the low run's group; its learners save a checkpoint and exit 75; a preemption.
    queued.wait_running("high")
    low = queued.wait_queued("low")
    status = queued.status("low")
    assert status["attempt"] == 2 and status["preemptions"] == 1 and status.get("restarts", 0) == 0
    preempted = queued.wait_events("Preempted")
    assert preempted and "stopped by Kueue (WorkloadEvictedDueToPreempted)" in preempted[0], preempted
    assert "Preempted to accommodate a workload" in preempted[0]
    assert low["reason"] == "Pending"
    high = queued.pod("high", LEARNERS[0])
    assert high.metadata.labels[kueue.PRIORITY_CLASS_LABEL] == HIGH

    # The high run finishes: the low one is admitted again and resumes (attempt 2, same checkpoints).
    queued.finish("high")
    status = queued.wait_running("low", attempt=2)
    assert status["preemptions"] == 1 and status.get("restarts", 0) == 0
    learner = queued.pod("low", "learner-a2-0")
    env = {e.name: e.value for e in learner.spec.containers[0].env}
    claims = [v.persistent_volume_claim.claim_name for v in learner.spec.volumes if v.persistent_volume_claim]
    assert env["RLSD_ATTEMPT"] == "2" and claims == ["checkpoints"]


def test_a_run_without_a_queue_name_is_not_queued(queued: Queued, operator: Any) -> None:
    apply(queued, "plain")
    pods = queued.wait_pods_running(
        ["plain-learner-a1-0", "plain-learner-a1-1", "plain-rollout-0", "plain-rollout-1"]
    )
    queued.wait_phase("Running", "plain")
    for pod in pods.values():
        assert not [key for key in pod.metadata.labels if key.startswith("kueue.x-k8s.io/")]
        assert not pod.metadata.finalizers and not pod.spec.scheduling_gates
    assert not queued.admitted("plain") and not queued.workloads()


def test_a_lost_server_is_replaced_inside_the_admitted_group_without_queueing(
    queued: Queued, operator: Any
) -> None:
    apply(queued, "solo", queueName=QUEUE)
    queued.wait_running("solo")
    queued.exit("solo-rollout-0-a1", 137)  # its node's kubelet reports it killed
    # The replacement joins the group under a name of its own; Kueue ungates it at once (the group
    # is admitted) and, seeing it, drops the stopped pod's finalizer, so that pod goes.
    replacement = wait_until(
        lambda: queued.pods(live=True).get("solo-rollout-0-a1-1"), "the replacement server", timeout=60
    )
    assert (
        replacement.metadata.labels[kueue.GROUP_NAME_LABEL]
        == queued.pod("solo", LEARNERS[0]).metadata.labels[kueue.GROUP_NAME_LABEL]
    )
    assert replacement.spec.hostname == "solo-rollout-0"
    wait_until(lambda: "solo-rollout-0-a1" not in queued.pods(), "Kueue to release the stopped server")

    def running_again() -> dict[str, Any] | None:
        pod = queued.pods(live=True).get("solo-rollout-0-a1-1")
        status = queued.status("solo")
        return status if pod and pod.status.phase == "Running" and status.get("phase") == "Running" else None

    status = wait_until(running_again, "the run Running again with the replacement")
    assert status["attempt"] == 1 and status.get("preemptions", 0) == 0 and status.get("restarts", 0) == 0
    assert queued.admitted("solo")["status"] == "True"


def test_the_example_queues_admit_the_gpu_sample(
    kueue: Kueue, api_client: client.ApiClient, namespace: str, operator: Any
) -> None:
    """charts/rlsd-operator/examples/kueue-queues.yaml as an admin applies it (its LocalQueue in this
    test's namespace) admits manifests/samples/qwen3-8b-gpu.yaml, which requests CPU and memory as
    well as GPUs: a ClusterQueue that covered GPUs only would hold it forever."""
    cluster = Queued(api_client, namespace)
    cluster.core.patch_namespace(namespace, {"metadata": {"labels": dict(MANAGED_NAMESPACE_LABEL)}})
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "hf"}, "stringData": {"token": "x"}}
    )
    made: list[tuple[str, str]] = []
    try:
        for obj in yaml.safe_load_all((ROOT / "charts/rlsd-operator/examples/kueue-queues.yaml").read_text()):
            plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
            if obj["kind"] == "LocalQueue":
                obj["metadata"]["namespace"] = namespace
                cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)
            else:
                cluster.custom.create_cluster_custom_object(GROUP, VERSION, plural, obj)
                made.append((plural, obj["metadata"]["name"]))
        (run,) = yaml.safe_load_all((ROOT / "manifests/samples/qwen3-8b-gpu.yaml").read_text())
        run["spec"]["queueName"] = "gpu-queue"
        cluster.apply(run)
        name = run["metadata"]["name"]
        admitted = wait_until(
            lambda: cluster.admitted(name).get("status") == "True" and cluster.admitted(name),
            "Kueue to admit the GPU sample",
            timeout=120,
        )
        assert "ClusterQueue 'gpus'" in admitted["message"], admitted
        (workload,) = cluster.workloads().values()
        containers = [c for s in workload["spec"]["podSets"] for c in s["template"]["spec"]["containers"]]
        requested = {r for c in containers for r in (c.get("resources") or {}).get("requests", {})}
        assert {"cpu", "memory"} <= requested  # what a GPU-only queue would never admit
    finally:
        cluster.custom.delete_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, "qwen3-8b-gsm8k"
        )
        wait_until(lambda: not cluster.workloads(), "the run's Workloads to go", timeout=120)
        for plural, obj_name in reversed(made):
            cluster.custom.delete_cluster_custom_object(GROUP, VERSION, plural, obj_name)
