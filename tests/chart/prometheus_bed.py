"""A real Prometheus server (built by build-chart-tools.sh) for tests/chart/test_prometheus.py and
tests/e2e.

`scrape_configs` turns the chart's ServiceMonitor and PodMonitors, as the API server holds them, into
Prometheus scrape jobs the way the prometheus-operator generates them (v0.95: Kubernetes service
discovery of pods or EndpointSlices, a `keep` per selector label and for the port, the default
`namespace` / `pod` / `container` / `endpoint` labels, then the monitor's own relabelings verbatim).
Discovery runs against the test's real API server, so the targets are the pods the real operator
created, with their real labels and ports. On kwok nodes only the address differs: those pods'
processes run here on loopback, and a last relabeling per job points each pod at its stand-in (pods
without one are dropped). On the real node of tests/e2e, Prometheus runs in the node's network
namespace and scrapes the pods themselves.

`dashboard`, `substitute` and `query_problems` check the chart's Grafana dashboard against it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from netns import NetNs

Object = dict[str, Any]


def _sanitize(label: str) -> str:
    """A Kubernetes label name as Prometheus's discovery meta label suffix."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabelings(monitor_relabelings: list[Object]) -> list[Object]:
    """The monitor's relabelings (camelCase CRD fields) as Prometheus relabel configs."""
    keys = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "regex": "regex",
        "replacement": "replacement",
        "action": "action",
        "separator": "separator",
        "modulus": "modulus",
    }
    return [{keys[k]: v for k, v in rule.items()} for rule in monitor_relabelings]


def _selector_keeps(match_labels: dict[str, str], role: str) -> list[Object]:
    return [
        {
            "action": "keep",
            "source_labels": [
                f"__meta_kubernetes_{role}_label_{_sanitize(key)}",
                f"__meta_kubernetes_{role}_labelpresent_{_sanitize(key)}",
            ],
            "regex": f"({re.escape(value)});true",
        }
        for key, value in sorted(match_labels.items())
    ]


def _namespaces(monitor: Object) -> Object:
    selector = monitor["spec"].get("namespaceSelector") or {}
    if selector.get("any"):
        return {}
    return {"namespaces": {"names": selector.get("matchNames") or [monitor["metadata"]["namespace"]]}}


def _job(name: str, role: str, monitor: Object, endpoint: Object, relabel: list[Object]) -> Object:
    """One scrape job: the discovery role, then the generated relabelings, the `endpoint` label and
    the monitor's own relabelings last."""
    return {
        "job_name": name,
        "kubernetes_sd_configs": [{"role": role, **_namespaces(monitor)}],
        "scrape_interval": endpoint["interval"],
        "metrics_path": endpoint.get("path", "/metrics"),
        "relabel_configs": [
            *relabel,
            {"target_label": "endpoint", "replacement": endpoint["port"]},
            *_relabelings(endpoint.get("relabelings") or []),
        ],
    }


def pod_monitor_jobs(monitor: Object) -> list[Object]:
    name, namespace = monitor["metadata"]["name"], monitor["metadata"]["namespace"]
    jobs = []
    for i, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
                "action": "drop",
            },
            *_selector_keeps(monitor["spec"]["selector"]["matchLabels"], "pod"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{namespace}/{name}"},
        ]
        jobs.append(_job(f"podMonitor/{namespace}/{name}/{i}", "pod", monitor, endpoint, relabel))
    return jobs


def service_monitor_jobs(monitor: Object) -> list[Object]:
    name, namespace = monitor["metadata"]["name"], monitor["metadata"]["namespace"]
    spec = monitor["spec"]
    jobs = []
    for i, endpoint in enumerate(spec["endpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector_keeps(spec["selector"]["matchLabels"], "service"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                "regex": endpoint["port"],
            },
            {
                "source_labels": [
                    "__meta_kubernetes_endpointslice_address_target_kind",
                    "__meta_kubernetes_endpointslice_address_target_name",
                ],
                "separator": ";",
                "regex": "Pod;(.*)",
                "target_label": "pod",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
                "action": "drop",
            },
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        ]
        if spec.get("jobLabel"):
            relabel.append(
                {
                    "source_labels": [f"__meta_kubernetes_service_label_{_sanitize(spec['jobLabel'])}"],
                    "regex": "(.+)",
                    "target_label": "job",
                }
            )
        job = f"serviceMonitor/{namespace}/{name}/{i}"
        jobs.append(_job(job, "endpointslice", monitor, endpoint, relabel))
    return jobs


def stand_ins(addresses: dict[tuple[str, str], str]) -> list[Object]:
    """Relabelings that point pod (namespace, name) at the loopback address of the process that
    plays it, and drop the pods that nothing plays."""
    rules: list[Object] = [
        {
            "source_labels": ["__meta_kubernetes_namespace", "__meta_kubernetes_pod_name"],
            "regex": f"{re.escape(namespace)};{re.escape(pod)}",
            "target_label": "__address__",
            "replacement": address,
        }
        for (namespace, pod), address in sorted(addresses.items())
    ]
    played = "|".join(re.escape(a) for a in sorted(addresses.values()))
    return [*rules, {"source_labels": ["__address__"], "regex": f"({played})", "action": "keep"}]


def scrape_configs(
    service_monitors: list[Object],
    pod_monitors: list[Object],
    api_server: Object,
    addresses: dict[tuple[str, str], str] | None = None,
) -> list[Object]:
    """Prometheus scrape jobs for the monitors; `api_server` is the kubernetes_sd connection (server
    and TLS files: what in-cluster configuration gives a Prometheus pod); `addresses`: the stand-ins
    of pods on kwok nodes (None: the pods are real)."""
    jobs = [job for m in service_monitors for job in service_monitor_jobs(m)]
    jobs += [job for m in pod_monitors for job in pod_monitor_jobs(m)]
    for job in jobs:
        for sd in job["kubernetes_sd_configs"]:
            sd.update(api_server)
        if addresses is not None:
            job["relabel_configs"] += stand_ins(addresses)
    return jobs


@dataclass
class Prometheus:
    """`prometheus` on a loopback port (or, given `netns`, on its address inside) with a config and
    rule file; its HTTP API (at `url`, a loopback port of this machine either way)."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        binary: Path,
        workdir: Path,
        port: int,
        scrape: list[Object],
        rule_groups: list[Object],
        netns: NetNs | None = None,
    ) -> Prometheus:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": scrape,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        log = workdir / "prometheus.log"
        command = [
            str(binary),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={netns.address if netns else '127.0.0.1'}:{port}",
            "--log.level=warn",
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(
                netns.command(*command) if netns else command, stdout=sink, stderr=subprocess.STDOUT
            )
        server = cls(f"http://127.0.0.1:{netns.forward(port) if netns else port}", process, log)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)

    def get(self, path: str, **params: str) -> Object:
        """GET /api/v1/<path>: the whole answer of a success (`data`, and PromQL's `warnings` and
        `infos`, such as a rate() over a gauge); an error raises with its message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body

    def api(self, path: str, **params: str) -> Any:
        return self.get(path, **params)["data"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the dashboard ----------------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/rlsd-operator/dashboards/rlsd.json"
# vLLM's own series: only a real vLLM (GPUs) exports them, never our CPU rollout server.
VLLM = re.compile(r"\bvllm:")


def dashboard() -> Object:
    return json.loads(DASHBOARD.read_text())


def substitute(expr: str, variables: dict[str, str]) -> str:
    """A query with the template variables set to the run under test (one value each)."""
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr


def query_problems(
    prometheus: Prometheus, template: str, legend: str, variables: dict[str, str]
) -> list[str]:
    """What is wrong with one panel target's answers, variables set to the run (empty: no PromQL
    warning or info, a non-empty matrix over the last minute and a non-empty vector now, each series
    finite somewhere, labelled as its legend needs, and of the run under test where it selects one)."""
    expr, now = substitute(template, variables), time.time()
    answers = [
        prometheus.get("query_range", query=expr, start=str(now - 60), end=str(now), step="1"),
        prometheus.get("query", query=expr, time=str(now)),
    ]
    matrix, vector = (answer["data"] for answer in answers)
    # PromQL's own complaints, e.g. "metric might not be a counter" for a rate() over a gauge.
    problems = [note for answer in answers for note in answer.get("warnings", []) + answer.get("infos", [])]
    if matrix["resultType"] != "matrix" or not matrix["result"]:
        problems.append(f"range query: {matrix['resultType']} with {len(matrix['result'])} series")
    if vector["resultType"] != "vector" or not vector["result"]:
        problems.append(f"instant query: {vector['resultType']} with {len(vector['result'])} series")
    needed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for series in matrix["result"]:
        labels = series["metric"]
        if not any(math.isfinite(float(v)) for _, v in series["values"]):
            problems.append(f"no finite value in {labels}")
        if missing := needed - set(labels):
            problems.append(f"legend {legend!r} needs {sorted(missing)}, series has {labels}")
        selected = {k: v for k, v in labels.items() if k in variables}
        if "$run" in template and selected != {k: variables[k] for k in selected}:
            problems.append(f"not the run under test: {labels}")
    return problems
