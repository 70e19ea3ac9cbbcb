"""A real Kueue manager beside the control plane of controlplane.py, for the queueing tests.

The manager (built by build-kueue.sh from the Go module proxy) runs on 127.0.0.1 as one more
component of the control plane, with Kueue's own CRDs and webhook configurations from its module:
its webhooks are served on loopback with a certificate of the test CA, which the API server trusts
through the configurations' caBundle (Kueue's internal certificate management is off). The `pod`
integration is on, for namespaces labelled `MANAGED_NAMESPACE_LABEL` only, so the rest of the test
session never passes through Kueue's webhooks.

Without internal certificate management Kueue v0.17 reads its metrics serving certificate from a
fixed path, /etc/kueue/metrics/certs (cmd/kueue/main.go), even with metrics off. The manager runs
in a mount namespace of its own (`unshare`; a user namespace too unless the tests run as root) whose
/etc is an overlay holding that certificate: nothing is written to the machine's /etc.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from controlplane import GPU, ControlPlane, free_port, http_ok, run_build
from kubernetes import client

BUILD_SCRIPT = Path(__file__).with_name("build-kueue.sh")
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
MANAGED_NAMESPACE_LABEL = {"rlsd.io/kueue-test": "true"}
# Beta features of v0.17 that need more than a manager: the visibility API is an aggregated API
# server (an APIService); nothing here asks it about pending workloads.
FEATURE_GATES = "VisibilityOnDemand=false"


@functools.cache
def build_kueue() -> Path:
    """The directory of the Kueue manager, its CRDs and webhooks (build-kueue.sh)."""
    return run_build(BUILD_SCRIPT)


class Kueue:
    """The Kueue manager of `plane`: `start()` installs its CRDs, starts it, and registers its
    webhooks once it serves them."""

    def __init__(self, assets: Path, plane: ControlPlane) -> None:
        self.assets = assets
        self.plane = plane
        self.workdir = plane.workdir / "kueue"
        self.webhook_port, self.health_port = free_port(), free_port()

    def start(self, api: client.ApiClient, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        self._install_crds(api, deadline)
        certs = self.workdir / "certs"
        etc = self.workdir / "etc"
        cert, key = self.plane.pki.issue("kueue-webhook", "kueue-webhook", hosts=["127.0.0.1"])
        for directory in (certs, etc / "upper/kueue/metrics/certs"):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "tls.crt").write_bytes(cert.read_bytes())
            (directory / "tls.key").write_bytes(key.read_bytes())
        (etc / "work").mkdir(exist_ok=True)
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(self._configuration(certs)))
        overlay = f"lowerdir=/etc,upperdir={etc / 'upper'},workdir={etc / 'work'}"
        self.plane.spawn(
            "kueue",
            *(["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]),
            "sh",
            "-c",
            f'mount -t overlay overlay -o {overlay} /etc && exec "$0" "$@"',
            str(self.assets / "kueue"),
            f"--config={config}",
            f"--feature-gates={FEATURE_GATES}",
            "--zap-log-level=2",
            binary=Path(shutil.which("unshare") or "unshare"),
            env={"KUBECONFIG": str(self.plane.kubeconfig_for("kueue", ["system:masters"]))},
        )
        ready = functools.partial(http_ok, f"http://127.0.0.1:{self.health_port}/readyz")
        self.plane.wait("kueue /readyz", ready, deadline)
        self._register_webhooks(api)

    def _configuration(self, certs: Path) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "managedJobsNamespaceSelector": {"matchLabels": MANAGED_NAMESPACE_LABEL},
            "integrations": {"frameworks": ["pod"]},
        }

    def _install_crds(self, api: client.ApiClient, deadline: float) -> None:
        """Kueue's CRDs; those its kustomization serves through the conversion webhook get it, pointed
        at the manager on loopback (as upstream installs them)."""
        directory = self.assets / "kueue-crds"
        kustomization = (directory / "kustomization.yaml").read_text()
        converted = set(re.findall(r"^- path: patches/webhook_in_(\w+)\.yaml", kustomization, re.MULTILINE))
        extensions = client.ApiextensionsV1Api(api)
        names = []
        for path in sorted(directory.glob("kueue.x-k8s.io_*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in converted:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": self._client_config("/convert"),
                        "conversionReviewVersions": ["v1"],
                    },
                }
            try:
                extensions.create_custom_resource_definition(crd)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            names.append(crd["metadata"]["name"])

        def established() -> bool:
            for name in names:
                status = extensions.read_custom_resource_definition(name).status
                if not any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
                    return False
            return True

        self.plane.wait("Kueue's CRDs to be Established", established, deadline)

    def _client_config(self, path: str) -> dict[str, str]:
        ca = base64.b64encode(self.plane.pki.ca_cert.read_bytes()).decode()
        return {"url": f"https://127.0.0.1:{self.webhook_port}{path}", "caBundle": ca}

    def _register_webhooks(self, api: client.ApiClient) -> None:
        """The module's webhook configurations, pointed at the manager, for managed namespaces only."""
        admission = client.AdmissionregistrationV1Api(api)
        for configuration in yaml.safe_load_all((self.assets / "kueue-webhooks.yaml").read_text()):
            if not configuration:
                continue
            configuration = copy.deepcopy(configuration)
            configuration["metadata"]["name"] = "kueue-" + configuration["metadata"]["name"]
            for webhook in configuration["webhooks"]:
                webhook["clientConfig"] = self._client_config(webhook["clientConfig"]["service"]["path"])
                webhook["namespaceSelector"] = {"matchLabels": MANAGED_NAMESPACE_LABEL}
            create = (
                admission.create_mutating_webhook_configuration
                if configuration["kind"] == "MutatingWebhookConfiguration"
                else admission.create_validating_webhook_configuration
            )
            create(configuration)


def cluster_queue(name: str, flavor: str, gpus: int) -> dict[str, Any]:
    """A ClusterQueue for every namespace with `gpus` nvidia.com/gpu of `flavor`; a workload of
    higher priority preempts lower ones in it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": [GPU],
                    "flavors": [
                        {"name": flavor, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}
                    ],
                }
            ],
        },
    }
