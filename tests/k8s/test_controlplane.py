"""The control plane of tests/k8s is real: API server, RBAC, scheduler, kwok nodes, GC and CRDs."""

from __future__ import annotations

from typing import Any

import pytest
from controlplane import GPU, KWOK_NODE_SELECTOR, KWOK_TOLERATION, ControlPlane, wait_until
from kubernetes import client

pytestmark = pytest.mark.k8s


def gpu_pod(name: str, gpus: int = 1, owner: Any = None) -> dict[str, Any]:
    """A pod that asks for GPUs and may only land on the fake kwok nodes."""
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": owner.kind, "name": owner.metadata.name, "uid": owner.metadata.uid}
        ]
    resources = {"cpu": "1", "memory": "1Gi", GPU: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeSelector": dict(KWOK_NODE_SELECTOR),
            "tolerations": [dict(KWOK_TOLERATION)],
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"requests": resources, "limits": resources},
                }
            ],
        },
    }


def running(core: client.CoreV1Api, name: str, namespace: str) -> client.V1Pod:
    def phase_running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == "Running" else None

    return wait_until(phase_running, f"pod {namespace}/{name} to be Running")


def test_api_server_answers(api_client: client.ApiClient) -> None:
    version = client.VersionApi(api_client).get_code()
    assert version.git_version.startswith("v1.")
    namespaces = {ns.metadata.name for ns in client.CoreV1Api(api_client).list_namespace().items}
    assert {"default", "kube-system"} <= namespaces


def test_rbac_is_enforced(control_plane: ControlPlane, api_client: client.ApiClient, namespace: str) -> None:
    alice = client.CoreV1Api(control_plane.api_client(control_plane.kubeconfig_for("alice", ["developers"])))
    with pytest.raises(client.ApiException) as denied:
        alice.list_namespaced_pod(namespace)
    assert denied.value.status == 403

    client.CoreV1Api(api_client).list_namespaced_pod(namespace)  # the admin may
    binding = {
        "metadata": {"name": "alice-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
    }
    client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(namespace, binding)
    wait_until(lambda: alice.list_namespaced_pod(namespace), "alice to be allowed", timeout=10)


def test_gpu_pod_is_scheduled_onto_a_kwok_node_and_runs(
    control_plane: ControlPlane, api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, gpu_pod("learner", gpus=1))
    pod = running(core, "learner", namespace)
    assert pod.spec.node_name in control_plane.gpu_nodes
    assert pod.spec.containers[0].resources.limits[GPU] == "1"
    node = core.read_node(pod.spec.node_name)
    assert node.status.allocatable[GPU] == "8"


def test_deleting_the_owner_garbage_collects_the_pod(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    owner.kind = "ConfigMap"  # the API leaves kind out of typed responses
    core.create_namespaced_pod(namespace, gpu_pod("owned", owner=owner))
    running(core, "owned", namespace)

    core.delete_namespaced_config_map("owner", namespace)

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("owned", namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(pod_gone, "the garbage collector to delete the owned pod")


def test_a_crd_becomes_established(api_client: client.ApiClient, namespace: str) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.rlsd.io"},
        "spec": {
            "group": "test.rlsd.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = client.ApiextensionsV1Api(api_client)
    extensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            status = extensions.read_custom_resource_definition("widgets.test.rlsd.io").status
            return any(c.type == "Established" and c.status == "True" for c in status.conditions or [])

        wait_until(established, "the CRD to be Established")
        objects = client.CustomObjectsApi(api_client)
        widget = {
            "apiVersion": "test.rlsd.io/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"a": 1},
        }
        wait_until(  # discovery of the new resource may lag Established a little
            lambda: objects.create_namespaced_custom_object(
                "test.rlsd.io", "v1", namespace, "widgets", widget
            ),
            "a Widget to be created",
        )
        got = objects.get_namespaced_custom_object("test.rlsd.io", "v1", namespace, "widgets", "w")
        assert got["spec"] == {"a": 1}
    finally:
        extensions.delete_custom_resource_definition("widgets.test.rlsd.io")
