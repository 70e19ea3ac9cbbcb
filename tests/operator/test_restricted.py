"""Runs in a locked-down namespace of the real control plane (kube-apiserver's PodSecurity admission
plugin is on by default): with Pod Security "restricted" enforced a run reaches Running, and every pod
the operator made passes a server-side dry run under "restricted"; its NetworkPolicy is accepted by the
API server and selects exactly the run's pods. (No CNI runs here, so nothing enforces the policy's
traffic rules: what is checked is the object and its selectors against the pods' labels.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from controlplane import wait_until
from kubernetes import client
from operator_runner import start_operator
from rlsdrun_samples import run_manifest
from test_reconcile import LEARNERS_A1, SERVERS, Cluster, start_run

from rlsd_operator import admission, names

pytestmark = pytest.mark.k8s
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
TEACHER = {"placement": "remote", "replicas": 1, "image": "rlsd/trainer:gpu", "weightTransfer": "gloo"}


@pytest.fixture
def restricted(api_client: client.ApiClient, namespace: str, checkpoint_claim: str) -> Cluster:
    """The test's namespace, enforcing Pod Security "restricted"."""
    client.CoreV1Api(api_client).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})
    return Cluster(api_client, namespace)


def dry_run(cluster: Cluster, pod: client.V1Pod) -> None:
    """Creates a copy of `pod` (its spec, a new name) in dry-run mode; raises when it is refused."""
    spec = cluster.core.api_client.sanitize_for_serialization(pod.spec)
    spec.pop("nodeName", None)
    copy = {"metadata": {"name": f"{pod.metadata.name}-copy", "labels": pod.metadata.labels}, "spec": spec}
    cluster.core.create_namespaced_pod(cluster.namespace, copy, dry_run="All")


def test_pod_security_admission_enforces_restricted_here(restricted: Cluster) -> None:
    """The control: a pod without a security context is refused, with the message the operator
    classifies as PodSecurity."""
    bare = {"metadata": {"name": "bare"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(client.ApiException) as refused:
        restricted.core.create_namespaced_pod(restricted.namespace, bare, dry_run="All")
    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 403 and 'violates PodSecurity "restricted:latest"' in message
    assert admission.refusal("Pod", "bare", 403, message)[0] == "PodSecurity"


def test_a_run_in_a_restricted_namespace_runs_and_its_pods_pass_restricted(
    restricted: Cluster, operator: Any
) -> None:
    start_run(restricted, {"teacher": TEACHER})
    cpu = run_manifest(
        "cpu", {"learner": {"nodes": 1, "nprocPerNode": 1}, "rollout": {"backend": "cpu", "replicas": 1}}
    )
    for role in ("learner", "rollout"):
        cpu["spec"][role]["resources"] = {}  # no GPU: the GPUs of the kwok nodes are for the other run
    restricted.apply(cpu)
    pods = restricted.wait_pods_running(
        [*LEARNERS_A1, *SERVERS, "demo-teacher-0", "cpu-learner-a1-0", "cpu-rollout-0"]
    )
    restricted.wait_phase("Running")
    restricted.wait_phase("Running", name="cpu")
    for pod in pods.values():
        dry_run(restricted, pod)
        assert pod.spec.automount_service_account_token is False
        assert pod.spec.security_context.run_as_user == 1000
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    assert not restricted.events("CreateRefused") and not restricted.events("PodSecurity")


def policy_selects(cluster: Cluster, selector: dict[str, str]) -> set[str]:
    """The pods of the namespace that a matchLabels selector selects, as the API server finds them."""
    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    return {
        p.metadata.name
        for p in cluster.core.list_namespaced_pod(cluster.namespace, label_selector=labels).items
    }


OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rlsd-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "rlsd-operator"}},
}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_the_network_policy_admits_the_run_its_operator_and_its_scrapers(
    restricted: Cluster, operator_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's defaults as the chart renders them: off, the operator's own pods as a peer.
    monkeypatch.setenv(
        "RLSD_OPERATOR_NETWORK_POLICY", json.dumps({"enabled": False, "operator": OPERATOR_PEER})
    )
    networking = client.NetworkingV1Api(restricted.core.api_client)
    ns = restricted.namespace
    with start_operator():
        start_run(restricted, {"networkPolicy": {"enabled": True, "metricsFrom": [PROMETHEUS]}})
        one_gpu = {"nodes": 1, "nprocPerNode": 1, "resources": {"limits": {"nvidia.com/gpu": 1}}}
        start_run(restricted, {"learner": one_gpu, "rollout": {"backend": "local"}}, name="other")
        restricted.wait_pods_running([*LEARNERS_A1, *SERVERS, "other-learner-a1-0"])
        restricted.wait_phase("Running")
        policy = networking.read_namespaced_network_policy("demo-netpol", ns)
        assert [o.uid for o in policy.metadata.owner_references] == [restricted.run()["metadata"]["uid"]]
        assert policy.spec.policy_types == ["Ingress"]
        members, scrapes = policy.spec.ingress
        assert policy_selects(restricted, policy.spec.pod_selector.match_labels) == {*LEARNERS_A1, *SERVERS}
        (peer,) = members._from
        assert policy_selects(restricted, peer.pod_selector.match_labels) == {*LEARNERS_A1, *SERVERS}
        assert members.ports is None  # each other, on every port (NCCL, gloo)
        serialize = restricted.core.api_client.sanitize_for_serialization
        assert serialize(scrapes._from) == [OPERATOR_PEER, PROMETHEUS]
        assert sorted(p.port for p in scrapes.ports) == [names.SERVER_PORT, names.METRICS_PORT]
        assert not networking.list_namespaced_network_policy(ns, label_selector="rlsd.io/run=other").items

        # Changes apply at once: new scrapers replace the policy, `enabled: false` deletes it.
        uid = policy.metadata.uid
        restricted.patch_spec({"networkPolicy": {"metricsFrom": [OPERATOR_PEER]}})

        def scrapers() -> list[Any]:
            current = networking.read_namespaced_network_policy("demo-netpol", ns)
            return serialize(current.spec.ingress[1]._from)

        wait_until(lambda: scrapers() == [OPERATOR_PEER, OPERATOR_PEER], "the policy replaced")
        assert networking.read_namespaced_network_policy("demo-netpol", ns).metadata.uid == uid
        restricted.patch_spec({"networkPolicy": {"enabled": False}})
        wait_until(lambda: not networking.list_namespaced_network_policy(ns).items, "the policy deleted")
        assert restricted.status()["attempt"] == 1 and not restricted.condition("SpecChangeDeferred")
