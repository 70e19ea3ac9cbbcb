"""Helpers of the chart tests: the tools, `helm template`, the values matrix."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/rlsd-operator"
BUILD_SCRIPT = ROOT / "tests/k8s/build-chart-tools.sh"


@functools.cache
def chart_tools() -> Path:
    """The directory of helm, promtool and the monitoring CRDs (built when not cached)."""
    result = subprocess.run(
        ["nice", "-n", "19", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}; see its stderr")
    return Path(result.stdout.strip().splitlines()[-1])


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs a command; a failure raises with its output."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def template(
    helm: str,
    *values: str,
    namespace: str = "rlsd-system",
    release: str = "rlsd",
    files: tuple[Path, ...] = (),
) -> list[dict]:
    """`helm template` of the chart with values `files` and `--set` values: the rendered objects."""
    command = [helm, "template", release, str(CHART), "--namespace", namespace]
    for path in files:
        command += ["--values", str(path)]
    for value in values:
        command += ["--set", value]
    return [doc for doc in yaml.safe_load_all(run(command).stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


ALL_MONITORING = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitors.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
)
# The values matrix of lint, template and server-side validation: (id, --set values).
MATRIX = [
    ("defaults", ()),
    ("all-monitoring", ALL_MONITORING),
    ("namespace-scope", ("rbac.scope=namespace", *ALL_MONITORING)),
    ("namespace-scope-two", ("rbac.scope=namespace", "watchNamespaces={team-a,team-b}")),
    ("cluster-some-namespaces", ("watchNamespaces={team-a}", "monitoring.podMonitors.namespaces={team-a}")),
    ("no-crds-no-rbac", ("crds.install=false", "rbac.create=false", "serviceAccount.create=false")),
    (
        "custom",
        (
            "fullnameOverride=ops",
            "image.tag=dev",
            "crds.keep=false",
            "serviceAccount.name=robot",
            "operator.metricsPort=9191",
            "operator.livenessPort=8181",
            "monitoring.labels.release=kube-prometheus-stack",
            "monitoring.prometheusRule.enabled=true",
            "monitoring.prometheusRule.runStalled.enabled=false",
            "monitoring.prometheusRule.alertLabels.team=ml",
            "monitoring.dashboard.enabled=true",
            "monitoring.dashboard.namespace=grafana",
        ),
    ),
]
