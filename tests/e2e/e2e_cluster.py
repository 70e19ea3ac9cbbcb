"""The real cluster of the end-to-end tests, as the tests drive it: a control plane and a real node
(k8s/realnode.py) in a network namespace of their own, reached with kubectl, helm and the kubernetes
client through a forwarded port, and the commands of the README's cluster quick start."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from controlplane import ControlPlane, wait_until
from kubernetes import client
from netns import NetNs
from realnode import NODE_ADDRESS, RealNode

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/rlsd-operator"
SAMPLES = ROOT / "manifests/samples"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class RealCluster:
    plane: ControlPlane
    node: RealNode
    netns: NetNs
    helm_binary: Path
    workdir: Path
    api: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api = self.plane.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.apps = client.AppsV1Api(self.api)
        home = self.workdir / "helm"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.plane.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    # -- the user's commands ----------------------------------------------------------------------

    def _run(
        self, command: list[str], stdin: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.plane.assets / "kubectl"), *args], stdin, check, timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.helm_binary), *args], None, check, timeout)

    # -- namespaces, runs, pods -------------------------------------------------------------------

    @contextlib.contextmanager
    def namespace(self, name: str, labels: dict[str, str] | None = None) -> Iterator[str]:
        """A namespace (whose default service account exists), deleted afterwards."""
        self.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        wait_until(lambda: self.core.read_namespaced_service_account("default", name), f"{name}/default SA")
        try:
            yield name
        finally:
            with contextlib.suppress(client.ApiException):
                self.core.delete_namespace(name)

    def run(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("rlsd.io", "v1alpha1", namespace, "rlsdruns", name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.run(namespace, name).get("status") or {}

    def wait_status(
        self, namespace: str, name: str, what: str, check: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Polls the run's status until `check` holds; a run that fails meanwhile ends the wait."""

        def reached() -> dict[str, Any] | None:
            status = self.status(namespace, name)
            if check(status):
                return status
            if status.get("phase") == "Failed" and what != "Failed":
                raise AssertionError(
                    f"run {namespace}/{name} failed: {status}\n{self.diagnostics(namespace)}"
                )
            return None

        try:
            return wait_until(reached, f"{namespace}/{name}: {what}", timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics(namespace)}") from exc

    def pods(self, namespace: str) -> dict[str, client.V1Pod]:
        return {p.metadata.name: p for p in self.core.list_namespaced_pod(namespace).items}

    def logs(self, namespace: str, pod: str) -> str:
        return self.kubectl("logs", "-n", namespace, pod, check=False).stdout

    def container_pids(self, namespace: str, pod: str) -> list[int]:
        """The host process ids of a pod's (first) container, from containerd."""
        status = self.core.read_namespaced_pod(pod, namespace).status.container_statuses[0]
        container_id = status.container_id.split("://", 1)[1]
        pids = self.node.ctr("tasks", "ps", container_id).splitlines()[1:]
        return [int(line.split()[0]) for line in pids if line.strip()]

    def http_get(self, url: str, timeout: float = 5) -> tuple[int, str]:
        """GET `url` from inside the cluster's network (a pod's address, say)."""
        import urllib.error
        import urllib.request

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        return self.netns.call(get)

    def diagnostics(self, namespace: str | None = None) -> str:
        """What helps a reader of a failed test: pods, events, the pods' logs and the node's logs."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout]
        if namespace:
            parts.append(
                self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
            )
            with contextlib.suppress(Exception):
                parts.append(json.dumps(self.status(namespace, "quickstart"), indent=1))
            for pod in self.pods(namespace):
                parts.append(f"===== logs of {namespace}/{pod} =====\n{self.logs(namespace, pod)[-4000:]}")
        parts.append(self.plane.logs(40))
        return "\n".join(parts)


def manifest_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def restricted_labels() -> dict[str, str]:
    return dict(RESTRICTED)


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 1)


__all__ = ["NODE_ADDRESS", "RealCluster", "elapsed", "manifest_documents", "restricted_labels"]
