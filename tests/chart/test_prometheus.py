"""The chart's monitoring against a real Prometheus that scrapes a real run.

The bed: the real control plane of tests/k8s, the chart installed by helm (monitors and alert rules
enabled, `for:` durations and intervals shortened through chart values), the real operator under
the chart's ServiceAccount, and an RLSDRun whose learner, rollout and teacher pods the operator
creates on kwok nodes. Their processes run here: `rlsd-trainer local` (the learner rank 0, with its
metrics port), two CPU rollout servers and a teacher server, which the trainer really uses. Prometheus
(built from the same Go module as promtool) discovers the pods through the API server with scrape
jobs derived from the monitors as installed (prometheus_bed.py) and loads the PrometheusRule's groups.

Then every dashboard query returns data of the expected shape for the run, every template variable
lists it, no alert fires while it is healthy, and each alert that can be caused here goes pending and
then firing through Prometheus's own API when its condition is caused for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from charttools import CHART, ROOT, run
from controlplane import (
    KWOK_NODE_SELECTOR,
    KWOK_TOLERATION,
    ControlPlane,
    bound_claim,
    exit_pod,
    free_port,
    wait_until,
)
from kubernetes import client
from processes import CLI, Server, one_thread_env, start_server, wait_healthy
from prometheus_bed import VLLM, Prometheus, dashboard, query_problems, scrape_configs, substitute
from test_chart_install import Kubectl, helm_env, kubectl, monitoring_crds, token_kubeconfig
from test_distributed import SEED, TASK, prepare_output, run_config

from rlsd_contracts.config import EmbeddedTaskSection
from rlsd_operator import names
from rlsd_trainer.model.embedded import build_model_dir

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
_FIXTURES = (helm_env, kubectl, monitoring_crds)  # imported for their fixtures

RELEASE, SYSTEM, RUNS = "prom", "prom-system", "prom-runs"
RUN = "demo"
GROUP, VERSION, PLURAL = names.GROUP, names.VERSION, names.PLURAL
# Chart values of the bed: scrapes every second, alert durations of seconds.
VALUES = (
    "crds.install=false",
    "operator.scrapeSeconds=1",
    f"nodeSelector.type={KWOK_NODE_SELECTOR['type']}",
    f"tolerations[0].key={KWOK_TOLERATION['key']}",
    "tolerations[0].operator=Exists",
    "tolerations[0].effect=NoSchedule",
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.serviceMonitor.interval=1s",
    "monitoring.podMonitors.enabled=true",
    "monitoring.podMonitors.interval=1s",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.prometheusRule.runFailed.for=3s",
    "monitoring.prometheusRule.runStalled.window=40s",
    "monitoring.prometheusRule.runStalled.for=4s",
    "monitoring.prometheusRule.restartStorm.threshold=2",
    "monitoring.prometheusRule.restartStorm.window=10m",
    "monitoring.prometheusRule.restartStorm.for=3s",
    "monitoring.prometheusRule.rolloutServerDown.for=4s",
    "monitoring.prometheusRule.operatorReconcileErrors.window=1m",
    "monitoring.prometheusRule.operatorReconcileErrors.for=3s",
)
# What the dashboard's template variables are set to.
VARIABLES = {"namespace": RUNS, "run": RUN}
# Series that exist once the policy samples what they average over: `rlsd_delta_before_error` needs
# an incorrect response whose first token is its reference's, which the bed's policy (untrained, no
# warm-up) seldom samples within the check (tests/chart/test_monitoring.py's warmed-up run exports
# it). Their queries may answer empty here; any other problem still fails.
SAMPLE_DEPENDENT = re.compile(r"\brlsd_delta_before_error\b")
NO_SERIES = re.compile(r"(range|instant) query: \w+ with 0 series")
# The alerts caused here, and those that promtool's rule tests cover (tests/chart/test_monitoring.py):
# a reward collapse needs a policy that first learns for a whole window and then diverges, which a
# tiny model trained from scratch on 2 shared CPU cores does not do reliably within minutes.
CAUSED = {
    "RLSDRunStalled",
    "RLSDRolloutServerDown",
    "RLSDRestartStorm",
    "RLSDRunFailed",
    "RLSDOperatorReconcileErrors",
}
NOT_CAUSED = {"RLSDRewardCollapse"}


@dataclass
class Bed:
    prometheus: Prometheus
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    rbac: client.RbacAuthorizationV1Api
    trainer: Server
    rollout: list[Server]
    operator_log: Path
    cluster_role: str
    logs: list[Path] = field(default_factory=list)

    def diagnostics(self) -> str:
        parts = []
        for path in self.logs:
            parts.append(f"===== {path} =====\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)


def run_spec(name: str, **changes: Any) -> dict[str, Any]:
    """An RLSDRun on the kwok nodes; its pods never start a container (kwok plays the kubelet)."""
    spec = {
        "model": {"path": "embedded"},
        "dataset": {"train": {"kind": "embedded"}},
        "steps": 1000,
        "learner": {"image": "rlsd/trainer:cpu"},
        "checkpoint": {"volume": {"claimName": "checkpoints"}},
        "scheduling": {"nodeSelector": dict(KWOK_NODE_SELECTOR), "tolerations": [dict(KWOK_TOLERATION)]},
        **changes,
    }
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLSDRun", "metadata": {"name": name}, "spec": spec}


def spawn(command: list[str], log: Path, url: str, env: dict[str, str]) -> Server:
    """A process of the bed, its output in `log` (a stopped one is killed at the end: Server.stop)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Server(process, url, log)


@pytest.fixture(scope="module")
def bed(
    control_plane: ControlPlane,
    api_client: client.ApiClient,
    kubectl: Kubectl,
    helm: str,
    helm_env: dict[str, str],
    monitoring_crds: None,
    tools: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("prometheus-bed")
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests/01-crds.yaml"))
    kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever fails
        for namespace in (SYSTEM, RUNS):
            core.create_namespace({"metadata": {"name": namespace}})
            cleanup.callback(core.delete_namespace, namespace)
            wait_until(lambda ns=namespace: core.read_namespaced_service_account("default", ns), "default SA")
        command = [helm, "install", RELEASE, str(CHART), "-n", SYSTEM, "--wait=false"]
        run([*command, *(arg for value in VALUES for arg in ("--set", value))], env=helm_env)
        cleanup.callback(run, [helm, "uninstall", RELEASE, "-n", SYSTEM], env=helm_env)
        cleanup.enter_context(bound_claim(core, RUNS))
        # The run's processes: two CPU rollout servers, a teacher server and the trainer (the 2-rank
        # run of tests/trainer/test_distributed.py, in one process, for as long as the test needs).
        model = work / "model" / "embedded-model"
        build_model_dir(model, EmbeddedTaskSection(**TASK), SEED)
        logs = work / "logs"
        logs.mkdir()
        rollout = [start_server("rollout", model, logs, "policy") for _ in range(2)]
        teacher = start_server("teacher", model, logs, "policy")
        for server in (*rollout, teacher):
            cleanup.callback(server.stop)
        wait_healthy([*rollout, teacher])
        output = work / "run"
        prepare_output(output, model)
        metrics_port = free_port()
        config = run_config(
            output,
            {"rollout": rollout, "teacher": [teacher]},
            run={"name": RUN, "total_steps": 100000},
            checkpoint={"every": 3, "keep_last": 1, "async_save": False},
            metrics={"prometheus_port": metrics_port, "progress_bar": False, "console_every": 1},
            eval={"every": 3},
        )
        tests_dir = str(ROOT / "tests/trainer")  # verifier_fixtures, the reward callable
        trainer = spawn(
            [CLI, "local", "--config", str(config)],
            logs / "trainer.log",
            f"http://127.0.0.1:{metrics_port}",
            one_thread_env(PYTHONPATH=tests_dir),
        )
        cleanup.callback(trainer.stop)

        # The operator as the chart's Deployment runs it, under the chart's ServiceAccount.
        apps = client.AppsV1Api(api_client)
        deployment = apps.read_namespaced_deployment(f"{RELEASE}-rlsd-operator", SYSTEM)
        container = deployment.spec.template.spec.containers[0]
        account = deployment.spec.template.spec.service_account_name
        kubeconfig = token_kubeconfig(control_plane, kubectl, SYSTEM, account, work / "operator.kubeconfig")
        operator_port = free_port()
        args = list(container.args)
        args[args.index("--metrics-port") + 1] = str(operator_port)
        args[args.index("--liveness-port") + 1] = str(free_port())
        env = {**os.environ, **{e.name: e.value for e in container.env}, "KUBECONFIG": str(kubeconfig)}
        binary = str(Path(sys.executable).parent / container.command[0])
        operator = spawn([binary, *args], logs / "operator.log", f"http://127.0.0.1:{operator_port}", env)
        cleanup.callback(operator.stop)

        manifest = run_spec(
            RUN,
            rollout={"backend": "cpu", "image": "rlsd/trainer:cpu", "replicas": 2},
            teacher={"placement": "remote", "replicas": 1, "image": "rlsd/trainer:cpu"},
        )
        custom.create_namespaced_custom_object(GROUP, VERSION, RUNS, PLURAL, manifest)
        pods = ["demo-learner-a1-0", "demo-rollout-0", "demo-rollout-1", "demo-teacher-0"]

        def running() -> bool:
            phases = {p.metadata.name: p.status.phase for p in core.list_namespaced_pod(RUNS).items}
            return all(phases.get(pod) == "Running" for pod in pods)

        wait_until(running, "the run's pods Running on the kwok nodes", timeout=120)
        operator_pod = wait_until(
            lambda: [
                p.metadata.name
                for p in core.list_namespaced_pod(
                    SYSTEM, label_selector=f"app.kubernetes.io/instance={RELEASE}"
                ).items
                if p.status.phase == "Running"
            ],
            "the chart's operator pod Running on a kwok node",
            timeout=120,
        )[0]
        addresses = {
            (RUNS, "demo-learner-a1-0"): f"127.0.0.1:{metrics_port}",
            (RUNS, "demo-rollout-0"): rollout[0].url.removeprefix("http://"),
            (RUNS, "demo-rollout-1"): rollout[1].url.removeprefix("http://"),
            (RUNS, "demo-teacher-0"): teacher.url.removeprefix("http://"),
            (SYSTEM, operator_pod): f"127.0.0.1:{operator_port}",
        }

        # Prometheus: scrape jobs from the monitors and rules from the PrometheusRule, as installed.
        def installed(plural: str) -> list[dict]:
            return custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", SYSTEM, plural)[
                "items"
            ]

        admin = control_plane.pki.dir
        api_server = {
            "api_server": control_plane.server,
            "tls_config": {
                "ca_file": str(control_plane.pki.ca_cert),
                "cert_file": str(admin / "admin.crt"),
                "key_file": str(admin / "admin.key"),
            },
        }
        scrape = scrape_configs(installed("servicemonitors"), installed("podmonitors"), api_server, addresses)
        (rule,) = installed("prometheusrules")
        prometheus = Prometheus.start(
            tools / "prometheus", work / "prometheus", free_port(), scrape, rule["spec"]["groups"]
        )
        cleanup.callback(prometheus.stop)
        server_logs = [s.log for s in (*rollout, teacher)]
        role = f"{RELEASE}-rlsd-operator"
        yield Bed(
            prometheus, core, custom, rbac, trainer, rollout, logs / "operator.log", role,
            [logs / "trainer.log", logs / "operator.log", prometheus.log, *server_logs],
        )  # fmt: skip


# -- the dashboard ----------------------------------------------------------------------------------


def wait_for(bed: Bed, what: str, check: Callable[[], Any], timeout: float) -> Any:
    try:
        return wait_until(check, what, timeout=timeout, retry_on=(AssertionError,))
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{bed.diagnostics()}") from exc


def test_every_dashboard_query_returns_data_for_the_run(bed: Bed) -> None:
    """Each panel target, variables set to the run, after a few steps of it: Grafana asks Prometheus
    for a range (time series, stat panels) and we ask for an instant too."""
    version = f'rlsd_policy_version{{job="rlsd-learner", namespace="{RUNS}", run="{RUN}"}}'

    def steps_scraped() -> bool:
        result = bed.prometheus.api("query", query=f"min_over_time({version}[1m])")["result"]
        assert result, "no step of the run scraped yet"
        return float(bed.prometheus.api("query", query=version)["result"][0]["value"][1]) >= 4

    wait_for(bed, "the run's step 4 scraped by Prometheus", steps_scraped, timeout=300)
    targets = [
        (panel["title"], target) for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]
    assert len(targets) >= 40
    vllm_only = {title for title, t in targets if VLLM.search(t["expr"])} - {
        title for title, t in targets if not VLLM.search(t["expr"])
    }
    assert vllm_only == {"KV-cache use"}  # the one panel this bed cannot fill (no GPU, no vLLM)

    def all_answer() -> bool:
        failures = {}
        for title, target in targets:
            if VLLM.search(target["expr"]):
                continue
            problems = query_problems(bed.prometheus, target["expr"], target["legendFormat"], VARIABLES)
            if SAMPLE_DEPENDENT.search(target["expr"]):
                problems = [problem for problem in problems if not NO_SERIES.fullmatch(problem)]
            if problems:
                failures[f"{title} / {target['refId']}: {substitute(target['expr'], VARIABLES)}"] = problems
        assert not failures, json.dumps(failures, indent=1)
        return True

    wait_for(bed, "every dashboard query to answer", all_answer, timeout=90)


def test_every_template_variable_lists_the_run(bed: Bed) -> None:
    """`label_values(selector, label)`, as Grafana's Prometheus data source asks for it (the label
    values API with the selector as match[]), lists the run's namespace and name."""
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in variables} == set(VARIABLES)
    for variable in variables:
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()
        values = bed.prometheus.api(f"label/{label}/values", **{"match[]": substitute(selector, VARIABLES)})
        assert VARIABLES[variable["name"]] in values, (variable["name"], values)


# -- the alerts -------------------------------------------------------------------------------------


def active_alerts(bed: Bed) -> list[dict[str, Any]]:
    return bed.prometheus.api("alerts")["alerts"]


def first_recorded(bed: Bed, alert: str, state: str) -> float | None:
    """When Prometheus first recorded `alert` in `state` (its ALERTS series) in the last 15 minutes."""
    series = f'ALERTS{{alertname="{alert}", alertstate="{state}"}}'
    result = bed.prometheus.api("query", query=f"min_over_time(timestamp({series})[15m:1s])")["result"]
    return min(float(r["value"][1]) for r in result) if result else None


def recorded(bed: Bed, alert: str) -> tuple[float, float]:
    """`alert`'s first pending and firing times. The alerts API can show a state before its ALERTS
    sample is stored, and the subquery's steps fall on whole seconds, so a state just reported
    becomes visible here up to a second later: callers wait for it."""
    pending, firing = (first_recorded(bed, alert, state) for state in ("pending", "firing"))
    assert pending is not None and firing is not None, f"{alert}: pending at {pending}, firing at {firing}"
    return pending, firing


def test_rules_are_loaded_and_silent_on_the_healthy_run(bed: Bed) -> None:
    groups = bed.prometheus.api("rules", type="alert")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded == CAUSED | NOT_CAUSED
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    # The run has been scraped for longer than the stall window plus `for` (1 s scrapes).
    scraped = f'count_over_time(rlsd_policy_version{{namespace="{RUNS}", run="{RUN}"}}[5m])'

    def long_enough() -> bool:
        result = bed.prometheus.api("query", query=scraped)["result"]
        assert result and float(result[0]["value"][1]) >= 45, result
        return True

    wait_for(bed, "45 s of the run scraped", long_enough, timeout=120)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # and it stays so (a slow scrape may make one pending, briefly)
        firing = [a for a in active_alerts(bed) if a["state"] == "firing"]
        assert not firing, f"{firing}\n{bed.diagnostics()}"
        time.sleep(1)
    status = bed.custom.get_namespaced_custom_object(GROUP, VERSION, RUNS, PLURAL, RUN)["status"]
    assert status["phase"] == "Running", status
    version = f'rlsd_policy_version{{namespace="{RUNS}", run="{RUN}"}}'
    assert float(bed.prometheus.api("query", query=version)["result"][0]["value"][1]) >= 4


def test_each_alert_goes_pending_then_firing_when_caused_for_real(bed: Bed) -> None:
    """Caused together, watched through Prometheus's alerts API:
    - the trainer SIGSTOPped: learner rank 0 stops answering, RLSDRunStalled for the run;
    - a rollout server killed: RLSDRolloutServerDown for its pod;
    - a second run whose learner exits 1 on every attempt (backoffLimit 2): the operator restarts it
      twice, RLSDRestartStorm (threshold 2), then gives up at the third failure, RLSDRunFailed;
    - the operator's ClusterRole loses `get` on Secrets but the runs' tokens (a manual change): a run
      naming another Secret makes every reconcile raise a 403, RLSDOperatorReconcileErrors.
    """
    # increase() needs a sample of each counter from before the failures, as in any real Prometheus.
    baseline = 'count_over_time(rlsd_operator_restarts_total{job="rlsd-operator"}[1m])'

    def counters_scraped() -> bool:
        result = bed.prometheus.api("query", query=baseline)["result"]
        assert result and float(result[0]["value"][1]) >= 3, result
        return True

    wait_for(bed, "the operator's counters scraped", counters_scraped, timeout=60)
    os.kill(bed.trainer.process.pid, signal.SIGSTOP)
    bed.rollout[1].kill()
    crashy = run_spec("crashy", restartPolicy={"backoffLimit": 2, "backoffSeconds": 0})
    bed.custom.create_namespaced_custom_object(GROUP, VERSION, RUNS, PLURAL, crashy)
    # Secrets may still be made, but read only by the names of the two runs' tokens (which every
    # attempt reads): the HF token Secret the third run names is forbidden.
    role = bed.rbac.read_cluster_role(bed.cluster_role)
    role.rules = [r for r in role.rules if "secrets" not in r.resources] + [
        client.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["create"]),
        client.V1PolicyRule(
            api_groups=[""],
            resources=["secrets"],
            verbs=["get"],
            resource_names=[names.run_token_name(RUN), names.run_token_name("crashy")],
        ),
    ]
    bed.rbac.replace_cluster_role(bed.cluster_role, role)
    locked = run_spec("locked", huggingFaceTokenSecret={"name": "hf"})
    bed.custom.create_namespaced_custom_object(GROUP, VERSION, RUNS, PLURAL, locked)

    seen: dict[str, list[tuple[str, dict[str, str]]]] = {name: [] for name in CAUSED}
    crashed: set[str] = set()
    deadline = time.monotonic() + 600  # only bounds a wait for what does come, however busy the machine
    while time.monotonic() < deadline:
        for attempt in (1, 2, 3):  # every learner pod of the crashy run exits 1 once it runs
            pod = f"crashy-learner-a{attempt}-0"
            if pod not in crashed:
                try:
                    if bed.core.read_namespaced_pod(pod, RUNS).status.phase == "Running":
                        exit_pod(bed.core, RUNS, pod, 1)
                        crashed.add(pod)
                except client.ApiException as exc:
                    if exc.status != 404:
                        raise
        for alert in active_alerts(bed):
            states = seen.setdefault(alert["labels"]["alertname"], [])
            entry = (alert["state"], alert["labels"])
            if entry not in states:
                states.append(entry)
        if all(any(s == "firing" for s, _ in seen[name]) for name in CAUSED):
            break
        time.sleep(0.5)
    report = json.dumps(seen, indent=1) + "\n" + bed.diagnostics()
    for name in CAUSED:
        assert any(state == "firing" for state, _ in seen[name]), f"{name}: {seen[name]}\n{report}"
        # Pending first, for `for:`, as Prometheus itself recorded it: a poll can miss a pending window
        # of seconds when the machine is busy.
        pending, firing = wait_for(bed, f"{name} in ALERTS", partial(recorded, bed, name), timeout=60)
        assert pending < firing, f"{name}: first pending at {pending}, firing at {firing}\n{report}"
    assert not set(seen) - CAUSED, report  # nothing else fired (RLSDRewardCollapse among them)

    def labels(name: str) -> dict[str, str]:
        return next(lbl for state, lbl in seen[name] if state == "firing")

    assert labels("RLSDRunStalled") | {"namespace": RUNS, "run": RUN} == labels("RLSDRunStalled")
    assert labels("RLSDRolloutServerDown")["pod"] == "demo-rollout-1"
    assert labels("RLSDRolloutServerDown")["run"] == RUN
    assert labels("RLSDRunFailed")["phase"] == "Failed"
    failed = bed.custom.get_namespaced_custom_object(GROUP, VERSION, RUNS, PLURAL, "crashy")["status"]
    assert failed["phase"] == "Failed" and failed["restarts"] == 3, failed
    assert "forbidden" in bed.operator_log.read_text().lower()

    # The frozen learner resumes: the stall resolves.
    os.kill(bed.trainer.process.pid, signal.SIGCONT)

    def stall_resolved() -> bool:
        return not [a for a in active_alerts(bed) if a["labels"]["alertname"] == "RLSDRunStalled"]

    wait_for(bed, "RLSDRunStalled to resolve once the trainer runs again", stall_resolved, timeout=60)
