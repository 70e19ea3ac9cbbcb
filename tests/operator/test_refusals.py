"""Creates the real API server refuses: a ResourceQuota too small for the run, a missing PriorityClass,
a LimitRange and an admission webhook (a real HTTPS server the API server calls). Each surfaces within
seconds as `Ready=False` with its reason and the API server's message, one Warning event naming the
object however often the operator retries, `kubectl get rlsd` and `kubectl describe rlsd`; the run
starts by itself once the cause is gone."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from controlplane import ControlPlane, wait_until
from kubernetes import client
from rlsdrun_samples import deep_update
from test_reconcile import LEARNERS_A1, SERVERS, Cluster, start_run

from rlsd_operator import decide

pytestmark = pytest.mark.k8s
# Within seconds: the operator's reaction to a refused create, on a loaded 2-core machine.
SURFACED_SECONDS = 15


@pytest.fixture
def cluster(api_client: client.ApiClient, namespace: str, checkpoint_claim: str) -> Cluster:
    return Cluster(api_client, namespace)


def kubectl(plane: ControlPlane, *args: str) -> str:
    command = [str(plane.assets / "kubectl"), "--kubeconfig", str(plane.kubeconfig), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def wait_refused(cluster: Cluster, reason: str) -> dict[str, Any]:
    """The run's Ready condition once it carries `reason`."""
    return wait_until(
        lambda: cluster.condition("Ready").get("reason") == reason and cluster.condition("Ready"),
        f"Ready=False {reason}",
        timeout=SURFACED_SECONDS,
    )


def warnings(cluster: Cluster, reason: str) -> list[client.CoreV1Event]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"reason={reason}").items
    assert all(e.type == "Warning" and e.involved_object.name == "demo" for e in events)
    return events


def test_a_quota_too_small_keeps_the_run_pending_until_it_is_raised(
    cluster: Cluster, control_plane: ControlPlane, operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retries every 0.2-0.4 s: many of them, still one event.
    monkeypatch.setattr(decide, "REFUSAL_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(decide, "REFUSAL_RETRY_MAX_SECONDS", 0.4)
    quota = {"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "4"}}}
    cluster.core.create_namespaced_resource_quota(cluster.namespace, quota)
    wait_until(  # the quota controller has recorded it: admission checks against its status
        lambda: cluster.core.read_namespaced_resource_quota("gpus", cluster.namespace).status.hard,
        "quota status",
    )
    start_run(cluster)  # 2 learners x 4 GPUs and 2 rollout servers x 1 GPU: 10 GPUs
    condition = wait_refused(cluster, "QuotaExceeded")
    assert condition["status"] == "False" and "refused by a ResourceQuota" in condition["message"]
    assert (
        "exceeded quota: gpus" in condition["message"]
        and "limited: requests.nvidia.com/gpu=4" in condition["message"]
    )
    status = cluster.status()
    assert status["phase"] == "Pending" and status["message"] == condition["message"]
    assert not status.get("attemptLaunched")

    time.sleep(3)  # several refused retries
    (event,) = warnings(cluster, "QuotaExceeded")
    assert "exceeded quota: gpus" in event.message and "refused by a ResourceQuota" in event.message

    table = kubectl(control_plane, "get", "rlsd", "-n", cluster.namespace)
    assert table.split("\n")[0].split() == [
        "NAME", "PHASE", "STEP", "REWARD", "RESTARTS", "PREEMPTIONS", "LAG", "REASON", "AGE",
    ]  # fmt: skip
    assert table.split("\n")[1].split()[:2] == ["demo", "Pending"] and "QuotaExceeded" in table
    assert "exceeded quota: gpus" in kubectl(
        control_plane, "get", "rlsd", "-n", cluster.namespace, "-o", "wide"
    )
    described = kubectl(control_plane, "describe", "rlsd", "demo", "-n", cluster.namespace)
    conditions, events = described.split("Conditions:")[1].split("Events:")
    assert "QuotaExceeded" in conditions and "exceeded quota: gpus" in conditions
    assert "Warning  QuotaExceeded" in events

    # From now on only the quota's watch can retry in time: the timer says 10 minutes.
    monkeypatch.setattr(decide, "REFUSAL_RETRY_SECONDS", 600.0)
    monkeypatch.setattr(decide, "REFUSAL_RETRY_MAX_SECONDS", 600.0)
    time.sleep(1.5)  # one more refused retry, which schedules the next one in 10 minutes
    cluster.core.patch_namespaced_resource_quota(
        "gpus", cluster.namespace, {"spec": {"hard": {"requests.nvidia.com/gpu": "16"}}}
    )
    cluster.wait_pods_running([*LEARNERS_A1, *SERVERS], timeout=30)
    cluster.wait_phase("Running", timeout=30)
    assert cluster.condition("Ready")["status"] == "True"
    assert len(warnings(cluster, "QuotaExceeded")) == 1


class DenyingWebhook:
    """An HTTPS admission webhook on 127.0.0.1 that denies every request it is sent."""

    MESSAGE = "GPU pods need a reservation in this namespace (rlsd test webhook)"

    def __init__(self, plane: ControlPlane) -> None:
        cert, key = plane.pki.issue("webhook", "webhook", hosts=["127.0.0.1"])
        message = self.MESSAGE

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {
                        "uid": review["request"]["uid"],
                        "allowed": False,
                        "status": {"code": 403, "message": message},
                    },
                }
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/deny"
        self.ca_bundle = base64.b64encode(plane.pki.ca_cert.read_bytes()).decode()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configuration(self, name: str, namespace: str) -> dict[str, Any]:
        """A ValidatingWebhookConfiguration sending this namespace's pod creates here."""
        return {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "deny.rlsd.test",
                    "clientConfig": {"url": self.url, "caBundle": self.ca_bundle},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["pods"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 5,
                }
            ],
        }


@pytest.fixture
def webhook(control_plane: ControlPlane) -> Iterator[DenyingWebhook]:
    hook = DenyingWebhook(control_plane)
    yield hook
    hook.server.shutdown()


# A cause of refusal: set it up (registering what undoes it in `cleanups`), return the run's spec and
# what removes the cause.
Cause = Callable[
    [Cluster, DenyingWebhook, list[Callable[[], object]]], tuple[dict[str, Any], Callable[[], object]]
]


def missing_priority_class(
    cluster: Cluster, _: DenyingWebhook, cleanups: list[Callable[[], object]]
) -> tuple[dict[str, Any], Callable[[], object]]:
    name = f"rlsd-test-{uuid.uuid4().hex[:8]}"
    scheduling = client.SchedulingV1Api(cluster.core.api_client)
    cleanups.append(lambda: scheduling.delete_priority_class(name))
    return {"scheduling": {"priorityClassName": name}}, lambda: scheduling.create_priority_class(
        {"metadata": {"name": name}, "value": 1000}
    )


def limit_range(
    cluster: Cluster, _: DenyingWebhook, cleanups: list[Callable[[], object]]
) -> tuple[dict[str, Any], Callable[[], object]]:
    limits = {"metadata": {"name": "small"}, "spec": {"limits": [{"type": "Container", "max": {"cpu": "1"}}]}}
    cluster.core.create_namespaced_limit_range(cluster.namespace, limits)
    spec = {
        "learner": {"resources": {"limits": {"cpu": "2"}}},
        "rollout": {"resources": {"limits": {"cpu": "2"}}},
    }
    return spec, lambda: cluster.core.delete_namespaced_limit_range("small", cluster.namespace)


def admission_webhook(
    cluster: Cluster, hook: DenyingWebhook, cleanups: list[Callable[[], object]]
) -> tuple[dict[str, Any], Callable[[], object]]:
    name = f"rlsd-test-{cluster.namespace}"
    registration = client.AdmissionregistrationV1Api(cluster.core.api_client)
    registration.create_validating_webhook_configuration(hook.configuration(name, cluster.namespace))
    cleanups.append(lambda: registration.delete_validating_webhook_configuration(name))

    def wait_in_force() -> None:  # the API server loads a new configuration within a second or so
        probe = {"metadata": {"name": "probe"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}

        def denied() -> bool:
            try:
                cluster.core.create_namespaced_pod(cluster.namespace, probe, dry_run="All")
            except client.ApiException as exc:
                return hook.MESSAGE in (exc.body or "")
            return False

        wait_until(denied, "the webhook in force")

    wait_in_force()
    return {}, lambda: registration.delete_validating_webhook_configuration(name)


@pytest.mark.parametrize(
    ("cause", "reason", "quoted"),
    [
        (missing_priority_class, "PriorityClassNotFound", "no PriorityClass with name rlsd-test-"),
        (limit_range, "LimitRange", "maximum cpu usage per Container is 1"),
        (admission_webhook, "AdmissionWebhook", 'admission webhook "deny.rlsd.test" denied the request'),
    ],
    ids=["priority-class", "limit-range", "webhook"],
)
def test_a_refused_run_says_why_and_starts_once_the_cause_is_gone(
    cluster: Cluster,
    operator: Any,
    webhook: DenyingWebhook,
    cause: Cause,
    reason: str,
    quoted: str,
) -> None:
    cleanups: list[Callable[[], object]] = []
    try:
        spec, remove_cause = cause(cluster, webhook, cleanups)
        start_run(cluster, deep_update({"learner": {"nodes": 1}, "rollout": {"replicas": 1}}, spec))
        condition = wait_refused(cluster, reason)
        assert quoted in condition["message"] and condition["message"].startswith("Pod demo-")
        assert cluster.status()["phase"] == "Pending" and not cluster.pods(live=True).get("demo-learner-a1-0")
        time.sleep(3)  # retried every 1-2 s meanwhile
        (event,) = warnings(cluster, reason)
        assert quoted in event.message

        remove_cause()
        cluster.wait_pods_running(["demo-learner-a1-0", "demo-rollout-0"], timeout=30)
        cluster.wait_phase("Running", timeout=30)
        assert len(warnings(cluster, reason)) == 1
    finally:
        for cleanup in cleanups:
            try:
                cleanup()
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
