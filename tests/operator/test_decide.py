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
    Replace,
    decide,
    desire,
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
    values = {"step": 47.0, "reward": 0.625, "accuracy": 0.5, "latestCheckpointStep": 40.0}
    second = decide_for(run, {**learners(run, 1), **servers(run)}, progress=Progress("http://x", values))
    assert (second.status["step"], second.status["reward"], second.status["latestCheckpointStep"]) == (
        47,
        0.625,
        40,
    )
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


def test_a_refused_create_holds_the_run_without_retrying_at_once() -> None:
    run = run_with()
    refusals = {"Service/demo-learners": ("NameConflict", "Service demo-learners exists and is not owned")}
    decision = decide_for(run, refusals=refusals)
    assert creates(decision) == [] and events(decision) == ["NameConflict"]
    assert decision.requeue == 30.0
    ready = next(c for c in decision.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NameConflict")


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
    later = {**decision.status, "completionTime": "2026-01-01T11:58:00Z"}
    after_ttl = decide_for(run_with(later, spec={"ttlSecondsAfterFinished": 60}), done)
    assert any(isinstance(a, DeleteRun) for a in after_ttl.actions)


def test_a_deferred_spec_change_is_named() -> None:
    run = run_with(LAUNCHED, spec={"steps": 300})
    applied = desire(run_with(), "cluster.local", References()).config_map
    decision = decide_for(run, {**learners(run, 1), **servers(run)}, config_maps={"demo-config": applied})
    deferred = next(c for c in decision.status["conditions"] if c["type"] == "SpecChangeDeferred")
    assert deferred["message"].startswith("steps changed") and events(decision) == ["SpecChangeDeferred"]


def test_a_read_write_once_claim_places_every_pod_on_one_node() -> None:
    run = run_with(spec={"learner": {"nodes": 1}})
    desired = desire(run, "cluster.local", References(claim_access_modes=("ReadWriteOnce",)))
    assert desired.colocate and desired.problem is None
    term = {"labelSelector": {"matchLabels": names.labels("demo")}, "topologyKey": "kubernetes.io/hostname"}
    for server in desired.servers.values():
        assert server["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ] == [term]
    decision = decide(
        run, desired, Observed(now=NOW, references=References(claim_access_modes=("ReadWriteOnce",)))
    )
    (learner,) = [
        a.obj for a in decision.actions if isinstance(a, Create) and "learner-a1" in a.obj["metadata"]["name"]
    ]
    assert (
        term in learner["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    )
    shared_claim = desire(run, "cluster.local", References(claim_access_modes=("ReadWriteMany",)))
    assert not shared_claim.colocate and "affinity" not in next(iter(shared_claim.servers.values()))["spec"]


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
