"""The chart against the real API server of tests/k8s: every rendered object accepted by a
server-side dry run, `helm install` / `upgrade` / `uninstall`, and a run reconciled to the end by
the operator running under the chart's own ServiceAccount (a token from the TokenRequest API),
with `kubectl auth can-i` proving that identity can do exactly what operator/README.md lists."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from charttools import CHART, MATRIX, ROOT, run
from controlplane import KWOK_NODE_SELECTOR, KWOK_TOLERATION, ControlPlane, exit_pod, free_port, wait_until
from kubernetes import client
from test_chart_render import readme_rules

pytestmark = pytest.mark.k8s
CRD = "rlsdruns.rlsd.io"
GROUP, VERSION, PLURAL = "rlsd.io", "v1alpha1", "rlsdruns"
# Every verb of `kubectl auth can-i`, over the resources the operator touches and a few it must not.
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
RESOURCES = [
    ("rlsd.io", "rlsdruns"),
    ("rlsd.io", "rlsdruns/status"),
    ("", "pods"),
    ("", "pods/exec"),
    ("", "pods/status"),
    ("", "services"),
    ("", "configmaps"),
    ("", "persistentvolumeclaims"),
    ("", "secrets"),
    ("", "events"),
    ("", "resourcequotas"),
    ("", "nodes"),
    ("", "persistentvolumes"),
    ("networking.k8s.io", "networkpolicies"),
    ("", "serviceaccounts"),
    ("apps", "deployments"),
    ("rbac.authorization.k8s.io", "roles"),
    ("kueue.x-k8s.io", "workloads"),
    ("kueue.x-k8s.io", "clusterqueues"),
]


class Kubectl:
    def __init__(self, plane: ControlPlane, kubeconfig: Path | None = None) -> None:
        self.binary = str(plane.assets / "kubectl")
        self.kubeconfig = str(kubeconfig or plane.kubeconfig)

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        command = [self.binary, "--kubeconfig", self.kubeconfig, *args]
        if check:
            return run(command, input=stdin)
        return subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    return Kubectl(control_plane)


@pytest.fixture(scope="session")
def helm_env(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="session")
def monitoring_crds(tools: Path, kubectl: Kubectl) -> None:
    """The prometheus-operator CRDs (generated from its Go types, see build-chart-tools.sh)."""
    for path in sorted((tools / "monitoring-crds").glob("*.yaml")):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    kinds = [
        f"{kind}.monitoring.coreos.com" for kind in ("servicemonitors", "podmonitors", "prometheusrules")
    ]
    for kind in kinds:
        kubectl("wait", "--for=condition=Established", f"crd/{kind}", "--timeout=60s")

    def served() -> bool:
        """Established is not served yet: a new CRD's first requests can time out on a busy server."""
        return all(kubectl("get", kind, "-A", check=False).returncode == 0 for kind in kinds)

    wait_until(served, "the monitoring CRDs served", timeout=120)


@pytest.fixture(scope="session")
def extra_namespaces(api_client: client.ApiClient) -> None:
    """The namespaces that the values matrix names."""
    core = client.CoreV1Api(api_client)
    for name in ("team-a", "team-b", "grafana", "rlsd-system"):
        try:
            core.create_namespace({"metadata": {"name": name}})
        except client.ApiException as exc:
            if exc.status != 409:
                raise


def helm_template(helm: str, values: tuple[str, ...], namespace: str = "rlsd-system") -> str:
    command = [helm, "template", "rlsd", str(CHART), "--namespace", namespace]
    for value in values:
        command += ["--set", value]
    return run(command).stdout


@pytest.mark.parametrize(("values"), [m[1] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_every_rendered_object_passes_a_server_side_dry_run(
    helm: str, kubectl: Kubectl, monitoring_crds: None, extra_namespaces: None, values: tuple[str, ...]
) -> None:
    """The API server validates each object against its OpenAPI schema (the CRDs' for the RLSDRun
    CRD itself, ServiceMonitor, PodMonitor and PrometheusRule), strictly: unknown fields fail."""
    rendered = helm_template(helm, values)
    result = kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "--validate=strict", "-f", "-",
        stdin=rendered,
    )  # fmt: skip
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len([d for d in yaml.safe_load_all(rendered) if d]), result.stdout


def test_the_operator_pod_passes_pod_security_restricted(
    helm: str, kubectl: Kubectl, api_client: client.ApiClient, namespace: str
) -> None:
    """The chart's one pod (the operator's Deployment) in a namespace enforcing and warning on
    "restricted": its pod passes a server-side dry run, the Deployment draws no warning."""
    core = client.CoreV1Api(api_client)
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    core.patch_namespace(namespace, {"metadata": {"labels": labels}})
    objects = [o for o in yaml.safe_load_all(helm_template(helm, (), namespace)) if o]
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    core.create_namespaced_service_account(namespace, account)  # the pod names it
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    pod = {"metadata": {**template["metadata"], "name": "operator"}, "spec": template["spec"]}
    core.create_namespaced_pod(namespace, pod, dry_run="All")  # a violation is a 403
    result = kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(deployment)
    )
    assert "(server dry run)" in result.stdout and "PodSecurity" not in result.stderr, result.stderr


def test_samples_pass_a_server_side_dry_run_and_render_valid_trainer_configs(
    kubectl: Kubectl, namespace: str, rlsd_crd_installed: None
) -> None:
    """The samples against the CRD's schema and CEL rules; the trainer config the operator renders from
    each (as defaulted by the API server) passes the trainer's own validation."""
    from rlsd_contracts.config import parse_config
    from rlsd_operator.trainer_config import build_trainer_config

    runs = []
    for path in sorted((ROOT / "manifests/samples").glob("*.yaml")):
        result = kubectl("create", "--dry-run=server", "-n", namespace, "-o", "yaml", "-f", str(path))
        runs += [obj for obj in yaml.safe_load_all(result.stdout) if obj and obj["kind"] == "RLSDRun"]
    assert len(runs) >= 3
    for run_object in runs:
        config = build_trainer_config(run_object["spec"], run_object["metadata"]["name"], namespace)
        parse_config(config)


@pytest.fixture
def rlsd_crd_installed(kubectl: Kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests/01-crds.yaml"))
    kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")


# -- helm install, and the operator under the chart's identity ---------------------------------------


def helm_cmd(helm: str, env: dict[str, str], *args: str) -> str:
    return run([helm, *args], env=env).stdout


def release_crd_free(api_client: client.ApiClient) -> None:
    """Deletes the CRD that other tests (or an earlier release, which kept it) left: helm adopts no
    object that another release, or none, made."""
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.read_custom_resource_definition(CRD)
    except client.ApiException as exc:
        if exc.status == 404:
            return
        raise
    extensions.delete_custom_resource_definition(CRD)

    def gone() -> bool:
        try:
            extensions.read_custom_resource_definition(CRD)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, "the old CRD to be deleted")


def token_kubeconfig(plane: ControlPlane, kubectl: Kubectl, namespace: str, account: str, path: Path) -> Path:
    token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {"server": plane.server, "certificate-authority": str(plane.pki.ca_cert)},
            }
        ],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": account}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(kubeconfig))
    return path


@pytest.fixture
def release(
    helm: str, helm_env: dict[str, str], api_client: client.ApiClient, namespace: str
) -> Iterator[str]:
    """The chart installed (cluster scope) in `namespace`; uninstalled afterwards."""
    release_crd_free(api_client)
    name = f"r{uuid.uuid4().hex[:6]}"
    notes = helm_cmd(helm, helm_env, "install", name, str(CHART), "--namespace", namespace, "--wait=false")
    assert "The RLSD operator rlsd/operator:0.1.0 is installed" in notes
    try:
        yield name
    finally:
        subprocess.run([helm, "uninstall", name, "--namespace", namespace], env=helm_env, check=False)


def run_manifest(name: str, namespace: str) -> dict[str, Any]:
    """One learner and one CPU rollout server on the kwok nodes, the claim made from a template."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RLSDRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"path": "Qwen/Qwen3-0.6B"},
            "dataset": {"train": {"kind": "jsonl", "path": "/data/train.jsonl"}},
            "steps": 10,
            "learner": {"image": "rlsd/trainer:cpu"},
            "rollout": {"backend": "cpu", "image": "rlsd/trainer:cpu", "replicas": 1},
            "checkpoint": {
                "volume": {
                    "claimTemplate": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "",
                        "resources": {"requests": {"storage": "1Gi"}},
                    }
                }
            },
            "huggingFaceTokenSecret": {"name": "hf"},
            "ttlSecondsAfterFinished": 0,
            "scheduling": {"nodeSelector": dict(KWOK_NODE_SELECTOR), "tolerations": [dict(KWOK_TOLERATION)]},
        },
    }


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_install_then_a_run_is_reconciled_under_the_charts_service_account(
    control_plane: ControlPlane,
    api_client: client.ApiClient,
    kubectl: Kubectl,
    helm: str,
    helm_env: dict[str, str],
    namespace: str,
    release: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
    deployment = client.AppsV1Api(api_client).read_namespaced_deployment(
        f"{release}-rlsd-operator", namespace
    )
    account = deployment.spec.template.spec.service_account_name
    container = deployment.spec.template.spec.containers[0]

    # The run's namespace: another one than the operator's, as with a ClusterRole.
    runs = f"runs-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": runs}})
    volume = f"{runs}-ckpt"
    core.create_persistent_volume(
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": f"/tmp/{volume}"},
                "claimRef": {"namespace": runs, "name": "demo-checkpoints"},
                "storageClassName": "",
            },
        }
    )
    secret = {"metadata": {"name": "hf"}, "data": {"token": base64.b64encode(b"hf_x").decode()}}
    wait_until(lambda: core.read_namespaced_service_account("default", runs), "default SA")
    core.create_namespaced_secret(runs, secret)

    # The operator as the Deployment runs it (its command and arguments, other ports), with the token
    # of the chart's ServiceAccount.
    kubeconfig = token_kubeconfig(control_plane, kubectl, namespace, account, tmp_path / "sa.kubeconfig")
    metrics_port, liveness_port = free_port(), free_port()
    args = [a for a in container.args]
    args[args.index("--metrics-port") + 1] = str(metrics_port)
    args[args.index("--liveness-port") + 1] = str(liveness_port)
    binary = str(Path(sys.executable).parent / container.command[0])
    env = {e.name: e.value for e in container.env}
    env |= {"KUBECONFIG": str(kubeconfig), "RLSD_OPERATOR_SCRAPE_SECONDS": "1"}
    log = tmp_path / "operator.log"
    with log.open("wb") as sink:
        operator = subprocess.Popen(
            [binary, *args], stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, runs, PLURAL, run_manifest("demo", runs))

        def status() -> dict[str, Any]:
            return (
                custom.get_namespaced_custom_object(GROUP, VERSION, runs, PLURAL, "demo").get("status") or {}
            )

        def running() -> bool:
            pods = core.list_namespaced_pod(runs).items
            live = {p.metadata.name: p.status.phase for p in pods}
            return status().get("phase") == "Running" and live == {
                "demo-learner-a1-0": "Running",
                "demo-rollout-0": "Running",
            }

        try:
            wait_until(running, f"the run Running under {account}", timeout=90)
        except TimeoutError as exc:
            pods = {p.metadata.name: p.status.phase for p in core.list_namespaced_pod(runs).items}
            raise AssertionError(f"{exc}: status {status()}, pods {pods}\n{log.read_text()[-4000:]}") from exc
        assert core.read_namespaced_config_map("demo-config", runs).data["config.yaml"]
        services = {s.metadata.name for s in core.list_namespaced_service(runs).items}
        assert services == {"demo-learners", "demo-rollout"}
        assert core.list_namespaced_event(runs, field_selector="involvedObject.name=demo").items
        assert http_get(f"http://127.0.0.1:{liveness_port}/healthz")
        assert 'rlsd_operator_runs{phase="Running"} 1.0' in http_get(
            f"http://127.0.0.1:{metrics_port}/metrics"
        )

        # The learner finishes: Succeeded, the rollout pod deleted, then the run (ttl 0).
        exit_pod(core, runs, "demo-learner-a1-0", 0)

        def deleted() -> bool:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, runs, PLURAL, "demo")
            except client.ApiException as exc:
                return exc.status == 404
            return False

        wait_until(deleted, f"the finished run deleted by the operator (log: {log})", timeout=60)
        assert operator.poll() is None, log.read_text()
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        core.delete_namespace(runs)
        core.delete_persistent_volume(volume)
    # Nothing was refused: the operator needs exactly what the README lists (no cluster scanning).
    refused = [line for line in log.read_text().splitlines() if "Forbidden" in line or "forbidden" in line]
    assert not refused, refused

    # Exactly what the README lists, in any namespace, and nothing else. Asked of the authorizer
    # directly (a SubjectAccessReview, what `kubectl auth can-i` sends), so that a resource whose API
    # the cluster does not serve (Kueue's) is asked about as it is, not as kubectl guesses it.
    allowed = readme_rules()
    subject = f"system:serviceaccount:{namespace}:{account}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
    authorization = client.AuthorizationV1Api(api_client)
    wrong = []
    for group, resource in RESOURCES:
        plural, _, subresource = resource.partition("/")
        for verb in VERBS:
            attributes = {"namespace": "team-a", "verb": verb, "group": group, "resource": plural}
            review = {"spec": {"user": subject, "groups": groups, "resourceAttributes": attributes}}
            if subresource:
                attributes["subresource"] = subresource
            answer = authorization.create_subject_access_review(review).status.allowed
            if answer != ((group, resource, verb) in allowed):
                wrong.append((verb, group, resource, answer))
    assert not wrong
    for cluster_wide in (["get", "nodes"], ["list", "namespaces"], ["list", "customresourcedefinitions"]):
        assert kubectl("auth", "can-i", *cluster_wide, "--as", subject, check=False).stdout.strip() == "no"


def test_upgrade_changes_the_deployment_and_uninstall_keeps_the_crd_and_runs(
    helm: str, helm_env: dict[str, str], api_client: client.ApiClient, namespace: str, release: str
) -> None:
    apps = client.AppsV1Api(api_client)
    helm_cmd(
        helm, helm_env, "upgrade", release, str(CHART), "-n", namespace, "--set", "operator.scrapeSeconds=5"
    )
    deployment = apps.read_namespaced_deployment(f"{release}-rlsd-operator", namespace)
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["RLSD_OPERATOR_SCRAPE_SECONDS"] == "5"
    assert deployment.spec.strategy.type == "Recreate"
    history = helm_cmd(helm, helm_env, "history", release, "-n", namespace, "-o", "json")
    assert [r["revision"] for r in json.loads(history)] == [1, 2]
    helm_cmd(helm, helm_env, "uninstall", release, "-n", namespace)
    wait_until(lambda: not apps.list_namespaced_deployment(namespace).items, "the Deployment deleted")
    # helm.sh/resource-policy: keep — deleting the CRD would delete every run with it.
    client.ApiextensionsV1Api(api_client).read_custom_resource_definition(CRD)
    rbac = client.RbacAuthorizationV1Api(api_client)
    assert not [r for r in rbac.list_cluster_role().items if r.metadata.name.startswith(release)]
