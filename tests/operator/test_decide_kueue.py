"""The life cycle of a run queued by Kueue, as a table like test_decide.py: (run status, observed
pods and Workloads) -> (status, actions), no cluster. tests/operator/test_kueue.py runs the same
life cycle against a real Kueue."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_decide import LAUNCHED, NOW, T0, creates, decide_for, deletes, events, pod, run_with

import rlsd_operator.decide as decide_module
from rlsd_operator import kueue
from rlsd_operator.decide import Create, Decision, Event, Observed, References, decide, desire

Object = dict[str, Any]
GROUP_A1 = "demo-123456-a1"  # stem, the first 6 characters of the run's uid, the attempt
GROUP_A2 = "demo-123456-a2"
QUEUED = {"queueName": "team-a"}


def condition(decision: Decision, kind: str) -> Object:
    return next((c for c in decision.status.get("conditions") or [] if c["type"] == kind), {})


def created(decision: Decision) -> dict[str, Object]:
    return {a.obj["metadata"]["name"]: a.obj for a in decision.actions if isinstance(a, Create)}


def launch(run: Object) -> Decision:
    return decide(run, desire(run, "cluster.local", References()), Observed(now=NOW))


def as_admitted(pods: dict[str, Object], phase: str = "Running", gated: bool = False) -> dict[str, Object]:
    """Created pods as the API server shows them once Kueue's webhook took them: labelled managed,
    gated until their group is admitted."""
    shown = {}
    for name, obj in pods.items():
        obj = pod(obj, "Pending" if gated else phase)
        obj["metadata"]["labels"][kueue.MANAGED_LABEL] = "true"
        if gated:
            obj["spec"]["schedulingGates"] = [{"name": kueue.ADMISSION_GATE}]
        shown[name] = obj
    return shown


def workload(name: str, **conditions: tuple[str, str, str]) -> Object:
    """A Workload summary with conditions type -> (status, reason, message)."""
    return {
        "metadata": {"name": name},
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "message": message}
                for kind, (status, reason, message) in conditions.items()
            ],
            "admission": {"clusterQueue": "gpus"},
        },
    }


QUOTA = "couldn't assign flavors to pod set 1a2b3c4d: insufficient unused quota for nvidia.com/gpu"
WAITING = workload(GROUP_A1, QuotaReserved=("False", "Pending", QUOTA))
ADMITTED = workload(GROUP_A1, QuotaReserved=("True", "QuotaReserved", ""), Admitted=("True", "Admitted", ""))


def queued_run(status: Object | None = None, spec: Object | None = None) -> Object:
    return run_with(status, {**QUEUED, **(spec or {})})


def launched(run: Object, **kwargs: Any) -> dict[str, Object]:
    """The pods of the run's launch (attempt 1), as observed."""
    start = run_with({"phase": "Pending", "attempt": 1, "restartAfter": T0}, run["spec"])
    start["metadata"] = run["metadata"]
    pods = {name: obj for name, obj in created(launch(start)).items() if obj["kind"] == "Pod"}
    return as_admitted(pods, **kwargs)


def test_without_a_queue_nothing_about_kueue_is_added() -> None:
    decision = launch(run_with())
    for obj in created(decision).values():
        metadata = obj["metadata"]
        assert not [
            key for key in {**metadata["labels"], **metadata.get("annotations", {})} if "kueue" in key
        ]
    pods = {name: obj for name, obj in created(decision).items() if obj["kind"] == "Pod"}
    running = decide_for(run_with(LAUNCHED), as_admitted(pods))
    assert running.status["phase"] == "Running" and not condition(running, "Admitted")


@pytest.mark.parametrize(
    "how",
    ["spec", "label", "default"],
)
def test_a_queued_run_puts_each_attempt_and_its_servers_into_one_pod_group(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_with()
    if how == "spec":
        run["spec"]["queueName"] = "team-a"
    elif how == "label":
        run["metadata"]["labels"] = {kueue.QUEUE_LABEL: "team-a", kueue.PRIORITY_CLASS_LABEL: "high"}
    else:
        monkeypatch.setattr(decide_module, "DEFAULT_QUEUE_NAME", "team-a")
    decision = launch(run)
    pods = {name: obj for name, obj in created(decision).items() if obj["kind"] == "Pod"}
    assert sorted(pods) == [
        "demo-learner-a1-0",
        "demo-learner-a1-1",
        "demo-rollout-0-a1",
        "demo-rollout-1-a1",
    ]
    for obj in pods.values():
        labels, annotations = obj["metadata"]["labels"], obj["metadata"]["annotations"]
        assert labels[kueue.QUEUE_LABEL] == "team-a" and labels[kueue.GROUP_NAME_LABEL] == GROUP_A1
        assert annotations[kueue.GROUP_TOTAL_COUNT_ANNOTATION] == "4"  # 2 learners + 2 rollout servers
        assert annotations[kueue.RETRIABLE_ANNOTATION] == "false"
        assert (labels.get(kueue.PRIORITY_CLASS_LABEL) == "high") == (how == "label")
    # A server's DNS name (its hostname) is the same as without Kueue.
    assert pods["demo-rollout-1-a1"]["spec"]["hostname"] == "demo-rollout-1"
    assert decision.status["phase"] == "Pending" and "LocalQueue 'team-a'" in decision.status["message"]


def test_a_gated_group_is_pending_with_kueues_reason() -> None:
    run = queued_run({**LAUNCHED, "phase": "Pending"})
    pods = launched(run, gated=True)
    before = decide_for(run, pods)
    assert before.status["phase"] == "Pending"
    assert condition(before, "Admitted")["reason"] == "WaitingForWorkload" and events(before) == ["Queued"]

    waiting = decide_for(run_with(before.status, run["spec"]), pods, workloads={GROUP_A1: WAITING})
    admitted = condition(waiting, "Admitted")
    assert waiting.status["phase"] == "Pending" and admitted["status"] == "False"
    assert admitted["reason"] == "Pending"
    assert admitted["message"] == f"queued in Kueue LocalQueue 'team-a' (Workload {GROUP_A1}): {QUOTA}"
    assert waiting.status["message"] == admitted["message"]
    # One event per wait; woken by Kueue's pod and Workload events, never by a timer.
    assert waiting.actions == [] and waiting.requeue is None


def test_an_admitted_group_runs_and_says_where_it_was_admitted() -> None:
    run = queued_run({**LAUNCHED, "phase": "Pending"})
    decision = decide_for(run, launched(run), workloads={GROUP_A1: ADMITTED})
    admitted = condition(decision, "Admitted")
    assert decision.status["phase"] == "Running" and admitted["status"] == "True"
    assert (
        admitted["message"]
        == f"Workload {GROUP_A1} admitted by Kueue (ClusterQueue 'gpus' via LocalQueue 'team-a')"
    )
    assert events(decision) == ["Admitted", "Running"]


def test_pods_kueue_did_not_take_run_unqueued_with_a_warning() -> None:
    run = queued_run({**LAUNCHED, "phase": "Pending"})
    pods = launched(run)
    for obj in pods.values():
        del obj["metadata"]["labels"][kueue.MANAGED_LABEL]
    decision = decide_for(run, pods)
    assert condition(decision, "Admitted")["reason"] == "NotManagedByKueue"
    assert "NotManagedByKueue" in events(decision) and decision.status["phase"] == "Running"


def test_a_group_kueue_evicts_is_a_preemption_and_the_next_attempt_queues_as_a_new_group() -> None:
    run = queued_run(LAUNCHED)
    pods = launched(run)
    stopped_by_kueue = {
        "type": kueue.TERMINATION_TARGET,
        "status": "True",
        "reason": "WorkloadEvictedDueToPreempted",
        "message": "Preempted to accommodate a workload (UID: u) due to prioritization in the ClusterQueue",
    }
    for obj in pods.values():
        obj["metadata"]["deletionTimestamp"] = T0
        obj["status"]["conditions"] = [stopped_by_kueue]
    evicted = decide_for(run, pods, workloads={GROUP_A1: ADMITTED})
    status = evicted.status
    assert status["attempt"] == 2 and status["preemptions"] == 1 and status.get("restarts", 0) == 0
    assert "stopped by Kueue (WorkloadEvictedDueToPreempted): Preempted to accommodate" in next(
        a.message for a in evicted.actions if isinstance(a, Event) and a.reason == "Preempted"
    )

    # The old group's pods stop (the learners save a checkpoint and exit 75): attempt 2 is a new group.
    stopped = {name: pod(obj, "Failed", 75) for name, obj in pods.items()}
    relaunch = decide_for(run_with(status, run["spec"]), stopped)
    new = created(relaunch)
    assert sorted(new) == ["demo-learner-a2-0", "demo-learner-a2-1", "demo-rollout-0-a2", "demo-rollout-1-a2"]
    assert {p["metadata"]["labels"][kueue.GROUP_NAME_LABEL] for p in new.values()} == {GROUP_A2}
    assert relaunch.status["phase"] == "Pending"


def test_servers_of_the_last_group_are_replaced_at_the_next_attempt_once_they_stopped() -> None:
    run = queued_run({**LAUNCHED, "phase": "Restarting", "attempt": 2, "attemptLaunched": False})
    pods = launched(run)
    for name in ("demo-learner-a1-0", "demo-learner-a1-1"):
        pods[name] = pod(pods[name], "Failed", 1)
    first = decide_for(run, pods)
    assert deletes(first) == ["demo-rollout-0-a1", "demo-rollout-1-a1"] and creates(first) == []
    for name in ("demo-rollout-0-a1", "demo-rollout-1-a1"):
        pods[name]["metadata"]["deletionTimestamp"] = T0
    assert creates(decide_for(run, pods)) == []  # still stopping
    for name in ("demo-rollout-0-a1", "demo-rollout-1-a1"):
        pods[name] = pod(pods[name], "Succeeded")
    assert sorted(creates(decide_for(run, pods))) == [
        "demo-learner-a2-0", "demo-learner-a2-1", "demo-rollout-0-a2", "demo-rollout-1-a2",
    ]  # fmt: skip


def test_a_failed_attempt_gives_its_group_back_during_the_back_off() -> None:
    status = {**LAUNCHED, "phase": "Restarting", "attempt": 2, "attemptLaunched": False}
    run = queued_run({**status, "restartAfter": "2026-01-01T12:00:10Z"})
    pods = launched(run)
    for name in ("demo-learner-a1-0", "demo-learner-a1-1"):
        pods[name] = pod(pods[name], "Failed", 1)
    backing_off = decide_for(run, pods)
    # The servers go now, so the group ends and Kueue releases its quota while the run waits.
    assert deletes(backing_off) == ["demo-rollout-0-a1", "demo-rollout-1-a1"]
    assert creates(backing_off) == [] and backing_off.requeue == 10.0


def test_a_lost_server_joins_the_admitted_group_at_once_under_a_new_name() -> None:
    run = queued_run(LAUNCHED)
    pods = launched(run)
    pods["demo-rollout-0-a1"] = pod(pods["demo-rollout-0-a1"], "Failed", 137)
    decision = decide_for(run, pods, workloads={GROUP_A1: ADMITTED})
    assert deletes(decision) == ["demo-rollout-0-a1"] and creates(decision) == ["demo-rollout-0-a1-1"]
    replacement = created(decision)["demo-rollout-0-a1-1"]
    assert replacement["metadata"]["labels"][kueue.GROUP_NAME_LABEL] == GROUP_A1
    assert replacement["spec"]["hostname"] == "demo-rollout-0" and decision.status["attempt"] == 1

    # Kueue gates the replacement until it sees it in the admitted group: the run does not queue.
    pods["demo-rollout-0-a1"]["metadata"]["deletionTimestamp"] = T0
    pods |= as_admitted({"demo-rollout-0-a1-1": replacement}, gated=True)
    waiting = decide_for(run, pods, workloads={GROUP_A1: ADMITTED})
    assert waiting.status["phase"] == "Initializing" and condition(waiting, "Admitted")["status"] == "True"
    assert creates(waiting) == []


def test_a_server_that_exited_0_restarts_the_attempt_as_a_new_group() -> None:
    run = queued_run(LAUNCHED)
    pods = launched(run)
    pods["demo-rollout-1-a1"] = pod(pods["demo-rollout-1-a1"], "Succeeded", 0)
    decision = decide_for(run, pods, workloads={GROUP_A1: ADMITTED})
    assert decision.status["attempt"] == 2 and decision.status["preemptions"] == 1
    assert creates(decision) == [] and "demo-rollout-1-a1" in deletes(decision)


def test_learners_deleted_before_they_were_scheduled_are_not_waited_for() -> None:
    run = queued_run({**LAUNCHED, "phase": "Restarting", "attempt": 2, "attemptLaunched": False})
    pods = launched(run, gated=True)
    for obj in pods.values():
        obj["metadata"]["deletionTimestamp"] = T0  # suspended while queued: they never ran
    assert sorted(creates(decide_for(run, copy.deepcopy(pods)))) == [
        "demo-learner-a2-0", "demo-learner-a2-1", "demo-rollout-0-a2", "demo-rollout-1-a2",
    ]  # fmt: skip
