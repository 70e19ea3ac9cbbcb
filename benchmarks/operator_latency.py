"""Operator latency benchmark: how soon the operator turns an applied RLSDRun into pods, and a
preempted learner gang into the next attempt's pods, on a real API server with kwok GPU nodes.

What is measured
    The control plane of the operator tests (`tests/k8s/controlplane.py`, imported, not copied:
    etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok with fake 8-GPU nodes) and
    the operator as its console script, `rlsd-operator`, in a subprocess with the admin's kubeconfig
    (its own Python process, as in the chart's Deployment; nothing of it is patched). Every run is a
    small valid RLSDRun from `tests/operator/rlsdrun_samples.py` (default 2 learner pods x 4 GPUs
    and 2 vLLM rollout pods). The operator scrapes learner rank 0 at its pod's address, where nothing
    listens on a kwok node: those scrapes fail in the background, as a wedged learner's would, and
    never hold a reconcile up. Runs go one at a time; each is deleted, and its pods gone, before
    the next is applied. This process watches pods and runs (one watch each, raw JSON) and stamps
    every event with `time.perf_counter()` as it arrives.

    1. create: from the create call returning to the moment every expected pod of the run exists
       (`<run>-learner-a1-<rank>`, `<run>-rollout-<i>`), is bound by the scheduler, is Running (kwok),
       and to the run's phase Running (the operator saw them all run).
    2. preemption: once the run is Running (and `--settle` seconds of quiet), one learner (rank 1)
       is preempted, in one of two ways:
         disruption-target  the `DisruptionTarget` condition (reason PreemptionByScheduler, with a
                            lastTransitionTime) is patched onto the still-running pod, as the
                            scheduler's preemption or the taint manager does;
         deletion           the pod is deleted (kubectl delete, a drain without PDB, a spot reclaim
                            that deletes the pod).
       and with one of two kinds of "kubelet":
         kubelet            the old learners carry a finalizer of this benchmark, so a deleted one
                            stays, with its deletionTimestamp, until this process plays the kubelet:
                            as soon as it sees the deletion it patches the pod's status to Failed with
                            exit code 75 (preempted after saving a checkpoint; a real learner takes
                            up to preemptionGraceSeconds for that, here no time at all) and removes
                            the finalizer. This is the path where the operator waits for the old gang
                            to stop (operator/README.md: a gang restart starts the next attempt only
                            once every old learner stopped);
         kwok               kwok's own behaviour: a pod with a deletionTimestamp is deleted at once
                            (grace 0), so an old learner stops the moment it is deleted.
       The moments: `stopped` = the last old learner seen terminated or gone; `created` = every
       learner pod of attempt 2 exists; `running` = all of them Running; `phase` = the run's phase
       Running again. Reported: stopped -> created (the operator's own restart latency), and end to
       end from the preempting call's return.

    3. burst (after the runs above, on the same operator): `--burst` runs (default 200; 1 learner
       and 1 vLLM pod each, no GPUs) created at once from 16 threads; for each run, from its create
       call returning (and from the burst's start) to both its pods existing, and to its phase
       Running. Once all run, the learners of `--burst-preempt` of them (default 50) are deleted at
       once (kwok removes a deleted pod at once): from each delete call returning to attempt 2's
       learner pod existing. Targets on 2 cores: all pods of a run exist p99 <= 10 s after the
       burst's start, replacement p99 <= 5 s. Then the operator's peak RSS (VmHWM, target <= 300
       MiB) and its log's ERROR and traceback lines (target 0).

    Before the timed runs, `--warmup` runs (not counted) warm up the operator and the watches.
    Every latency is counted from the moment the create / preempting call returned; a reaction the
    watches saw while a slow call was still returning counts negative. p99 is the nearest-rank
    percentile: with fewer than 100 samples it is the largest one.

Output: a table on stdout, `benchmarks/results/operator_latency.json` (figures, every sample, the
operator's reconcile counts and durations from its /metrics, load averages at start and end) and
`operator_latency.png` (CDFs of both latencies).

    make bench-operator                                                  # 60 runs + the burst, ~5 minutes
    .venv/bin/python benchmarks/operator_latency.py --runs 4 --warmup 1 --burst 20 --burst-preempt 5
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
WORK = ROOT / "runs/bench/operator-latency"
# The control-plane harness of the operator tests and their sample runs.
sys.path[:0] = [str(ROOT / "tests/k8s"), str(ROOT / "tests/operator")]
import kopf  # noqa: E402
import kubernetes  # noqa: E402
import yaml  # noqa: E402
from controlplane import ControlPlane, build_assets, terminated_status, wait_until  # noqa: E402
from kubernetes import client, watch  # noqa: E402
from operator_runner import OperatorProcess  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from rlsdrun_samples import run_manifest  # noqa: E402

from rlsd_contracts import wire  # noqa: E402
from rlsd_operator import names  # noqa: E402

Object = dict[str, Any]
KINDS = ("disruption-target", "deletion")
STOPS = ("kubelet", "kwok")
FINALIZER = "benchmarks.rlsd.io/kubelet"
EXIT_PREEMPTED = 75
WAIT_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="timed runs: one create and one preemption each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--learners", type=int, default=2, help="learner pods per run (4 GPUs each)")
    parser.add_argument("--rollouts", type=int, default=2, help="rollout pods per run (1 GPU each)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="how to preempt")
    parser.add_argument("--stops", nargs="+", choices=STOPS, default=list(STOPS), help="who stops learners")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of quiet before a preemption")
    parser.add_argument("--gpu-nodes", type=int, default=3, help="kwok nodes with 8 GPUs each")
    parser.add_argument("--burst", type=int, default=200, help="runs created at once (0 skips the burst)")
    parser.add_argument("--burst-preempt", type=int, default=50, help="learners of the burst deleted at once")
    parser.add_argument("--work-dir", type=Path, default=WORK, help="control-plane and operator logs")
    parser.add_argument("--out", type=Path, default=RESULTS / "operator_latency.json")
    parser.add_argument("--plot", default=str(RESULTS / "operator_latency.png"), help="PNG ('' skips)")
    return parser


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def summary(values: list[float]) -> dict[str, float]:
    """Figures of the samples; a moment never seen (NaN) is counted in `missing` and left out."""
    missing = sum(1 for value in values if math.isnan(value))
    values = [value for value in values if not math.isnan(value)]
    return {
        "n": len(values),
        **({"missing": missing} if missing else {}),
        "p50": round(percentile(values, 50), 4),
        "p99": round(percentile(values, 99), 4),
        "mean": round(statistics.fmean(values), 4) if values else float("nan"),
        "max": round(max(values), 4) if values else float("nan"),
    }


# -- what the watches saw ---------------------------------------------------------------------------


class Timeline:
    """First-seen moments (perf_counter) of pod states and run phases, from the watch streams."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pods: dict[str, dict[str, float]] = {}  # pod name -> mark -> first seen
        self.live: dict[str, Object] = {}  # pod name -> latest object
        self.phases: dict[str, list[tuple[float, str]]] = {}  # run name -> (seen, phase) on change

    def on_pod(self, kind: str, pod: Object, now: float) -> None:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        marks = ["exists"]
        if (pod.get("spec") or {}).get("nodeName"):
            marks.append("scheduled")
        if status.get("phase") == "Running":
            marks.append("running")
        if pod["metadata"].get("deletionTimestamp"):
            marks.append("deleting")
        if status.get("phase") in ("Succeeded", "Failed"):
            marks.append("stopped")
        if kind == "DELETED":
            marks.append("gone")
        with self.cond:
            seen = self.pods.setdefault(name, {})
            for mark in marks:
                seen.setdefault(mark, now)
            if kind == "DELETED":
                self.live.pop(name, None)
            else:
                self.live[name] = pod
            self.cond.notify_all()

    def on_run(self, kind: str, run: Object, now: float) -> None:
        phase = (run.get("status") or {}).get("phase")
        with self.cond:
            history = self.phases.setdefault(run["metadata"]["name"], [])
            if phase and (not history or history[-1][1] != phase):
                history.append((now, phase))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
        with self.cond:
            result = self.cond.wait_for(predicate, timeout)
        if not result:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        return result

    # Call these with `cond` held (inside `wait` predicates) or after the moments are final.
    def mark(self, pod: str, *marks: str) -> float | None:
        """The first of `marks` seen for `pod` (they are alternatives, e.g. stopped or gone)."""
        seen = self.pods.get(pod, {})
        found = [seen[m] for m in marks if m in seen]
        return min(found) if found else None

    def all_marked(self, pods: list[str], *marks: str) -> float | None:
        """When the last of `pods` got one of `marks`; None while some has none."""
        moments = [self.mark(pod, *marks) for pod in pods]
        return None if any(m is None for m in moments) else max(m for m in moments if m is not None)

    def phase_after(self, run: str, phase: str, after: float) -> float | None:
        return next((t for t, p in self.phases.get(run, []) if p == phase and t > after), None)

    def run_pods(self, run: str) -> list[str]:
        return [
            n for n, p in self.live.items() if p["metadata"].get("labels", {}).get(names.LABEL_RUN) == run
        ]


class Watcher(threading.Thread):
    """One watch stream (raw JSON objects) from `resource_version` on, feeding `on_event`."""

    def __init__(self, list_fn: Callable[..., Any], args: tuple[Any, ...], on_event: Callable[..., None]):
        super().__init__(daemon=True, name=f"watch {list_fn.__name__}")
        self.list_fn, self.args, self.on_event = list_fn, args, on_event
        self.watch = watch.Watch()
        self.stopping = False
        self.error: Exception | None = None
        response = list_fn(*args, _preload_content=False)
        self.resource_version = json.loads(response.data)["metadata"]["resourceVersion"]

    def run(self) -> None:
        # The API server ends a watch after a while: watch again from the last resource version seen
        # (bookmarks keep it fresh), or the next watch asks for one already compacted away.
        try:
            while not self.stopping:
                for event in self.watch.stream(
                    self.list_fn, *self.args, resource_version=self.resource_version, deserialize=False,
                    allow_watch_bookmarks=True, timeout_seconds=300,
                ):  # fmt: skip
                    now = time.perf_counter()
                    self.resource_version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.on_event(event["type"], event["object"], now)
        except Exception as exc:  # the control plane stopping under us, or a real failure
            if not self.stopping:
                self.error = exc
                raise

    def stop(self) -> None:
        self.stopping = True
        self.watch.stop()


# -- the world around the operator ------------------------------------------------------------------


def apply_crd(api: client.ApiClient) -> None:
    """The RLSDRun CRD from the operator package, Established and served (as tests/operator do)."""
    crd = yaml.safe_load(names.CRD_PATH.read_text())
    extensions = client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(crd)

    def established() -> bool:
        status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
        return any(c.type == "Established" and c.status == "True" for c in status.conditions or [])

    wait_until(established, "the RLSDRun CRD to be Established")
    custom = client.CustomObjectsApi(api)
    wait_until(lambda: custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.PLURAL), "CRD")


def make_namespace(core: client.CoreV1Api) -> str:
    """A namespace with its default service account and a bound claim `checkpoints`."""
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    wait_until(lambda: core.read_namespaced_service_account("default", namespace), "the default SA")
    core.create_persistent_volume(
        {
            "metadata": {"name": f"{namespace}-checkpoints"},
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": f"/tmp/{namespace}-checkpoints"},
                "claimRef": {"namespace": namespace, "name": "checkpoints"},
                "storageClassName": "",
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "checkpoints"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_until(
        lambda: (
            core.read_namespaced_persistent_volume_claim("checkpoints", namespace).status.phase == "Bound"
        ),
        "the checkpoint claim to be Bound",
    )
    return namespace


def reconciles(operator: OperatorProcess) -> tuple[float, float]:
    """(count, total seconds) of `rlsd_operator_reconcile_duration_seconds` so far."""
    count = total = 0.0
    for family in text_string_to_metric_families(operator.metrics()):
        if family.name == "rlsd_operator_reconcile_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
    return count, total


# -- one run ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, api: client.ApiClient, namespace: str, timeline: Timeline, args: argparse.Namespace):
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.timeline = timeline
        self.args = args

    def create(self, name: str) -> tuple[float, dict[str, float]]:
        """Applies run `name` and waits until its pods run and its phase is Running; returns the
        moment the create call returned and the latencies (s) from it."""
        manifest = run_manifest(
            name, {"learner": {"nodes": self.args.learners}, "rollout": {"replicas": self.args.rollouts}}
        )
        called = time.perf_counter()
        self.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.PLURAL, manifest
        )
        start = time.perf_counter()
        learners = [names.learner_pod_name(name, 1, rank) for rank in range(self.args.learners)]
        servers = [names.server_pod_name(name, wire.ROLLOUT, i) for i in range(self.args.rollouts)]
        pods = [*learners, *servers]
        tl = self.timeline
        tl.wait(lambda: tl.all_marked(pods, "running"), f"{name}: {pods} Running")
        tl.wait(lambda: tl.phase_after(name, "Running", called), f"{name}: phase Running")
        with tl.cond:
            first = min(tl.mark(pod, "exists") or math.inf for pod in pods)
            moments = {
                "create_call": start - called,
                "first_pod": first - start,
                "phase_pending": (tl.phase_after(name, "Pending", called) or math.nan) - start,
                "all_pods_created": tl.all_marked(pods, "exists") - start,
                "learners_created": tl.all_marked(learners, "exists") - start,
                "all_pods_scheduled": tl.all_marked(pods, "scheduled") - start,
                "all_pods_running": tl.all_marked(pods, "running") - start,
                "phase_running": tl.phase_after(name, "Running", called) - start,
            }
        return start, moments

    def preempt(self, name: str, kind: str, stop: str) -> dict[str, float]:
        """Preempts learner rank 1 of a Running run (attempt 1); waits for attempt 2 to run."""
        old = [names.learner_pod_name(name, 1, rank) for rank in range(self.args.learners)]
        new = [names.learner_pod_name(name, 2, rank) for rank in range(self.args.learners)]
        victim = old[-1]
        if stop == "kubelet":
            for pod in old:
                self.core.patch_namespaced_pod(pod, self.namespace, {"metadata": {"finalizers": [FINALIZER]}})
        time.sleep(self.args.settle)
        called = time.perf_counter()
        if kind == "disruption-target":
            # With its transition time, or the disruption controller resets it at once as stale.
            condition = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "PreemptionByScheduler",
                "lastTransitionTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            self.core.patch_namespaced_pod_status(
                victim, self.namespace, {"status": {"conditions": [condition]}}
            )
        else:
            self.core.delete_namespaced_pod(victim, self.namespace)
        start = time.perf_counter()
        tl = self.timeline
        if stop == "kubelet":
            self.play_kubelet(old)
        tl.wait(lambda: tl.all_marked(old, "stopped", "gone"), f"{name}: {old} stopped")
        tl.wait(lambda: tl.all_marked(new, "running"), f"{name}: {new} Running")
        tl.wait(lambda: tl.phase_after(name, "Running", called), f"{name}: phase Running again")
        with tl.cond:
            # The operator's first reaction: a delete of an old learner that this process did not make.
            reacted = [tl.mark(pod, "deleting", "gone") for pod in old if kind != "deletion" or pod != victim]
            stopped = tl.all_marked(old, "stopped", "gone")
            created = tl.all_marked(new, "exists")
            return {
                "preempt_call": start - called,
                "phase_restarting": (tl.phase_after(name, "Restarting", called) or math.nan) - start,
                "operator_deletes": min(t for t in reacted if t is not None) - start,
                "old_stopped": stopped - start,
                "stopped_to_created": created - stopped,
                "stopped_to_running": tl.all_marked(new, "running") - stopped,
                "created": created - start,
                "running": tl.all_marked(new, "running") - start,
                "phase_running": tl.phase_after(name, "Running", called) - start,
            }

    def play_kubelet(self, old: list[str]) -> None:
        """As a kubelet would after SIGTERM: each deleted old learner exits 75 (checkpoint saved),
        its status says so, and the pod object goes (the finalizer that held it is removed)."""
        tl = self.timeline
        left = set(old)
        while left:
            deleted = tl.wait(
                lambda: [pod for pod in left if tl.mark(pod, "deleting", "gone") is not None],
                f"the operator to delete {sorted(left)}",
            )
            for pod in deleted:
                left.discard(pod)
                with tl.cond:
                    live = tl.live.get(pod)
                if live is None:
                    continue
                container = live["spec"]["containers"][0]
                status = terminated_status(
                    container["name"],
                    container["image"],
                    EXIT_PREEMPTED,
                    started=live["status"].get("startTime"),
                    finished=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                self.core.patch_namespaced_pod_status(pod, self.namespace, {"status": status})
                self.core.patch_namespaced_pod(pod, self.namespace, {"metadata": {"finalizers": None}})

    def burst(self, count: int, preempt: int) -> dict[str, Any]:
        """`count` runs (1 learner + 1 vLLM pod each, no GPUs) created at once from 16 threads; once
        all run, the learners of `preempt` of them deleted at once (kwok removes a deleted pod at
        once). Latencies from each run's create / delete call returning, and from the burst's start."""
        runs = [f"burst-{i:03d}" for i in range(count)]
        pods = {
            run: [names.learner_pod_name(run, 1, 0), names.server_pod_name(run, wire.ROLLOUT, 0)]
            for run in runs
        }
        tl = self.timeline

        def create(run: str) -> float:
            manifest = run_manifest(
                run, {"learner": {"nodes": 1, "nprocPerNode": 1}, "rollout": {"replicas": 1}}
            )
            manifest["spec"]["learner"]["resources"] = manifest["spec"]["rollout"]["resources"] = {}
            self.custom.create_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.PLURAL, manifest
            )
            return time.perf_counter()

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            returned = dict(zip(runs, pool.map(create, runs), strict=True))
        every_pod = [pod for run in runs for pod in pods[run]]
        tl.wait(lambda: tl.all_marked(every_pod, "exists"), f"the {len(every_pod)} pods of the burst", 600)
        tl.wait(
            lambda: all(tl.phase_after(run, "Running", start) for run in runs), "every burst run Running", 600
        )
        with tl.cond:
            exists = {run: tl.all_marked(pods[run], "exists") for run in runs}
            running = {run: tl.phase_after(run, "Running", start) for run in runs}
        created = {
            "from_create_call": summary([exists[run] - returned[run] for run in runs]),
            "from_burst_start": summary([exists[run] - start for run in runs]),
            "phase_running_from_burst_start": summary([running[run] - start for run in runs]),
            "create_calls_seconds": round(max(returned.values()) - start, 3),
        }
        print(
            f"burst: {count} runs created in {created['create_calls_seconds']:.1f} s; all pods exist p50 "
            f"{created['from_burst_start']['p50']:.2f} s, p99 {created['from_burst_start']['p99']:.2f} s "
            "after the burst's start",
            flush=True,
        )
        time.sleep(self.args.settle)
        victims = runs[:preempt]

        def delete(run: str) -> float:
            self.core.delete_namespaced_pod(names.learner_pod_name(run, 1, 0), self.namespace)
            return time.perf_counter()

        preempted_at = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            deleted = dict(zip(victims, pool.map(delete, victims), strict=True))
        replacements = {run: names.learner_pod_name(run, 2, 0) for run in victims}
        tl.wait(
            lambda: tl.all_marked(list(replacements.values()), "exists"), "every replacement learner", 600
        )
        with tl.cond:
            replaced = {run: tl.mark(pod, "exists") for run, pod in replacements.items()}
        preemption = {
            "from_delete_call": summary([replaced[run] - deleted[run] for run in victims]),
            "from_preemption_start": summary([replaced[run] - preempted_at for run in victims]),
        }
        replacement = preemption["from_delete_call"]
        print(
            f"burst: {preempt} learners deleted at once; replacement exists p50 "
            f"{replacement['p50']:.2f} s, p99 {replacement['p99']:.2f} s",
            flush=True,
        )
        samples = {
            "pods_exist_from_burst_start": [round(exists[run] - start, 4) for run in runs],
            "replacement_from_delete_call": [round(replaced[run] - deleted[run], 4) for run in victims],
        }
        return {
            "runs": count,
            "preempted": preempt,
            "created": created,
            "preemption": preemption,
            "samples": samples,
        }

    def delete(self, name: str) -> None:
        """Deletes the run and waits until the garbage collector removed all its pods."""
        self.custom.delete_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.PLURAL, name
        )
        tl = self.timeline
        tl.wait(lambda: not tl.run_pods(name), f"{name}: its pods to be gone")

    def api_round_trip(self, calls: int = 30) -> dict[str, float]:
        """Median seconds of single API calls from this process, with nothing else going on: a GET,
        a ConfigMap create, and a pod create (a pod that no scheduler picks up, deserialized into a
        V1Pod as the operator's client does)."""
        timings: dict[str, list[float]] = {"get_p50": [], "configmap_create_p50": [], "pod_create_p50": []}
        pod = {
            "metadata": {"name": ""},
            "spec": {"schedulerName": "benchmarks-none", "containers": [{"name": "c", "image": "none"}]},
        }
        calls_by_key: dict[str, Callable[[int], object]] = {
            "get_p50": lambda i: self.core.read_namespace(self.namespace),
            "configmap_create_p50": lambda i: self.core.create_namespaced_config_map(
                self.namespace, {"metadata": {"name": f"probe-{i}"}}
            ),
            "pod_create_p50": lambda i: self.core.create_namespaced_pod(
                self.namespace, {**pod, "metadata": {"name": f"probe-{i}"}}
            ),
        }
        for i in range(calls):
            for key, call in calls_by_key.items():
                t = time.perf_counter()
                call(i)
                timings[key].append(time.perf_counter() - t)
        for i in range(calls):
            self.core.delete_namespaced_config_map(f"probe-{i}", self.namespace)
            self.core.delete_namespaced_pod(f"probe-{i}", self.namespace)
        return {key: round(statistics.median(values), 4) for key, values in timings.items()}


# -- report -----------------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    def row(label: str, stats: dict[str, float], target: str = "") -> None:
        print(
            f"{label:<52} {stats['n']:>4} {stats['p50'] * 1e3:>8.0f} {stats['p99'] * 1e3:>8.0f} "
            f"{stats['max'] * 1e3:>8.0f}  {target}"
        )

    header = f"{'latency (ms)':<52} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}  target"
    print("\n" + header + "\n" + "-" * len(header))
    targets = {"all_pods_created": "p50 <= 1000"}
    for key, stats in report["create"].items():
        row(f"create -> {key}", stats, targets.get(key, ""))
    for combo, metrics in [*report["preemption"].items(), ("all preemptions", report["preemption_all"])]:
        print()
        for key, stats in metrics.items():
            target = "<= 3000" if key == "stopped_to_created" else ""
            row(f"{combo} -> {key}", stats, target)
    burst = report["burst"]
    if burst:
        print(f"\nburst of {burst['runs']} runs, then {burst['preempted']} learners deleted at once")
        row(
            "burst -> all pods of a run exist (from the start)",
            burst["created"]["from_burst_start"],
            "p99 <= 10000",
        )
        row("burst -> all pods of a run exist (from its create)", burst["created"]["from_create_call"])
        row("burst -> run Running (from the start)", burst["created"]["phase_running_from_burst_start"])
        row(
            "preempted -> replacement exists (from its delete)",
            burst["preemption"]["from_delete_call"],
            "p99 <= 5000",
        )
        row("preempted -> replacement exists (from the start)", burst["preemption"]["from_preemption_start"])
        cpu = ", ".join(f"{name} {seconds}" for name, seconds in burst["cpu_seconds"].items())
        print(f"CPU seconds during the burst: {cpu}")
    operator = report["operator"]
    print(
        f"\noperator peak RSS {operator['peak_rss_mib']:.0f} MiB (target <= 300), "
        f"{len(operator['error_lines'])} error lines (target 0) of {operator['log_lines']}"
    )
    trip = report["api_round_trip"]
    print(
        f"\noperator: {report['operator']['reconciles_per_run']:.1f} reconciles per run, "
        f"mean {report['operator']['mean_reconcile_seconds'] * 1e3:.0f} ms; one API call from this "
        f"process (p50): GET {trip['get_p50'] * 1e3:.1f} ms, ConfigMap create "
        f"{trip['configmap_create_p50'] * 1e3:.1f} ms, pod create {trip['pod_create_p50'] * 1e3:.1f} ms"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cdf(ax: Any, values: list[float], label: str | None, **style: Any) -> None:
        ordered = sorted(values)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step([ordered[0], *ordered], [0.0, *fractions], where="post", label=label, **style)

    burst = report["burst"]
    fig, axes = plt.subplots(1, 3 if burst else 2, figsize=(19 if burst else 13, 4.8))
    left, right = axes[0], axes[1]
    samples = report["samples"]
    for key in ("all_pods_created", "all_pods_running", "phase_running"):
        cdf(left, [s["create"][key] for s in samples], key.replace("_", " "))
    left.set(
        title="apply -> the run's pods (target: all created, p50 <= 1 s)",
        xlabel="seconds after the create call returned",
        ylabel="CDF",
    )
    for i, combo in enumerate(report["preemption"]):
        chosen = [s["preemption"] for s in samples if s["combo"] == combo]
        color = f"C{i}"
        cdf(right, [p["stopped_to_created"] for p in chosen], combo, color=color)
        cdf(right, [p["created"] for p in chosen], None, color=color, linestyle="--")
    right.set(
        title="preemption -> attempt 2's learner pods exist (target <= 3 s)",
        xlabel="seconds (solid: after the old learners stopped; dashed: after the preempting call)",
        ylabel="CDF",
    )
    if burst:
        samples = burst["samples"]
        cdf(axes[2], samples["pods_exist_from_burst_start"], f"{burst['runs']} runs: all pods exist")
        replaced = f"{burst['preempted']} preemptions: replacement"
        cdf(axes[2], samples["replacement_from_delete_call"], replaced)
        axes[2].axvline(10, color="C0", linestyle=":", label="targets (p99): 10 s, 5 s")
        axes[2].axvline(5, color="C1", linestyle=":")
        axes[2].set(
            title=f"burst: {burst['runs']} runs at once, then {burst['preempted']} learners deleted at once",
            xlabel="seconds (pods: after the burst's start; replacement: after its delete call)",
            ylabel="CDF",
        )
    for ax in axes:
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = load_average()
    combos = [f"{kind}/{stop}" for kind in args.kinds for stop in args.stops]
    work = args.work_dir / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average {started}; control plane and operator logs in {work}", flush=True)
    # kwok nodes hold 110 pods each: enough of them for the burst's pods.
    gpu_nodes = max(args.gpu_nodes, math.ceil(2 * args.burst / 100) + 1)
    plane = ControlPlane(build_assets(), work, gpu_nodes=gpu_nodes)
    operator: OperatorProcess | None = None
    watchers: list[Watcher] = []
    try:
        plane.start()
        with plane.api_client() as api:
            apply_crd(api)
            core = client.CoreV1Api(api)
            namespace = make_namespace(core)
            timeline = Timeline()
            custom = client.CustomObjectsApi(api)
            watchers = [
                Watcher(core.list_namespaced_pod, (namespace,), timeline.on_pod),
                Watcher(
                    custom.list_namespaced_custom_object,
                    (names.GROUP, names.VERSION, namespace, names.PLURAL),
                    timeline.on_run,
                ),
            ]
            for watcher in watchers:
                watcher.start()
            operator = OperatorProcess(plane.kubeconfig, work / "logs/rlsd-operator.log")
            bench = Bench(api, namespace, timeline, args)
            version = client.VersionApi(api).get_code().git_version
            print(f"kube-apiserver {version}, {gpu_nodes} kwok GPU nodes, rlsd-operator up", flush=True)
            for i, combo in zip(range(args.warmup), itertools.cycle(combos), strict=False):
                bench.create(f"warmup-{i}")
                bench.preempt(f"warmup-{i}", *combo.split("/"))
                bench.delete(f"warmup-{i}")
            round_trip = bench.api_round_trip()
            reconciles_before = reconciles(operator)
            samples = []
            for i, combo in zip(range(args.runs), itertools.cycle(combos), strict=False):
                name = f"lat-{i:03d}"
                kind, stop = combo.split("/")
                _, created = bench.create(name)
                preempted = bench.preempt(name, kind, stop)
                bench.delete(name)
                samples.append({"run": name, "combo": combo, "create": created, "preemption": preempted})
                print(
                    f"{name}: pods created {created['all_pods_created'] * 1e3:5.0f} ms, running "
                    f"{created['all_pods_running'] * 1e3:5.0f} ms | {combo:<26} stopped -> created "
                    f"{preempted['stopped_to_created'] * 1e3:5.0f} ms, end to end "
                    f"{preempted['created'] * 1e3:5.0f} ms",
                    flush=True,
                )
            reconciles_after = reconciles(operator)
            pids = {**plane.pids(), "rlsd-operator": operator.proc.pid, "benchmark": os.getpid()}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            burst = bench.burst(args.burst, args.burst_preempt) if args.burst else None
            if burst:
                # Where the burst's CPU went: what bounds it on 2 cores.
                burst["cpu_seconds"] = {
                    name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in pids.items()
                }
            peak_rss = operator.peak_rss_bytes()
            errors = [line for line in operator.lines() if " ERROR " in line or "Traceback" in line]
            log_lines = len(operator.lines())
            for watcher in watchers:
                if watcher.error is not None:
                    raise RuntimeError(f"{watcher.name} failed") from watcher.error
    except BaseException:
        if operator is not None:
            print(f"--- rlsd-operator log (tail) ---\n{operator.tail()}", file=sys.stderr)
        raise
    finally:
        for watcher in watchers:
            watcher.stop()
        if operator is not None:
            operator.stop()
        plane.stop()

    count = reconciles_after[0] - reconciles_before[0]
    report: dict[str, Any] = {
        "benchmark": "operator_latency",
        "environment": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "kopf": kopf.__version__,
            "kubernetes_client": kubernetes.__version__,
            "kube_apiserver": version,
            "load_average_start": started,
        },
        "config": {
            "runs": args.runs,
            "warmup": args.warmup,
            "learners": args.learners,
            "learner_gpus": 4,
            "rollouts": args.rollouts,
            "gpu_nodes": gpu_nodes,
            "burst": args.burst,
            "burst_preempt": args.burst_preempt,
            "combos": combos,
            "settle_seconds": args.settle,
            "operator": "rlsd-operator console script in a subprocess (admin kubeconfig)",
            "p99": "nearest rank (the largest sample when n < 100)",
        },
        "api_round_trip": round_trip,
        "operator": {
            "reconciles": count,
            "reconciles_per_run": count / max(len(samples), 1),
            "mean_reconcile_seconds": (reconciles_after[1] - reconciles_before[1]) / max(count, 1),
            "peak_rss_mib": round(peak_rss / 2**20, 1),
            "log_lines": log_lines,
            "error_lines": errors,
        },
        "burst": burst,
        "create": {key: summary([s["create"][key] for s in samples]) for key in samples[0]["create"]},
        "preemption": {
            combo: {
                key: summary([s["preemption"][key] for s in samples if s["combo"] == combo])
                for key in samples[0]["preemption"]
            }
            for combo in combos
            if any(s["combo"] == combo for s in samples)
        },
        "preemption_all": {
            key: summary([s["preemption"][key] for s in samples]) for key in samples[0]["preemption"]
        },
        "samples": samples,
    }
    print_table(report)
    report["environment"]["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average start {started}, end {report['environment']['load_average_end']}; wrote {args.out}")
    if args.plot:
        try:
            plot(report, Path(args.plot))
        except ImportError:  # the operator's distribution does not depend on matplotlib
            print("matplotlib is not installed: no PNG (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
