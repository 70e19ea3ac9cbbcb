"""One operator, hostile runs beside healthy ones, on the real control plane: the hostile runs are
refused or served without starving the others. The healthy runs reach Running, /healthz answers
every probe within the chart's liveness timeout, and the log has no error and no traceback.

The operator runs as its console script (its own process, as in the chart's Deployment)."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from controlplane import wait_until
from kubernetes import client
from operator_runner import OperatorProcess
from rlsdrun_samples import run_manifest

from rlsd_operator import names

pytestmark = pytest.mark.k8s
HEALTHY = 8
# The chart's liveness probe: timeoutSeconds 5 (values.yaml operator.livenessProbe).
PROBE_TIMEOUT = 5.0
LARGEST_ROLE = 512


class Probe(threading.Thread):
    """GETs /healthz every `period` seconds; records each failure (error or timeout)."""

    def __init__(self, url: str, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.answered = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.period):
            try:
                with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT) as response:
                    assert response.status == 200
                self.answered += 1
            except Exception as exc:
                self.failures.append(repr(exc))


def small(name: str, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    """A run of one CPU learner and `replicas` CPU rollout servers (no GPUs) on the kwok nodes."""
    manifest = run_manifest(name, {"learner": {"nodes": 1, "nprocPerNode": 1}, **spec})
    manifest["spec"]["learner"]["resources"] = {}
    manifest["spec"]["rollout"] = {**manifest["spec"]["rollout"], "backend": "cpu", "replicas": replicas}
    manifest["spec"]["rollout"]["resources"] = {}
    return manifest


def test_hostile_runs_do_not_starve_healthy_ones(
    kubeconfig: Path, api_client: client.ApiClient, namespace: str, checkpoint_claim: str, rlsd_crd: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)

    def apply(manifest: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.PLURAL, manifest)

    def status(name: str) -> dict[str, Any]:
        run = custom.get_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.PLURAL, name)
        return run.get("status") or {}

    def refusals_of_both() -> list[Any]:
        """The InvalidSpec events, once both refused runs have theirs (else none)."""
        events = core.list_namespaced_event(namespace, field_selector="reason=InvalidSpec").items
        return events if len({e.involved_object.name for e in events}) == 2 else []

    unscheduled = {"schedulerName": "rlsd-test-none"}  # no scheduler picks these pods up
    hostile = {
        # The largest role the CRD allows: 512 rollout servers (their pods stay Pending).
        "huge": small("huge", LARGEST_ROLE, scheduling=unscheduled),
        # A ConfigMap the API server could not store (spec + rendered config > 1 MiB).
        "too-large": small(
            "too-large", trainerConfig={"teacher": {"template": "{question}{reference}" + "x" * 700_000}}
        ),
        # A typo the trainer's schema refuses.
        "typo": small("typo", trainerConfig={"algorithm": {"gruop_size": 4}}),
    }
    # Watching this namespace only: runs other tests left in namespaces being deleted are no concern.
    with OperatorProcess(kubeconfig, tmp_path / "operator.log", namespaces=(namespace,)) as operator:
        probe = Probe(operator.healthz)
        probe.start()
        try:
            for manifest in hostile.values():
                apply(manifest)
            healthy = [f"ok-{i}" for i in range(HEALTHY)]
            for name in healthy:
                apply(small(name))

            for name in ("too-large", "typo"):
                failed = wait_until(
                    lambda n=name: status(n).get("phase") == "Failed" and status(n), f"{name} Failed"
                )
                reasons = [c["reason"] for c in failed["conditions"] if c["type"] == "Failed"]
                assert reasons == ["InvalidSpec"], failed
            assert "1048576" in status("too-large")["message"]
            assert "gruop_size" in status("typo")["message"]
            # kopf posts events in the background, after the status: wait for both refusals' events.
            refusals = wait_until(refusals_of_both, "the InvalidSpec events of both refused runs")
            for name in healthy:
                wait_until(lambda n=name: status(n).get("phase") == "Running", f"{name} Running", timeout=180)

            def huge_pods() -> int:
                selector = f"{names.LABEL_RUN}=huge"
                return len(core.list_namespaced_pod(namespace, label_selector=selector).items)

            wait_until(lambda: huge_pods() == LARGEST_ROLE + 1, "every pod of the huge run", timeout=300)
            assert status("huge")["phase"] in ("Pending", "Initializing")
            time.sleep(1.0)
        finally:
            probe.stopping.set()
            probe.join()
        lines = operator.lines()
    assert probe.answered > 10 and not probe.failures, probe.failures
    assert {e.involved_object.name for e in refusals} == {"too-large", "typo"}
    assert all(e.type == "Warning" for e in refusals)
    errors = [line for line in lines if "Traceback" in line or " ERROR " in line or "[ERROR" in line]
    assert not errors, "\n".join(lines[-60:])
    assert any("huge" in line for line in lines) and len(lines) < 200, "\n".join(lines[-60:])
