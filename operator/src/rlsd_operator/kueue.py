"""What the operator knows of Kueue's plain-Pod-group integration (Kueue v0.17; pure, no I/O).

A run with a queue (`spec.queueName`, or the `kueue.x-k8s.io/queue-name` label on the run as users
write it on Jobs, or the operator's default queue) puts the pods of each learner attempt into one
Kueue pod group: the attempt's learners plus the rollout/teacher servers they need. Kueue's webhook
gates every pod of the group (`kueue.x-k8s.io/admission`) and its controller ungates them all once
it admits the group's Workload (named after the group), all or nothing. See operator/README.md,
"Queueing with Kueue", for why the groups are cut this way.

Labels and annotations as Kueue reads them (sigs.k8s.io/kueue pkg/controller/constants and
pkg/controller/jobs/pod/constants); tests/operator/test_kueue.py runs them against a real Kueue.
"""

from __future__ import annotations

from typing import Any

from rlsd_operator import names

Object = dict[str, Any]

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A WorkloadPriorityClass for the run's Workloads (copied from the run to its pods, as on Jobs).
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
GROUP_NAME_LABEL = "kueue.x-k8s.io/pod-group-name"
GROUP_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
# "false": the group is finished once none of its pods is pending or running, so Kueue releases
# its quota and its pod finalizers when an attempt ends, whoever ended it (a gang restart, suspend,
# the run's deletion by the garbage collector); a retriable group would hold both until replaced.
RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
# Set by Kueue's webhook on the pods it manages; the gate it adds until the group is admitted.
MANAGED_LABEL = "kueue.x-k8s.io/managed"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
# The pod condition Kueue sets on the pods it stops (eviction, preemption), before deleting them.
TERMINATION_TARGET = "TerminationTarget"


def queue_name(run: Object, default: str = "") -> str:
    """The LocalQueue of the run: `spec.queueName`, else the run's queue-name label, else `default`
    (the operator's setting); empty: the run is not queued."""
    labels = run["metadata"].get("labels") or {}
    return run["spec"].get("queueName") or labels.get(QUEUE_LABEL) or default


def group_name(run: str, uid: str, attempt: int) -> str:
    """The pod group (and Workload) of one learner attempt: a label value and a valid object name,
    distinct per attempt and per run object (a run deleted and created again under the same name
    never joins the old run's Workload while the garbage collector is still removing it)."""
    suffix = f"-{uid.replace('-', '')[:6]}-a{attempt}"
    return names.stem(run)[: names.DNS_LABEL - len(suffix)].rstrip("-") + suffix


def grouped(pod: Object, run: Object, queue: str, group: str, total: int) -> Object:
    """`pod` as a member of pod group `group` of `total` pods in LocalQueue `queue` (a new dict)."""
    metadata = pod["metadata"]
    labels = {**metadata["labels"], QUEUE_LABEL: queue, GROUP_NAME_LABEL: group}
    priority = (run["metadata"].get("labels") or {}).get(PRIORITY_CLASS_LABEL)
    if priority:
        labels[PRIORITY_CLASS_LABEL] = priority
    annotations = {
        **(metadata.get("annotations") or {}),
        GROUP_TOTAL_COUNT_ANNOTATION: str(total),
        RETRIABLE_ANNOTATION: "false",
    }
    return {**pod, "metadata": {**metadata, "labels": labels, "annotations": annotations}}


def group_of(pod: Object) -> str | None:
    return (pod["metadata"].get("labels") or {}).get(GROUP_NAME_LABEL)


def gated(pod: Object) -> bool:
    """Whether Kueue still holds the pod back (its group is not admitted)."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return any(gate.get("name") == ADMISSION_GATE for gate in gates)


def managed(pod: Object) -> bool:
    """Whether Kueue's webhook took the pod (it labels the pods it queues)."""
    return (pod["metadata"].get("labels") or {}).get(MANAGED_LABEL) == "true"


def holds_quota_slot(pod: Object) -> bool:
    """Whether Kueue counts the pod as present in its group (its isPodRunnableOrSucceeded): not
    Failed, and not deleted before it was scheduled. A replacement created while the pod it replaces
    still counts is an excess pod, which Kueue deletes."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") and not (pod.get("spec") or {}).get("nodeName"):
        return False
    return status.get("phase") != "Failed"


def _condition(workload: Object, kind: str) -> Object:
    conditions = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def admitted(workload: Object | None) -> bool:
    """Whether Kueue admitted the Workload (a replacement pod of an admitted group is ungated at once)."""
    return workload is not None and _condition(workload, "Admitted").get("status") == "True"


def waiting_reason(workload: Object | None, queue: str, group: str) -> tuple[str, str]:
    """(reason, message) of a group Kueue has not admitted, in Kueue's words where it has some."""
    where = f"Kueue LocalQueue {queue!r}"
    if workload is None:
        return "WaitingForWorkload", f"queued in {where}: waiting for Kueue to create Workload {group}"
    for kind in ("Evicted", "QuotaReserved", "Admitted"):
        condition = _condition(workload, kind)
        wanted = "True" if kind == "Evicted" else "False"
        if condition.get("status") == wanted and condition.get("message"):
            reason = condition.get("reason") or kind
            return reason, f"queued in {where} (Workload {group}): {condition['message']}"
    return "Pending", f"queued in {where} (Workload {group})"


def admitted_message(workload: Object | None, queue: str, group: str) -> str:
    cluster_queue = ((workload or {}).get("status") or {}).get("admission", {}).get("clusterQueue")
    where = f"LocalQueue {queue!r}"
    if cluster_queue:
        where = f"ClusterQueue {cluster_queue!r} via {where}"
    return f"Workload {group} admitted by Kueue ({where})"


def summary(workload: Object) -> Object:
    """The part of a Workload the operator keeps (its admission and conditions)."""
    status = workload.get("status") or {}
    return {
        "metadata": {k: workload["metadata"].get(k) for k in ("name", "namespace", "uid")},
        "status": {
            "conditions": status.get("conditions") or [],
            "admission": {"clusterQueue": (status.get("admission") or {}).get("clusterQueue")},
        },
    }
