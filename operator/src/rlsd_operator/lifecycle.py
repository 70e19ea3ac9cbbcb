"""Pure decisions of the run life cycle: what the learner pods' state means, back-off, conditions.

The learner's exit code says what happened (rlsd_contracts.exit_codes; docs/distributed.md's
table); the operator never reads logs, only what a failed learner wrote to its termination log. A
pod that is being deleted, was evicted, lost its node or carries the `DisruptionTarget` condition
was preempted, whatever its code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from rlsd_contracts import exit_codes
from rlsd_contracts.wire import LEARNER
from rlsd_operator import kueue, names

Object = dict[str, Any]
# Pod status reasons of the kubelet and node controllers for pods killed from outside.
DISRUPTED_REASONS = {
    "Evicted",
    "NodeLost",
    "NodeShutdown",
    "Shutdown",
    "Terminated",
    "UnexpectedAdmissionError",
}
# Spec fields that apply at once; any other change waits for the next attempt of the learners.
LIVE_FIELDS = {"suspend", "ttlSecondsAfterFinished", "restartPolicy", "networkPolicy"}
# Phases that never change again.
FINISHED = {"Succeeded", "Failed"}


class Verdict(enum.Enum):
    STARTING = "starting"  # some learner not Running yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every learner exited 0
    PREEMPTED = "preempted"  # gang restart, not counted against the back-off budget
    FAILED = "failed"  # application failure: counted, back-off
    BAD_CONFIG = "bad-config"  # exit 3: Failed at once


@dataclass(frozen=True)
class GangState:
    verdict: Verdict
    message: str = ""


def _container_status(pod: Object) -> Object:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == LEARNER), statuses[0] if statuses else {})


def _terminated(pod: Object) -> Object | None:
    return (_container_status(pod).get("state") or {}).get("terminated")


def is_terminated(pod: Object) -> bool:
    """Whether the pod's containers have stopped (the pod object may still exist)."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def containers_exited(pod: Object) -> bool:
    """Whether every container of the pod has exited, phase terminal or not: a real kubelet reports
    the exit codes first and the terminal phase only once it has torn the pod's sandbox down."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    containers = (pod.get("spec") or {}).get("containers") or []
    return (
        bool(statuses)
        and len(statuses) >= len(containers)
        and all((s.get("state") or {}).get("terminated") for s in statuses)
    )


def stopped(pod: Object) -> bool:
    """Whether nothing runs in the pod any more: its containers stopped, or it was deleted before it
    was scheduled (a pod Kueue still held back, say; its object may stay a while)."""
    return is_terminated(pod) or bool(
        pod["metadata"].get("deletionTimestamp") and not (pod.get("spec") or {}).get("nodeName")
    )


def disruption(pod: Object) -> str | None:
    """Why the pod was taken away from outside (preemption, eviction, lost node, Kueue), or None."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "DisruptionTarget":
            return f"disruption target ({condition.get('reason') or 'unknown reason'})"
        if condition.get("type") == kueue.TERMINATION_TARGET:  # Kueue evicted or preempted the group
            return f"stopped by Kueue ({condition.get('reason')}): {condition.get('message') or 'no message'}"
    if status.get("reason") in DISRUPTED_REASONS:
        return f"{status['reason']}: {status.get('message') or 'no message'}"
    if pod["metadata"].get("deletionTimestamp") and not is_terminated(pod):
        return "deleted"
    if status.get("phase") == "Failed" and _terminated(pod) is None:
        return f"failed without an exit code ({status.get('reason') or 'no reason'})"
    return None


def assess_gang(pods: list[Object], nodes: int) -> GangState:
    """The state of one attempt's learner gang from its pods (`nodes` expected, one per rank)."""
    by_rank = {int(p["metadata"]["labels"][names.LABEL_RANK]): p for p in pods}
    preempted, failed, bad_config = [], [], []
    for rank in range(nodes):
        pod = by_rank.get(rank)
        if pod is None:
            preempted.append(f"learner rank {rank}: pod gone (deleted or its node was lost)")
            continue
        pod_name = pod["metadata"]["name"]
        reason = disruption(pod)
        terminated = _terminated(pod) or {}
        code = terminated.get("exitCode")
        if reason is not None:
            preempted.append(f"{pod_name}: {reason}")
        elif code in exit_codes.PREEMPTED:
            preempted.append(f"{pod_name}: exit code {code} (preempted)")
        elif code == exit_codes.EXIT_BAD_CONFIG:
            bad_config.append(f"{pod_name}: exit code 3 (bad configuration or dataset){_detail(terminated)}")
        elif code not in (None, 0):
            failed.append(
                f"{pod_name}: exit code {code} ({terminated.get('reason') or 'Error'}){_detail(terminated)}"
            )
    # A lost node makes the other ranks' collectives fail too: preemption explains those failures.
    for verdict, found in (
        (Verdict.BAD_CONFIG, bad_config),
        (Verdict.PREEMPTED, preempted),
        (Verdict.FAILED, failed),
    ):
        if found:
            return GangState(verdict, "; ".join(found))
    phases = [(by_rank[r].get("status") or {}).get("phase") for r in range(nodes)]
    if all(phase == "Succeeded" for phase in phases):
        return GangState(Verdict.SUCCEEDED, f"all {nodes} learner pods exited 0")
    if all(phase in ("Running", "Succeeded") for phase in phases):
        return GangState(Verdict.RUNNING)
    return GangState(Verdict.STARTING, f"{phases.count('Pending')} of {nodes} learner pods pending")


def _detail(terminated: Object) -> str:
    """': <the termination message>' (what the learner wrote, else its log's tail), or nothing."""
    message = (terminated.get("message") or "").strip()
    return f": {message}" if message else ""


def backoff_seconds(policy: Object, restarts: int) -> float:
    """Delay before the restart after the `restarts`-th application failure (exponential, capped)."""
    return float(min(policy["backoffSeconds"] * 2 ** max(restarts - 1, 0), policy["maxBackoffSeconds"]))


def deferred_fields(applied: Object, spec: Object) -> list[str]:
    """Dotted names of the spec fields that differ from the spec the running attempt was started with."""
    changed = []
    for key in sorted(set(applied) | set(spec)):
        if key in LIVE_FIELDS or applied.get(key) == spec.get(key):
            continue
        old, new = applied.get(key), spec.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{sub}" for sub in sorted(set(old) | set(new)) if old.get(sub) != new.get(sub)]
        else:
            changed.append(key)
    return changed


def set_condition(
    conditions: list[Object], kind: str, status: bool, reason: str, message: str, now: str
) -> list[Object]:
    """`conditions` with the one of type `kind` set; its transition time moves only when its status does."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c["type"] == kind), None)
    since = previous["lastTransitionTime"] if previous and previous["status"] == value else now
    updated = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    return [c for c in conditions if c["type"] != kind] + [updated]


def drop_condition(conditions: list[Object], kind: str) -> list[Object]:
    return [c for c in conditions if c["type"] != kind]
