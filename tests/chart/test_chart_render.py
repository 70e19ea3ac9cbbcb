"""The chart without a cluster: generated files in sync with their sources, `helm lint --strict`,
`helm template` over a matrix of values, RBAC exactly as operator/README.md states it, the values
schema and the values table of the chart's README."""

from __future__ import annotations

import re
from types import ModuleType

import pytest
import yaml
from charttools import CHART, MATRIX, ROOT, by_kind, run, template

CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def readme_rules() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) from operator/README.md's sentence "It needs ... on ...": a
    resource of another API group than rlsd.io and the core one is written `<plural>.<group>`.

    The operator's README is where its permissions are stated; the chart must grant exactly those.
    """
    text = " ".join((ROOT / "operator/README.md").read_text().split())
    sentence = re.search(r"It needs (.+?)\.(?:\s|$)", text)
    assert sentence, "operator/README.md no longer states what the operator needs"
    rules = set()
    for part in re.split(r", and |, | and ", sentence.group(1)):
        verbs, resource = part.replace("`", "").split(" on ")
        group = "rlsd.io" if resource.startswith("rlsdruns") else ""
        if "." in resource:
            resource, group = resource.split(".", 1)
        rules |= {(group, resource, verb) for verb in verbs.split("/")}
    return rules


# What only a ClusterRole can grant (nodes and volumes are cluster-wide): placing a run whose pods must
# share a node (operator/README.md, "Volumes").
CLUSTER_ONLY = {("", "nodes", "list"), ("", "persistentvolumes", "get")}


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_generated_files_match_their_sources(render: ModuleType, helm: str) -> None:
    """The CRD template (from the operator's CRD), the dashboard (from hack/dashboard.py) and
    manifests/ (helm template of the chart) are what hack/render.py writes: edit the source, rerun it."""
    expected = {
        render.CRD_TEMPLATE: render.crd_template(render.CRD_SOURCE.read_text()),
        render.DASHBOARD: render.dashboard_json(),
        **render.manifests(helm),
    }
    stale = [
        str(p.relative_to(ROOT)) for p, text in expected.items() if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"out of date (run charts/rlsd-operator/hack/render.py): {stale}"
    rendered = {p for p in (ROOT / "manifests").rglob("*.yaml") if "samples" not in p.parts}
    assert rendered == {p for p in expected if p.is_relative_to(ROOT / "manifests")}, "stray files"


def test_crd_in_the_chart_is_the_operators_crd(helm: str) -> None:
    source = yaml.safe_load((ROOT / "operator/src/rlsd_operator/crds/rlsdruns.rlsd.io.yaml").read_text())
    (crd,) = by_kind(template(helm), "CustomResourceDefinition")
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not by_kind(template(helm, "crds.install=false"), "CustomResourceDefinition")
    (unkept,) = by_kind(template(helm, "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]


@pytest.mark.parametrize(("values"), [m[1] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_lint_strict_and_template(helm: str, values: tuple[str, ...]) -> None:
    command = [helm, "lint", "--strict", str(CHART), "--namespace", "rlsd-system"]
    for value in values:
        command += ["--set", value]
    assert "0 chart(s) failed" in run(command).stdout
    objects = template(helm, *values)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == CONTAINER_SECURITY
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert container["command"] == ["rlsd-operator"]
    assert args[:4] == ["--metrics-port", str(ports["metrics"]), "--liveness-port", str(ports["healthz"])]
    for obj in objects:  # every namespaced object names its namespace (for the plain manifests)
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"].get("namespace"), obj["metadata"]["name"]


def test_rbac_is_exactly_what_the_operator_readme_says(helm: str) -> None:
    expected = readme_rules()
    assert ("rlsd.io", "rlsdruns/status", "patch") in expected and len(expected) >= 15
    assert expected >= CLUSTER_ONLY
    objects = template(helm)
    (role,) = by_kind(objects, "ClusterRole")
    assert granted(role["rules"]) == expected
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "rlsd-system"}
    ]
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert "--namespace" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [
        (("rbac.scope=namespace",), ["rlsd-system"]),
        (("rbac.scope=namespace", "watchNamespaces={a,b}"), ["a", "b"]),
    ],
)
def test_namespace_scope_has_roles_in_the_watched_namespaces_only(
    helm: str, values: tuple[str, ...], namespaces: list[str]
) -> None:
    objects = template(helm, *values)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    assert all(granted(r["rules"]) == readme_rules() - CLUSTER_ONLY for r in roles)
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    (deployment,) = by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == namespaces


def test_the_kueue_values_example_gives_the_operator_a_default_queue(helm: str) -> None:
    def env(objects: list[dict]) -> dict[str, str]:
        (deployment,) = by_kind(objects, "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in container["env"]}

    example = CHART / "examples/kueue.yaml"
    queue = yaml.safe_load(example.read_text())["operator"]["defaultQueueName"]
    assert env(template(helm, files=(example,)))["RLSD_OPERATOR_DEFAULT_QUEUE_NAME"] == queue
    assert "RLSD_OPERATOR_DEFAULT_QUEUE_NAME" not in env(template(helm))


def test_monitoring_objects_follow_the_pod_labels_and_ports_of_the_operator(helm: str) -> None:
    from rlsd_contracts import wire
    from rlsd_operator import names

    objects = template(helm, "monitoring.podMonitors.enabled=true", "monitoring.serviceMonitor.enabled=true")
    monitors = {m["metadata"]["name"].rsplit("-", 1)[1]: m["spec"] for m in by_kind(objects, "PodMonitor")}
    assert set(monitors) == {wire.LEARNER, wire.ROLLOUT, wire.TEACHER}
    for role, spec in monitors.items():
        assert spec["selector"]["matchLabels"][names.LABEL_ROLE] == role
        assert spec["selector"]["matchLabels"][names.LABEL_APP] == "rlsd"
        (endpoint,) = spec["podMetricsEndpoints"]
        assert {"targetLabel": "job", "replacement": f"rlsd-{role}"} in endpoint["relabelings"]
    assert monitors[wire.LEARNER]["selector"]["matchLabels"][names.LABEL_RANK] == "0"
    # The ports by name, as builders.py names them on the pods.
    assert monitors[wire.LEARNER]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitors[wire.ROLLOUT]["podMetricsEndpoints"][0]["port"] == "http"
    (service_monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = by_kind(objects, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert not by_kind(template(helm), "PodMonitor") and not by_kind(template(helm), "PrometheusRule")


def test_dashboard_config_map_carries_the_sidecar_label_and_the_json(helm: str) -> None:
    objects = template(helm, "monitoring.dashboard.enabled=true", "monitoring.dashboard.namespace=grafana")
    (config_map,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["data"]["rlsd.json"] == (CHART / "dashboards/rlsd.json").read_text().rstrip("\n")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("rbac.scope=everything", "/rbac/scope"),
        ("operator.metricsPort=0", "/operator/metricsPort"),
        ("monitoring.prometheusRule.runStalled.for=soon", "/monitoring/prometheusRule/runStalled/for"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
        ("unknownKey=1", "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values(helm: str, value: str, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        template(helm, value)


def leaves(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not path.endswith(("Labels", "labels", "Annotations")):
            if key in (
                "resources",
                "podSecurityContext",
                "securityContext",
                "livenessProbe",
                "readinessProbe",
            ):
                keys.add(path)
            else:
                keys |= leaves(value, path + ".")
        else:
            keys.add(path)
    return keys


def test_chart_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = set(re.findall(r"^\| `([^`]+)` \|", (CHART / "README.md").read_text(), re.MULTILINE))
    assert leaves(values) == table


def test_rendered_manifests_are_what_kubectl_users_apply() -> None:
    names = sorted(p.name for p in (ROOT / "manifests").glob("*.yaml"))
    assert names == ["00-namespace.yaml", "01-crds.yaml", "02-rbac.yaml", "03-operator.yaml"]
    objects = [d for p in (ROOT / "manifests").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    kinds = sorted(o["kind"] for o in objects)
    expected = ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole"]
    assert kinds == sorted([*expected, "ClusterRoleBinding", "Deployment", "Service"])


def test_samples_are_valid_runs() -> None:
    """Each sample of a run is one RLSDRun with the fields the CRD requires (the k8s tests apply them);
    the quick start's volume is the claim its run names."""
    samples = sorted((ROOT / "manifests/samples").glob("*.yaml"))
    assert [p.name for p in samples] == [
        "quickstart-cpu.yaml", "quickstart-volume.yaml", "qwen3-8b-gpu.yaml", "tiny-cpu.yaml",
    ]  # fmt: skip
    for path in samples:
        if path.name == "quickstart-volume.yaml":
            continue
        (run_manifest,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RLSDRun"]
        assert {"model", "dataset", "steps", "learner", "checkpoint"} <= set(run_manifest["spec"])
    volume, claim = yaml.safe_load_all((ROOT / "manifests/samples/quickstart-volume.yaml").read_text())
    quickstart = yaml.safe_load((ROOT / "manifests/samples/quickstart-cpu.yaml").read_text())
    assert quickstart["spec"]["checkpoint"]["volume"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # the run's 5 pods share it
