"""The README's cluster quick start, executed: the images built from the Dockerfile, the chart's
operator and an RLSDRun's learner, rollout and teacher pods run on a real node (kubelet, containerd,
runc, CNI, kube-proxy, CoreDNS; k8s/realnode.py), in a namespace enforcing Pod Security
"restricted". Nothing is patched into a pod's status: exits, evictions and lost pods are real.

- the chart's operator pod runs as the chart says (uid 65532, read-only root) and stays up;
- manifests/samples/quickstart-cpu.yaml trains to the end: two learner pods as one torchrun gang over
  the headless Service's DNS names, two CPU rollout servers and a teacher server; `kubectl get rlsd`
  shows the step and reward the operator reads from the real learner; a learner pod evicted mid-run
  makes the gang restart from the checkpoint on the claim (a preemption, not a failure); a rollout
  pod deleted mid-run is recreated alone and the learners finish without it; what needs the run
  alive is checked while one learner rank is stopped (the other waits for it), so the run's pace,
  24 steps in 15 s on an idle machine, cannot outrun the test;
- a real Prometheus scrapes the real pods through scrape jobs derived from the chart's monitors: every
  dashboard panel answers for the run, and RLSDRolloutServerDown fires for a rollout server that
  stops answering (SIGSTOP) while its pod stays Running; left stopped, the server fails its liveness
  probe (through the engine), the kubelet kills it and the operator replaces it, and the run goes on;
- a run whose dataset is missing in the pod fails at once with the trainer's own message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from charttools import chart_tools
from controlplane import wait_until
from e2e_cluster import RESTRICTED, SAMPLES, RealCluster, manifest_documents
from prometheus_bed import VLLM, Prometheus, dashboard, pod_monitor_jobs, query_problems, service_monitor_jobs

from rlsd_contracts.exit_codes import EXIT_BAD_CONFIG
from rlsd_operator import security

pytestmark = [pytest.mark.k8s, pytest.mark.realnode, pytest.mark.slow]

RUN = "quickstart"
# The chart's monitoring, as an installation with the Prometheus operator enables it; short `for:`
# durations and intervals, so that an alert fires within seconds.
MONITORING = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.serviceMonitor.interval=2s",
    "monitoring.podMonitors.enabled=true",
    "monitoring.podMonitors.interval=2s",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.prometheusRule.rolloutServerDown.for=4s",
)


def quickstart_spec() -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / "quickstart-cpu.yaml").read_text())["spec"]


def volume_manifest(directory: Path) -> str:
    """manifests/samples/quickstart-volume.yaml with its one node-specific field, the directory."""
    documents = manifest_documents(SAMPLES / "quickstart-volume.yaml")
    (volume,) = [d for d in documents if d["kind"] == "PersistentVolume"]
    volume["spec"]["local"]["path"] = str(directory)
    return yaml.safe_dump_all(documents)


def columns(cluster: RealCluster, namespace: str) -> dict[str, str]:
    """`kubectl get rlsd quickstart`, as the user reads it: column -> cell (cells split where the
    header's columns start, so an empty cell stays empty)."""
    header, row = cluster.kubectl("get", "rlsd", RUN, "-n", namespace).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, ends, strict=True)}


def evict(cluster: RealCluster, namespace: str, pod: str) -> None:
    """What `kubectl drain` does to a pod: the Eviction API (the kubelet then sends SIGTERM)."""
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    cluster.core.create_namespaced_pod_eviction(pod, namespace, eviction)


def committed_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-????????"))


def logged_records(run_dir: Path) -> list[dict[str, float]]:
    """What learner rank 0 logged to the claim's metrics.jsonl so far (whole lines: one may be half
    written)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def logged_steps(run_dir: Path) -> list[int]:
    """The training steps logged, in the order they were."""
    return [r["step"] for r in logged_records(run_dir) if r.get("step")]


def ready_to_hold(run_dir: Path) -> bool:
    """A checkpoint to resume from is committed, and steps with responses of both signs of advantage
    were logged (what the dashboard's teacher-informativeness panel shows: nothing before)."""
    signs = ("delta_mean_positive", "delta_mean_negative")
    records = logged_records(run_dir)
    seen = {key for record in records for key in signs if math.isfinite(record.get(key, math.nan))}
    return bool(committed_checkpoints(run_dir)) and seen == set(signs)


@contextlib.contextmanager
def straggling(cluster: RealCluster, namespace: str, pod: str) -> Iterator[None]:
    """A learner rank that stops (SIGSTOP to its pod's processes) and holds its gang meanwhile: the
    other rank waits for it in a collective (`learner.collective_timeout_s`: 30 min) and goes on
    serving its metrics. On leaving, the rank goes on (SIGCONT)."""
    pids = cluster.container_pids(namespace, pod)
    signal_processes(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_processes(pids, signal.SIGCONT)


@pytest.fixture(scope="module")
def prometheus(real_cluster: RealCluster, operator_release: str) -> Iterator[Prometheus]:
    """The chart's monitors and rules turned on (helm upgrade), and a real Prometheus inside the node's
    network that discovers the pods through the API server and scrapes them where they run."""
    cluster = real_cluster
    tools = chart_tools()
    for path in sorted((tools / "monitoring-crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for kind in ("servicemonitors", "podmonitors", "prometheusrules"):
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{kind}.monitoring.coreos.com", "--timeout=60s"
        )
    wait_until(
        lambda: all(
            cluster.kubectl("get", kind, "-A", check=False).returncode == 0
            for kind in ("servicemonitors", "podmonitors", "prometheusrules")
        ),
        "the monitoring CRDs served",
        timeout=120,
    )
    values = [arg for value in MONITORING for arg in ("--set", value)]
    cluster.helm("upgrade", "rlsd", str(cluster_chart()), "-n", "rlsd-system", "--reuse-values", *values)

    def installed(plural: str) -> list[dict[str, Any]]:
        return cluster.custom.list_namespaced_custom_object(
            "monitoring.coreos.com", "v1", "rlsd-system", plural
        )["items"]

    pki = cluster.plane.pki
    api_server = {
        "api_server": cluster.plane.internal_server,
        "tls_config": {
            "ca_file": str(pki.ca_cert),
            "cert_file": str(pki.dir / "admin.crt"),
            "key_file": str(pki.dir / "admin.key"),
        },
    }
    jobs = [job for m in installed("servicemonitors") for job in service_monitor_jobs(m)]
    jobs += [job for m in installed("podmonitors") for job in pod_monitor_jobs(m)]
    for job in jobs:
        for sd in job["kubernetes_sd_configs"]:
            sd.update(api_server)
    (rule,) = installed("prometheusrules")
    server = Prometheus.start(
        tools / "prometheus",
        cluster.workdir / "prometheus",
        9090,
        jobs,
        rule["spec"]["groups"],
        cluster.netns,
    )
    try:
        yield server
    finally:
        server.stop()


def cluster_chart() -> Path:
    from e2e_cluster import CHART

    return CHART


def test_the_charts_operator_pod_runs_as_the_chart_says(
    real_cluster: RealCluster, operator_release: str
) -> None:
    """The chart's Deployment, on a real kubelet: Ready, answering its probes, as uid 65532 with a
    read-only root filesystem (kopf's identity no longer needs a user name: the image has none)."""
    cluster = real_cluster
    pod = cluster.core.read_namespaced_pod(operator_release, "rlsd-system")
    assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
    (container,) = pod.status.container_statuses
    assert container.restart_count == 0, cluster.logs("rlsd-system", operator_release)
    assert cluster.http_get(f"http://{pod.status.pod_ip}:8080/healthz")[0] == 200
    code, metrics = cluster.http_get(f"http://{pod.status.pod_ip}:9090/metrics")
    assert code == 200 and "rlsd_operator_preemptions_total 0.0" in metrics
    (pid, *_) = cluster.container_pids("rlsd-system", operator_release)
    uids = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")
    )
    assert uids.split()[1:] == ["65532"] * 4
    written = cluster.kubectl("exec", "-n", "rlsd-system", operator_release, "--", "touch", "/x", check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr


def test_a_run_whose_dataset_is_missing_fails_with_the_trainers_message(
    real_cluster: RealCluster, operator_release: str
) -> None:
    """The operator cannot see inside the pod: the trainer finds the dataset missing, exits 3 and
    writes why to its termination log; the run fails at once (no restart) with that message, and
    the stopped learner pod stays for `kubectl logs`."""
    cluster = real_cluster
    with cluster.namespace("missing-dataset", RESTRICTED) as namespace:
        claim = "checkpoints"
        cluster.core.create_persistent_volume(cluster.node.local_volume(namespace, (namespace, claim)))
        try:
            cluster.core.create_namespaced_persistent_volume_claim(
                namespace,
                {
                    "metadata": {"name": claim},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "",
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                },
            )
            spec = quickstart_spec()
            spec["dataset"]["eval"] = {
                "kind": "jsonl",
                "path": "/data/eval.jsonl",
                "questionField": "q",
                "answerField": "a",
            }
            spec["learner"]["nodes"] = 1
            spec["rollout"] = {"backend": "local", "promptsPerStep": 2}
            spec["teacher"] = {"placement": "colocated"}
            spec["checkpoint"]["volume"] = {"claimName": claim}
            run = {
                "apiVersion": "rlsd.io/v1alpha1",
                "kind": "RLSDRun",
                "metadata": {"name": "missing"},
                "spec": spec,
            }
            cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(run))
            status = cluster.wait_status(
                namespace, "missing", "Failed", lambda s: s.get("phase") == "Failed", timeout=600
            )
            assert "exit code 3" in status["message"], status
            assert "/data/eval.jsonl: no such file; check data.eval.path" in status["message"], status
            assert not status.get("restarts") and status.get("attempt") == 1, status
            pod = cluster.core.read_namespaced_pod("missing-learner-a1-0", namespace)
            terminated = pod.status.container_statuses[0].state.terminated
            assert terminated.exit_code == EXIT_BAD_CONFIG
            assert terminated.message.startswith("/data/eval.jsonl: no such file"), terminated.message
            assert "error: /data/eval.jsonl: no such file" in cluster.logs(namespace, pod.metadata.name)
        finally:
            cluster.core.delete_persistent_volume(namespace)


def test_the_quickstart_trains_to_the_end_through_a_preemption_and_a_lost_rollout_server(
    real_cluster: RealCluster, operator_release: str, prometheus: Prometheus
) -> None:
    cluster = real_cluster
    spec = quickstart_spec()
    steps = spec["steps"]
    with cluster.namespace(RUN, RESTRICTED) as namespace:
        volume = cluster.node.volumes / RUN
        volume.mkdir()
        cluster.kubectl("apply", "-f", "-", "-n", namespace, stdin=volume_manifest(volume))
        applied = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLES / "quickstart-cpu.yaml"))
        run_dir = volume / RUN

        # The gang held by a straggling rank once it has a checkpoint and steps with signal: 24 steps take
        # 15 s on an idle machine, less than what follows, which needs the run alive.
        wait_until(lambda: ready_to_hold(run_dir), "a checkpoint and steps with signal", timeout=900)
        checkpointed_s = time.monotonic() - applied
        with straggling(cluster, namespace, "quickstart-learner-a1-1"):
            assert max(logged_steps(run_dir)) < steps, "the run ended before its gang could be held"

            # Progress in the status, read by the operator from the real learner rank 0.
            status = cluster.wait_status(
                namespace, RUN, "step 1 and a checkpoint in the status",
                lambda s: s.get("step", 0) >= 1 and s.get("latestCheckpointStep", 0) >= 1,
                timeout=120,
            )  # fmt: skip
            shown = columns(cluster, namespace)
            print("\n" + cluster.kubectl("get", "rlsd", RUN, "-n", namespace).stdout)
            assert int(shown["STEP"]) >= 1 and shown["PHASE"] == "Running", shown
            assert 0.0 <= float(shown["REWARD"]) <= 1.0, shown

            # Every pod of the run as Pod Security "restricted" wants it, applied by runc.
            for pod in ("quickstart-learner-a1-0", "quickstart-rollout-1"):
                uid = cluster.kubectl("exec", "-n", namespace, pod, "--", "id", "-u").stdout.strip()
                assert uid == str(security.RUN_AS_USER)
                written = cluster.kubectl("exec", "-n", namespace, pod, "--", "touch", "/x", check=False)
                assert "Read-only file system" in written.stderr, written

            # Another tenant's pod reaches the run's servers (no CNI here enforces the run's
            # NetworkPolicy) and may read /health and /metrics, but steers nothing without the run's token.
            policy = cluster.kubectl("get", "networkpolicy", "-n", namespace, "quickstart-netpol")
            assert policy.returncode == 0, policy
            answers = intruder_answers(
                cluster, f"http://quickstart-rollout-1.quickstart-rollout.{namespace}.svc:8000"
            )
            expected = {"GET /health": 200, "GET /metrics": 200, **dict.fromkeys(GUARDED, 401)}
            assert answers == expected, answers

            # The dashboard's panels answer for the run from the real pods' metrics.
            check_dashboard(prometheus, namespace)

            # A rollout server wedged from here on (SIGSTOP, as a vLLM engine core stuck in a transfer):
            # the learners leave it out, and the kubelet's liveness probe gives up on it (checked below).
            wedged = cluster.core.read_namespaced_pod("quickstart-rollout-1", namespace).metadata.uid
            signal_processes(cluster.container_pids(namespace, "quickstart-rollout-1"), signal.SIGSTOP)

            # Preemption for real: a learner pod evicted once a checkpoint is on the claim (its SIGTERM
            # waits for the rank to go on, as it does when the hold ends).
            checkpoint = status["latestCheckpointStep"]
            evict(cluster, namespace, "quickstart-learner-a1-1")
        status = cluster.wait_status(
            namespace, RUN, "attempt 2 running",
            lambda s: s.get("attempt") == 2 and s.get("phase") == "Running" and s.get("attemptLaunched"),
            timeout=600,
        )  # fmt: skip
        assert status["preemptions"] == 1 and not status.get("restarts"), status
        resumed = wait_until(
            lambda: re.search(
                r"resumed from \S+ \(step (\d+)\)", cluster.logs(namespace, "quickstart-learner-a2-0")
            ),
            "attempt 2 resuming from a checkpoint",
            timeout=600,
        )
        resumed_step = int(resumed.group(1))
        assert resumed_step >= checkpoint, (resumed_step, checkpoint)

        with straggling(cluster, namespace, "quickstart-learner-a2-1"):
            assert max(logged_steps(run_dir)) < steps, "the run ended before its gang could be held again"

            # A rollout server pod lost: recreated alone, under the same name; the learners go on without it.
            pods = cluster.pods(namespace)
            kept = {name: pods[name].metadata.uid for name in ("quickstart-teacher-0",)}
            lost = pods["quickstart-rollout-0"].metadata.uid
            cluster.core.delete_namespaced_pod("quickstart-rollout-0", namespace)

            def recreated() -> bool:
                pod = cluster.pods(namespace).get("quickstart-rollout-0")
                return bool(pod and pod.metadata.uid != lost and pod.status.phase == "Running")

            wait_until(recreated, "the rollout server recreated", timeout=300)
            pods = cluster.pods(namespace)
            assert {name: pods[name].metadata.uid for name in kept} == kept

            # RLSDRolloutServerDown: a server whose process stops answering while its pod stays Running.
            check_rollout_server_down(cluster, prometheus, namespace, "quickstart-rollout-0")
            check_wedged_server_replaced(cluster, namespace, "quickstart-rollout-1", wedged)

        status = cluster.wait_status(
            namespace, RUN, "Succeeded", lambda s: s.get("phase") == "Succeeded", timeout=900
        )
        succeeded_s = time.monotonic() - applied
        print(cluster.kubectl("get", "rlsd", RUN, "-n", namespace).stdout)
        # A restart's cause is in the LearnerFailed event (the failed pods are gone by now).
        assert status["preemptions"] == 1 and not status.get("restarts"), cluster.diagnostics(namespace)
        assert status["step"] == steps, status

        # What the run left on the claim, written by the pods' user and group (fsGroup).
        assert (run_dir / "final-policy" / "model.safetensors").is_file()
        assert committed_checkpoints(run_dir)[-1] == steps
        logged = logged_steps(run_dir)
        assert sorted(set(logged)) == list(range(1, steps + 1)), logged
        # Attempt 2 went on from its checkpoint: no step before it was trained twice.
        assert logged[logged.index(resumed_step + 1) :] == list(range(resumed_step + 1, steps + 1)), logged
        info = os.stat(run_dir / "final-policy" / "model.safetensors")
        assert (info.st_uid, info.st_gid) == (security.RUN_AS_USER, security.RUN_AS_GROUP)
        assert os.stat(volume).st_mode & stat.S_ISGID  # the kubelet gave the volume to the pods' group

        operator = cluster.core.read_namespaced_pod(operator_release, "rlsd-system")
        assert operator.status.container_statuses[0].restart_count == 0

        # The run's token is nowhere but in its Secret: not in the status, the events or a log.
        secret = cluster.core.read_namespaced_secret("quickstart-run-token", namespace)
        token = base64.b64decode(secret.data["token"]).decode()
        assert secret.metadata.owner_references[0].name == RUN and len(token) >= 32
        seen = [
            json.dumps(status),
            cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
            cluster.logs("rlsd-system", operator_release),
            *(cluster.logs(namespace, pod) for pod in cluster.pods(namespace)),
        ]
        assert not [text for text in seen if token in text]
        timings = f"apply -> first checkpoint {checkpointed_s:.0f} s, apply -> Succeeded {succeeded_s:.0f} s"
        print(f"\nquickstart: {timings}")


# What another tenant's pod tries on a run's server: the routes that read or change the run's state.
GUARDED = (
    "GET /weight_info",
    "GET /v1/models",
    "POST /v1/completions",
    "POST /pause?mode=wait",
    "POST /init_weight_transfer_engine",
    "POST /update_weight_version",
    "POST /collective_rpc",
)
INTRUDER = """
import json, sys, urllib.request, urllib.error
answers = {}
for call in sys.argv[2:]:
    method, path = call.split(" ", 1)
    body, headers = (b"{}" if method == "POST" else None), {"Content-Type": "application/json"}
    request = urllib.request.Request(sys.argv[1] + path, body, headers, method=method)
    try:
        answers[call] = urllib.request.urlopen(request, timeout=20).status
    except urllib.error.HTTPError as error:
        answers[call] = error.code
print(json.dumps(answers))
"""


def intruder_answers(cluster: RealCluster, server: str) -> dict[str, int]:
    """What a pod of another namespace (restricted, the trainer image) gets from `server`."""
    with cluster.namespace("another-team", RESTRICTED) as namespace:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "curious"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 1000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "curious",
                        "image": "rlsd/trainer:cpu",
                        "command": [
                            "python",
                            "-c",
                            INTRUDER,
                            server,
                            "GET /health",
                            "GET /metrics",
                            *GUARDED,
                        ],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        cluster.core.create_namespaced_pod(namespace, pod)
        wait_until(
            lambda: (
                cluster.core.read_namespaced_pod("curious", namespace).status.phase in ("Succeeded", "Failed")
            ),
            "the other team's pod to finish",
            timeout=300,
        )
        return json.loads(cluster.logs(namespace, "curious").strip().splitlines()[-1])


def check_dashboard(prometheus: Prometheus, namespace: str) -> None:
    """Every panel target of the chart's dashboard (but vLLM's own, which only a GPU run exports),
    variables set to the run, answers with data of the expected shape."""
    variables = {"namespace": namespace, "run": RUN}
    targets = [
        (panel["title"], target) for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]

    def all_answer() -> bool:
        failures = {}
        for title, target in targets:
            if VLLM.search(target["expr"]):
                continue
            if problems := query_problems(prometheus, target["expr"], target["legendFormat"], variables):
                failures[f"{title} / {target['refId']}"] = problems
        assert not failures, json.dumps(failures, indent=1)
        return True

    wait_until(
        all_answer, "every dashboard panel to answer for the run", timeout=180, retry_on=(AssertionError,)
    )


def check_wedged_server_replaced(cluster: RealCluster, namespace: str, pod: str, wedged: str) -> None:
    """The server whose processes were stopped (`wedged`: its pod's uid) and left so: the liveness
    probe, which asks the engine for /weight_info, gave up after the sample's weight_push_timeout_s,
    the kubelet killed the container and the operator replaced the pod under its name (what the
    events keep: the run may have ended since, and its servers with it)."""

    def events() -> list[tuple[str, str, str, str]]:
        items = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return [
            (e["involvedObject"].get("kind"), e["involvedObject"].get("uid") or "", e["reason"], e["message"])
            for e in items
        ]

    def recreated() -> list[tuple[str, str, str, str]]:
        seen = events()
        assert any(e[2] == "ServerRecreated" and f"recreated {pod} " in e[3] for e in seen), seen
        return seen

    seen = wait_until(
        recreated, f"{pod} replaced after failing its liveness probe", timeout=600, retry_on=(AssertionError,)
    )
    # The kubelet's own record: its Unhealthy events for a pod are rate-limited (a loaded machine's
    # startup and readiness failures can use them up), its log is not.
    kubelet = (cluster.plane.logdir / "kubelet.log").read_text()
    assert re.search(f'"Probe failed" probeType="Liveness" [^\n]*podUID="{wedged}"', kubelet), wedged
    assert any(r == "ServerLost" and m.startswith(f"{pod} stopped (Failed)") for _, _, r, m in seen), seen


def signal_processes(pids: list[int], signum: int) -> None:
    """`signum` to each of a container's processes that still runs. They include the kubelet's exec
    probes, which end on their own: a liveness probe caught by SIGSTOP is killed at its timeout (a
    loaded run's SIGCONT then met ProcessLookupError)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def check_rollout_server_down(cluster: RealCluster, prometheus: Prometheus, namespace: str, pod: str) -> None:
    """SIGSTOP the server's processes: its pod stays Running, its scrapes fail, the alert goes pending
    then firing for that pod; SIGCONT: it resolves."""

    def states() -> list[str]:
        return [
            alert["state"]
            for alert in prometheus.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == "RLSDRolloutServerDown" and alert["labels"].get("pod") == pod
        ]

    up = f'up{{job="rlsd-rollout", namespace="{namespace}", pod="{pod}"}}'
    wait_until(
        lambda: [r["value"][1] for r in prometheus.api("query", query=up)["result"]] == ["1"],
        f"{pod} scraped",
        timeout=120,
    )
    pids = cluster.container_pids(namespace, pod)
    seen: list[str] = []
    signal_processes(pids, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while "firing" not in seen and time.monotonic() < deadline:
            for state in states():
                if state not in seen:
                    seen.append(state)
            time.sleep(0.5)
        assert "firing" in seen, seen
        # It was pending first (for `for:`), whether or not a poll fell into that window.
        pending = f'ALERTS{{alertname="RLSDRolloutServerDown", alertstate="pending", pod="{pod}"}}'
        assert prometheus.api("query", query=f"count_over_time({pending}[5m])")["result"], seen
        assert cluster.core.read_namespaced_pod(pod, namespace).status.phase == "Running"
    finally:
        signal_processes(pids, signal.SIGCONT)
    wait_until(lambda: not states(), "RLSDRolloutServerDown to resolve", timeout=120)
