"""The run life cycle as a table: (run status, observed objects) -> (status, actions), no cluster.

Each case is one call of the pure `decide`; together they run in milliseconds."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
from rlsdrun_samples import defaulted_run

from rlsd_operator import builders, names
from rlsd_operator.decide import (
    SCRAPE_SECONDS,
    Create,
    Decision,
    Delete,
    DeleteRun,
    Event,
    Observed,
    Progress,
    References,
    Refusal,
    Replace,
    decide,
    desire,
    progress_source,
)

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T0 = "2026-01-01T12:00:00Z"
Object = dict[str, Any]


def run_with(status: Object | None = None, spec: Object | None = None) -> Object:
    run = defaulted_run(spec=spec)
    run["metadata"]["generation"] = 1
    run["status"] = status or {}
    return run


def pod(obj: Object, phase: str = "Running", code: int | None = None, **status: Any) -> Object:
    """A built pod as the API server would show it in `phase` (and exited with `code`): scheduled
    unless Pending."""
    obj = copy.deepcopy(obj)
    obj["status"] = {"phase": phase, **status}
    if phase != "Pending":
        obj["spec"]["nodeName"] = "kwok-gpu-0"
    if code is not None:
        terminated = {"exitCode": code, "reason": "Error", "message": ""}
        obj["status"]["containerStatuses"] = [{"name": "learner", "state": {"terminated": terminated}}]
    return obj


def learners(run: Object, attempt: int, phase: str = "Running", **codes: int) -> dict[str, Object]:
    built = [
        builders.build_learner_pod(run, rank, attempt) for rank in range(run["spec"]["learner"]["nodes"])
    ]
    return {
        p["metadata"]["name"]: pod(p, phase, codes.get(f"rank{p['metadata']['labels'][names.LABEL_RANK]}"))
        for p in built
    }


def servers(run: Object, phase: str = "Running") -> dict[str, Object]:
    return {p["metadata"]["name"]: pod(p, phase) for p in builders.build_server_pods(run)}


def shared(run: Object) -> dict[str, dict[str, Object]]:
    desired = desire(run, "cluster.local", References())
    config_maps = [desired.config_map] if desired.config_map else []
    return {
        "services": {s["metadata"]["name"]: s for s in desired.services},
        "config_maps": {c["metadata"]["name"]: c for c in config_maps},
    }


def decide_for(run: Object, pods: dict[str, Object] | None = None, **observed: Any) -> Decision:
    references = observed.pop("references", References())
    objects = {**shared(run), **observed}
    return decide(
        run,
        desire(run, "cluster.local", references),
        Observed(now=NOW, pods=pods or {}, references=references, **objects),
    )


def creates(decision: Decision, kind: str | None = None) -> list[str]:
    return [
        a.obj["metadata"]["name"]
        for a in decision.actions
        if isinstance(a, Create) and kind in (None, a.obj["kind"])
    ]


def deletes(decision: Decision) -> list[str]:
    return sorted(a.name for a in decision.actions if isinstance(a, Delete))


def events(decision: Decision) -> list[str]:
    return [a.reason for a in decision.actions if isinstance(a, Event)]


LAUNCHED = {"phase": "Running", "attempt": 1, "attemptLaunched": True, "restartAfter": T0, "startTime": T0}


def test_a_new_run_creates_everything_at_once_and_records_the_launch_after() -> None:
    run = run_with()
    decision = decide(run, desire(run, "cluster.local", References()), Observed(now=NOW))
    assert decision.status["attempt"] == 1 and decision.status["attemptLaunched"] is True
    assert decision.status["phase"] == "Initializing" and decision.record_after
    assert sorted(creates(decision)) == [
        "demo-config", "demo-learner-a1-0", "demo-learner-a1-1", "demo-learners",
        "demo-rollout", "demo-rollout-0", "demo-rollout-1",
    ]  # fmt: skip
    assert events(decision) == ["AttemptStarted"]


@pytest.mark.parametrize(
    ("spec", "bound"),
    [
        ({}, 0),  # the trainer's default: on-policy
        ({"rollout": {"maxStaleness": 2}}, 2),
        ({"rollout": {"maxStaleness": 2}, "trainerConfig": {"rollout": {"max_staleness": 3}}}, 3),
    ],
)
def test_the_launch_records_the_staleness_bound_the_attempt_runs_with(spec: Object, bound: int) -> None:
    run = run_with(spec=spec)
    decision = decide(run, desire(run, "cluster.local", References()), Observed(now=NOW))
    assert decision.status["attemptLaunched"] is True and decision.status["maxStaleness"] == bound


def test_a_restart_records_the_next_attempt_before_deleting_anything() -> None:
    run = run_with(LAUNCHED)
    pods = learners(run, 1)
    pods["demo-learner-a1-0"] = pod(pods["demo-learner-a1-0"], "Failed", 75)
    decision = decide_for(run, {**pods, **servers(run)})
    assert decision.status["attempt"] == 2 and deletes(decision) and not decision.record_after


def test_the_attempt_is_launched_once_every_learner_pod_exists() -> None:
    run = run_with({**LAUNCHED, "phase": "Pending", "attemptLaunched": False})
    decision = decide_for(run, {**learners(run, 1, "Pending"), **servers(run, "Pending")})
    assert decision.status["attemptLaunched"] is True and decision.status["phase"] == "Initializing"
    assert creates(decision) == [] and events(decision) == ["AttemptStarted"]


def test_only_the_missing_learner_is_created_when_an_attempt_was_half_launched() -> None:
    run = run_with({**LAUNCHED, "phase": "Pending", "attemptLaunched": False})
    pods = learners(run, 1)
    del pods["demo-learner-a1-1"]
    decision = decide_for(run, {**pods, **servers(run)})
    assert creates(decision) == ["demo-learner-a1-1"] and decision.record_after


def test_running_once_every_pod_runs_then_progress_is_read() -> None:
    run = run_with({**LAUNCHED, "phase": "Initializing"})
    first = decide_for(run, {**learners(run, 1), **servers(run)})
    assert first.status["phase"] == "Running" and events(first) == ["Running"]
    assert first.requeue == SCRAPE_SECONDS and first.actions == [Event("Running", first.actions[0].message)]

    run = run_with(first.status)
    values = {"step": 47.0, "reward": 0.625, "accuracy": 0.5, "latestCheckpointStep": 40.0, "staleness": 2.0}
    second = decide_for(run, {**learners(run, 1), **servers(run)}, progress=Progress("http://x", values))
    assert (second.status["step"], second.status["reward"], second.status["latestCheckpointStep"]) == (
        47,
        0.625,
        40,
    )
    assert second.status["staleness"] == 2 and isinstance(second.status["staleness"], int)
    assert events(second) == []  # no event without a decision
    failed = decide_for(
        run, {**learners(run, 1), **servers(run)}, progress=Progress("http://x", error="refused")
    )
    assert failed.status["phase"] == "Running"
    assert (
        next(c for c in failed.status["conditions"] if c["type"] == "MetricsAvailable")["reason"]
        == "ScrapeFailed"
    )


@pytest.mark.parametrize(
    ("observed", "verdict"),
    [
        ({"rank1": 75}, "Preempted"),
        ({"rank1": 76}, "Preempted"),
        ({"rank0": 1}, "LearnerFailed"),
        ({"rank0": 1, "rank1": 75}, "Preempted"),  # a lost node makes the other ranks fail too
    ],
)
def test_a_learner_exit_restarts_the_whole_gang(observed: dict[str, int], verdict: str) -> None:
    run = run_with(LAUNCHED)
    pods = learners(run, 1)
    for rank, code in observed.items():
        name = f"demo-learner-a1-{rank[-1]}"
        pods[name] = pod(pods[name], "Failed", code)
    decision = decide_for(run, {**pods, **servers(run)})
    status = decision.status
    assert status["attempt"] == 2 and status["attemptLaunched"] is False and status["phase"] == "Restarting"
    assert events(decision) == [verdict]
    live = sorted(name for name, p in pods.items() if p["status"]["phase"] == "Running")
    assert deletes(decision) == live  # the others stopped already; servers stay
    if verdict == "Preempted":
        assert status["preemptions"] == 1 and status.get("restarts", 0) == 0 and status["restartAfter"] == T0
    else:
        assert status["restarts"] == 1 and status["restartAfter"] == "2026-01-01T12:00:10Z"


def test_a_learner_that_exited_stays_for_its_logs_before_the_kubelet_ends_its_pod() -> None:
    """A real kubelet reports a container's exit before the pod's terminal phase (which waits for the
    sandbox to go): the failed learner is not deleted meanwhile, so `kubectl logs` still has it."""
    run = run_with(LAUNCHED)
    pods = learners(run, 1)
    pods["demo-learner-a1-0"] = pod(pods["demo-learner-a1-0"], "Running", 3)
    decision = decide_for(run, {**pods, **servers(run)})
    assert decision.status["phase"] == "Failed"
    assert deletes(decision) == ["demo-learner-a1-1", "demo-rollout-0", "demo-rollout-1"]


def test_progress_is_read_from_rank_0_of_the_current_attempt_once_it_runs() -> None:
    run = run_with(LAUNCHED)
    old = learners(run, 1, "Failed")
    current = learners(run, 2)
    for name in current:
        current[name]["status"]["podIP"] = f"10.244.0.{name[-1]}"
    assert progress_source({**old, **current}, 2)["metadata"]["name"] == "demo-learner-a2-0"
    assert progress_source({**old, **current}, 3) is None
    current["demo-learner-a2-0"]["status"]["phase"] = "Pending"
    assert progress_source({**old, **current}, 2) is None
    assert names.metrics_url("10.244.0.7") == "http://10.244.0.7:9400/metrics"
    assert names.metrics_url("fd00::7") == "http://[fd00::7]:9400/metrics"


def test_the_next_attempt_waits_for_the_old_learners_to_stop_then_for_the_back_off() -> None:
    status = {**LAUNCHED, "phase": "Restarting", "attempt": 2, "attemptLaunched": False}
    run = run_with({**status, "restartAfter": "2026-01-01T12:00:10Z"})
    stopping = learners(run, 1)
    stopping["demo-learner-a1-0"]["metadata"]["deletionTimestamp"] = T0
    waiting = decide_for(run, {**stopping, **servers(run)})
    assert (
        creates(waiting) == []
        and "waiting for demo-learner-a1-0, demo-learner-a1-1" in waiting.status["message"]
    )
    assert deletes(waiting) == ["demo-learner-a1-1"]  # the one not yet being deleted

    stopped = learners(run, 1, "Failed", rank0=75, rank1=75)
    backing_off = decide_for(run, {**stopped, **servers(run)})
    assert creates(backing_off) == [] and backing_off.requeue == 10.0

    run = run_with({**status, "restartAfter": T0})
    launching = decide_for(run, {**stopped, **servers(run)})
    assert creates(launching) == ["demo-learner-a2-0", "demo-learner-a2-1"]


def test_learners_older_than_the_last_attempt_are_deleted_and_the_config_re_rendered() -> None:
    run = run_with({**LAUNCHED, "attempt": 3, "attemptLaunched": False}, spec={"steps": 200})
    pods = {
        **learners(run, 1, "Failed", rank0=75, rank1=75),
        **learners(run, 2, "Failed", rank0=75, rank1=75),
    }
    old_config = desire(run_with(), "cluster.local", References()).config_map
    decision = decide_for(run, {**pods, **servers(run)}, config_maps={"demo-config": old_config})
    assert deletes(decision) == ["demo-learner-a1-0", "demo-learner-a1-1"]
    replaced = [a.obj for a in decision.actions if isinstance(a, Replace)]
    assert len(replaced) == 1 and "total_steps: 200" in replaced[0]["data"]["config.yaml"]


@pytest.mark.parametrize("kind", ["services", "config_maps"])
def test_owned_objects_are_recreated_whenever_they_are_missing(kind: str) -> None:
    run = run_with(LAUNCHED)
    objects = shared(run)
    missing = sorted(objects[kind])[0]
    del objects[kind][missing]
    decision = decide_for(run, {**learners(run, 1), **servers(run)}, **objects)
    assert creates(decision) == [missing] and decision.status["phase"] == "Running"


def test_a_lost_server_is_replaced_alone() -> None:
    run = run_with(LAUNCHED)
    pods = {**learners(run, 1), **servers(run)}
    pods["demo-rollout-1"] = pod(pods["demo-rollout-1"], "Failed")
    del pods["demo-rollout-0"]
    decision = decide_for(run, pods)
    assert creates(decision) == ["demo-rollout-0"] and deletes(decision) == ["demo-rollout-1"]
    assert sorted(events(decision)) == ["ServerLost", "ServerRecreated"]
    assert decision.status["attempt"] == 1


def test_an_invalid_spec_fails_at_once_and_creates_nothing() -> None:
    run = run_with(spec={"trainerConfig": {"algorithm": {"gruop_size": 4}}})
    decision = decide_for(run)
    assert decision.status["phase"] == "Failed" and creates(decision) == []
    failed = next(c for c in decision.status["conditions"] if c["type"] == "Failed")
    assert (
        failed["reason"] == "InvalidSpec" and "spec.trainerConfig.algorithm.gruop_size" in failed["message"]
    )
    assert events(decision) == ["InvalidSpec"]


def test_an_invalid_edit_of_a_running_run_fails_it_and_stops_every_pod() -> None:
    run = run_with(LAUNCHED, spec={"trainerConfig": {"rollout": {"prompts_per_step": 10**12}}})
    decision = decide_for(run, {**learners(run, 1), **servers(run)})
    assert decision.status["phase"] == "Failed"
    assert deletes(decision) == sorted([*learners(run, 1), *servers(run)])


def test_missing_references_hold_the_run_with_one_event() -> None:
    run = run_with()
    references = References(missing=("MissingSecret", "huggingFaceTokenSecret: Secret 'hf' not found"))
    first = decide_for(run, references=references)
    assert first.status["phase"] == "Pending" and creates(first) == [] and events(first) == ["MissingSecret"]
    again = decide_for(run_with(first.status), references=references)
    assert events(again) == [] and again.requeue == first.requeue


def ready(decision: Decision) -> Object:
    return next(c for c in decision.status["conditions"] if c["type"] == "Ready")


def test_a_name_held_by_another_object_holds_the_run_until_it_goes() -> None:
    run = run_with()
    conflict = Refusal("NameConflict", "Service demo-learners exists and is not owned by this run")
    decision = decide_for(run, refusals={"Service/demo-learners": conflict})
    assert creates(decision) == [] and events(decision) == ["NameConflict"]
    assert decision.requeue is None  # the watch sees the other object go
    assert (ready(decision)["status"], ready(decision)["reason"]) == ("False", "NameConflict")


QUOTA = (
    'Pod demo-learner-a1-1 refused by a ResourceQuota: pods "demo-learner-a1-1" is forbidden: '
    "exceeded quota: gpus, requested: requests.nvidia.com/gpu=4, used: requests.nvidia.com/gpu=6, "
    "limited: requests.nvidia.com/gpu=8"
)


def test_an_exceeded_quota_keeps_the_run_pending_with_one_event_then_retries() -> None:
    def refused(retry_in: float) -> dict[str, Refusal]:
        return {"Pod/demo-learner-a1-1": Refusal("QuotaExceeded", QUOTA, retry_in)}

    run = run_with()
    # Learner 1 and both rollout pods were refused; learner 0 was created.
    pending = {"demo-learner-a1-0": learners(run, 1, "Pending")["demo-learner-a1-0"]}
    first = decide_for(run, pending, refusals=refused(5.0))
    assert first.status["phase"] == "Pending" and first.status["message"] == QUOTA
    condition = ready(first)
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "False",
        "QuotaExceeded",
        QUOTA,
    )
    assert events(first) == ["QuotaExceeded"] and creates(first) == [] and first.requeue == 5.0
    assert not first.status["attemptLaunched"]

    # Waiting: no event, no create, no change of the condition's transition time.
    run = run_with(first.status)
    waiting = decide_for(run, pending, refusals=refused(2.5))
    assert events(waiting) == [] and creates(waiting) == [] and waiting.requeue == 2.5
    assert ready(waiting) == condition

    # Due: every missing object is created again; the launch is recorded once they exist.
    due = decide_for(run, pending, refusals=refused(0.0))
    assert sorted(creates(due)) == ["demo-learner-a1-1", "demo-rollout-0", "demo-rollout-1"]
    assert due.record_after and "QuotaExceeded" not in events(due)
    assert due.status["message"] == QUOTA  # until the retry went through


def test_many_refusals_are_summed_up_in_one_message() -> None:
    refused = {
        f"Pod/demo-rollout-{i}": Refusal("PodSecurity", f"Pod demo-rollout-{i} refused", 9.0) for i in (0, 1)
    }
    refused["Pod/demo-learner-a1-0"] = Refusal("QuotaExceeded", QUOTA, 3.0)
    decision = decide_for(run_with(), refusals=refused)
    assert decision.status["message"] == QUOTA + " (and 2 more objects refused)"
    assert events(decision) == ["QuotaExceeded"] and decision.requeue == 3.0


def test_the_gang_is_followed_while_a_refused_server_waits() -> None:
    run = run_with(LAUNCHED)
    pods = learners(run, 1)
    pods["demo-learner-a1-1"] = pod(pods["demo-learner-a1-1"], "Failed", 75)
    refused = {
        "Pod/demo-rollout-0": Refusal("PodSecurity", "Pod demo-rollout-0 refused by Pod Security", 20.0)
    }
    servers_left = {k: v for k, v in servers(run).items() if k != "demo-rollout-0"}
    decision = decide_for(run, {**pods, **servers_left}, refusals=refused)
    assert decision.status["attempt"] == 2 and decision.status["preemptions"] == 1
    assert deletes(decision) == ["demo-learner-a1-0"] and creates(decision) == []
    assert events(decision) == ["Preempted", "PodSecurity"] and decision.requeue == 0.0


def test_a_refused_server_is_retried_without_an_event_per_retry() -> None:
    refusal = Refusal("QuotaExceeded", QUOTA, 0.0)
    earlier = {"type": "Ready", "status": "False", "reason": "QuotaExceeded", "message": QUOTA,
               "lastTransitionTime": "2026-01-01T11:00:00Z"}  # fmt: skip
    run = run_with({**LAUNCHED, "phase": "Initializing", "conditions": [earlier]})
    left = {k: v for k, v in servers(run).items() if k != "demo-rollout-0"}
    decision = decide_for(run, {**learners(run, 1), **left}, refusals={"Pod/demo-rollout-0": refusal})
    assert creates(decision) == ["demo-rollout-0"] and events(decision) == []
    assert ready(decision) == earlier


def test_a_suspended_run_shows_no_refusal() -> None:
    refused = {"Pod/demo-rollout-0": Refusal("QuotaExceeded", QUOTA, 9.0)}
    decision = decide_for(run_with(LAUNCHED, spec={"suspend": True}), refusals=refused)
    assert decision.status["phase"] == "Suspended" and events(decision) == ["Suspended"]
    assert ready(decision)["reason"] == "Suspended"


def test_the_network_policy_follows_the_spec() -> None:
    defaults = builders.NetworkPolicyDefaults(enabled=True)
    run = run_with(LAUNCHED)
    pods = {**learners(run, 1), **servers(run)}
    wanted = desire(run, "cluster.local", References(), defaults)
    assert wanted.network_policy is not None
    missing = decide(run, wanted, Observed(now=NOW, pods=pods, **shared(run)))
    assert creates(missing) == ["demo-netpol"]
    present = {"demo-netpol": wanted.network_policy}
    same = decide(run, wanted, Observed(now=NOW, pods=pods, network_policies=present, **shared(run)))
    assert same.actions == []
    changed_run = run_with(LAUNCHED, spec={"networkPolicy": {"metricsFrom": [{"podSelector": {}}]}})
    changed = desire(changed_run, "cluster.local", References(), defaults)
    replaced = decide(
        changed_run, changed, Observed(now=NOW, pods=pods, network_policies=present, **shared(run))
    )
    assert [a.obj["metadata"]["name"] for a in replaced.actions if isinstance(a, Replace)] == ["demo-netpol"]
    assert "SpecChangeDeferred" not in events(replaced)  # applies at once
    off_run = run_with(LAUNCHED, spec={"networkPolicy": {"enabled": False}})
    off = decide(off_run, desire(off_run, "cluster.local", References(), defaults),
                 Observed(now=NOW, pods=pods, network_policies=present, **shared(run)))  # fmt: skip
    assert deletes(off) == ["demo-netpol"]


def test_suspend_stops_every_pod() -> None:
    run = run_with(LAUNCHED, spec={"suspend": True})
    decision = decide_for(run, {**learners(run, 1), **servers(run)})
    assert decision.status["phase"] == "Suspended" and creates(decision) == []
    assert deletes(decision) == sorted([*learners(run, 1), *servers(run)])


def test_success_frees_the_servers_and_the_ttl_deletes_the_run() -> None:
    run = run_with(LAUNCHED, spec={"ttlSecondsAfterFinished": 60})
    done = learners(run, 1, "Succeeded", rank0=0, rank1=0)
    decision = decide_for(run, {**done, **servers(run)})
    assert decision.status["phase"] == "Succeeded" and decision.requeue == 60.0
    assert deletes(decision) == ["demo-rollout-0", "demo-rollout-1"]
    # Exit 0 means the config's every step ran, though the last scrape (if any) saw fewer.
    assert decision.status["step"] == run["spec"]["steps"]
    later = {**decision.status, "completionTime": "2026-01-01T11:58:00Z"}
    after_ttl = decide_for(run_with(later, spec={"ttlSecondsAfterFinished": 60}), done)
    assert any(isinstance(a, DeleteRun) for a in after_ttl.actions)


def test_a_deferred_spec_change_is_named() -> None:
    run = run_with(LAUNCHED, spec={"steps": 300})
    applied = desire(run_with(), "cluster.local", References()).config_map
    decision = decide_for(run, {**learners(run, 1), **servers(run)}, config_maps={"demo-config": applied})
    deferred = next(c for c in decision.status["conditions"] if c["type"] == "SpecChangeDeferred")
    assert deferred["message"].startswith("steps changed") and events(decision) == ["SpecChangeDeferred"]


@pytest.mark.parametrize(
    ("modes", "spec", "refused"),
    [
        (("ReadWriteOnce",), {}, "learner.nodes is 2"),
        (("ReadWriteOncePod",), {"learner": {"nodes": 1}}, "ReadWriteOncePod"),
        (("ReadWriteOnce", "ReadWriteMany"), {}, None),
    ],
)
def test_a_claim_the_pods_cannot_share_is_refused(
    modes: tuple[str, ...], spec: Object, refused: str | None
) -> None:
    run = run_with(spec=spec)
    decision = decide_for(run, references=References(claim_access_modes=modes))
    if refused is None:
        assert decision.status["phase"] == "Initializing" and creates(decision)
    else:
        assert decision.status["phase"] == "Failed" and refused in decision.status["message"]
        assert creates(decision) == []
