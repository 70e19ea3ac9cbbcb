"""The life cycle of a run whose pods must share a node (a ReadWriteOnce checkpoint claim), as a table
like test_decide.py: (run status, observed pods and nodes) -> (status, actions), no cluster.
tests/operator/test_reconcile.py runs the same on the real control plane with kwok nodes."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
from controlplane import gpu_node
from test_decide import LAUNCHED, NOW, T0, decide_for, deletes, events, run_with

import rlsd_operator.decide as decide_module
from rlsd_operator import placement
from rlsd_operator.decide import Create, Decision, References, desire

Object = dict[str, Any]
RWO = References(claim_access_modes=("ReadWriteOnce",))
# learner.nodes 1 x 4 GPUs, 2 vLLM rollout replicas x 1 GPU: 3 pods, 6 GPUs.
SPEC = {"learner": {"nodes": 1}}
GPU = "nvidia.com/gpu"


def node(name: str, gpus: int) -> Object:
    return gpu_node(name, {GPU: str(gpus), "cpu": "64", "memory": "512Gi", "pods": "110"})


def cluster(*nodes: Object, pods: tuple[Object, ...] = ()) -> placement.Cluster:
    return placement.cluster(list(nodes), list(pods))


def condition(decision: Decision, kind: str) -> Object:
    return next((c for c in decision.status.get("conditions") or [] if c["type"] == kind), {})


def created(decision: Decision) -> dict[str, Object]:
    return {
        a.obj["metadata"]["name"]: a.obj
        for a in decision.actions
        if isinstance(a, Create) and a.obj["kind"] == "Pod"
    }


def on(obj: Object, where: str, phase: str = "Running") -> Object:
    """A created pod as the API server shows it, bound to node `where` (unless Pending)."""
    obj = copy.deepcopy(obj)
    obj["status"] = {"phase": phase}
    if phase != "Pending":
        obj["spec"]["nodeName"] = where
    return obj


def unschedulable(obj: Object, seconds: float) -> Object:
    """A pending pod the scheduler has found no room for, for `seconds`."""
    since = NOW - datetime.timedelta(seconds=seconds)
    obj = on(obj, "", "Pending")
    obj["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 1 Insufficient nvidia.com/gpu",
            "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ]
    return obj


def foreign(where: str, gpus: int) -> Object:
    """Another tenant's pod, bound to `where`."""
    container = {"name": "x", "resources": {"requests": {GPU: str(gpus)}}}
    return {"metadata": {"name": "other"}, "spec": {"nodeName": where, "containers": [container]}}


def launched_on(where: str) -> tuple[Object, dict[str, Object]]:
    """A run launched (attempt 1) on node `where`, and its pods there, Running."""
    run = run_with({"phase": "Pending", "attempt": 1, "restartAfter": T0}, SPEC)
    decision = decide_for(run, references=RWO, cluster=cluster(node(where, 8)))
    pods = {name: on(obj, where) for name, obj in created(decision).items()}
    return run_with({**LAUNCHED, **decision.status}, SPEC), pods


def test_placing_reads_the_nodes_only_when_it_places() -> None:
    run = run_with(spec=SPEC)
    first = decide_for(run, references=RWO)
    assert first.needs_cluster and first.actions == [] and first.status == {}
    # A run whose pods need not share a node never asks for them.
    assert not decide_for(run).needs_cluster


def test_every_pod_goes_to_the_one_node_with_room_for_them_all() -> None:
    """The small node has room for the learner (4 GPUs) alone: the pods that would follow it there by
    pod affinity could never join it. Placed as a unit, all three go to the big node."""
    run = run_with(spec=SPEC)
    decision = decide_for(run, references=RWO, cluster=cluster(node("small", 4), node("big", 8)))
    pods = created(decision)
    assert sorted(pods) == ["demo-learner-a1-0", "demo-rollout-0", "demo-rollout-1"]
    for obj in pods.values():
        assert placement.pinned_node(obj) == "big"
        assert "podAffinity" not in obj["spec"]["affinity"]
    assert decision.status["placement"] == {"node": "big"}
    placed = condition(decision, "Placed")
    assert (placed["status"], placed["reason"]) == ("True", "NodeChosen")
    assert placed["message"] == (
        "every pod of the run on node big, which has room for the run's 3 pods together (nvidia.com/gpu 6)"
    )
    assert events(decision) == ["Placed", "AttemptStarted"]


def test_the_tightest_fit_wins_and_the_recorded_node_is_kept_while_it_has_room() -> None:
    nodes = cluster(node("roomy", 8), node("exact", 6), node("also-roomy", 8))
    first = decide_for(run_with(spec=SPEC), references=RWO, cluster=nodes)
    assert first.status["placement"] == {"node": "exact"}
    # The next attempt stays on the node the run was on (its claim is attached there) ...
    restart = {**first.status, "attempt": 2, "attemptLaunched": False, "placement": {"node": "roomy"}}
    again = decide_for(run_with(restart, SPEC), references=RWO, cluster=nodes)
    assert {placement.pinned_node(p) for p in created(again).values()} == {"roomy"}
    assert "Placed" not in events(again)
    # ... unless another tenant took the room meanwhile.
    taken = cluster(node("roomy", 8), node("exact", 6), pods=(foreign("roomy", 4),))
    moved = decide_for(run_with(restart, SPEC), references=RWO, cluster=taken)
    assert moved.status["placement"] == {"node": "exact"} and "Placed" in events(moved)


def test_no_node_with_room_creates_no_pod_and_names_what_each_lacks() -> None:
    run = run_with(spec=SPEC)
    nodes = cluster(node("gpu-a", 4), node("gpu-b", 2), pods=(foreign("gpu-a", 1),))
    decision = decide_for(run, references=RWO, cluster=nodes)
    assert created(decision) == {} and "placement" not in decision.status
    message = (
        "no node has room for the run's 3 pods together (nvidia.com/gpu 6): "
        "node gpu-a lacks nvidia.com/gpu 3; node gpu-b lacks nvidia.com/gpu 4"
    )
    for kind in ("Placed", "Ready"):
        assert condition(decision, kind)["reason"] == "NoNodeFits"
        assert condition(decision, kind)["message"] == message
    assert decision.status["phase"] == "Pending" and decision.status["message"] == message
    assert events(decision) == ["NoNodeFits"] and decision.requeue == decide_module.PLACEMENT_RETRY_SECONDS
    assert not decision.status.get("attemptLaunched")
    # Looking again: the same news is no new event; then a node with room starts the run.
    waiting = run_with(decision.status, SPEC)
    assert events(decide_for(waiting, references=RWO, cluster=nodes)) == []
    roomy = cluster(node("gpu-a", 4), node("gpu-b", 2), node("gpu-c", 8))
    started = decide_for(waiting, references=RWO, cluster=roomy)
    assert len(created(started)) == 3 and started.status["placement"] == {"node": "gpu-c"}
    assert condition(started, "Placed")["status"] == "True"
    assert condition(started, "Ready")["reason"] != "NoNodeFits"


def test_a_lost_server_is_recreated_on_the_runs_node_without_reading_the_nodes() -> None:
    run, pods = launched_on("gpu-a")
    del pods["demo-rollout-1"]
    decision = decide_for(run, pods, references=RWO)
    assert not decision.needs_cluster
    (server,) = created(decision).values()
    assert server["metadata"]["name"] == "demo-rollout-1" and placement.pinned_node(server) == "gpu-a"


def test_a_pod_unschedulable_past_the_grace_moves_the_run_without_counting_a_restart() -> None:
    run, pods = launched_on("gpu-a")
    # demo-rollout-1 was lost and its replacement cannot fit: another tenant took its GPU.
    pods["demo-rollout-1"] = unschedulable(pods["demo-rollout-1"], 10)
    taken = cluster(node("gpu-a", 8), node("gpu-b", 8), pods=(foreign("gpu-a", 3),))
    within = decide_for(run, pods, references=RWO, cluster=taken)
    assert deletes(within) == [] and within.requeue == pytest.approx(20)

    pods["demo-rollout-1"] = unschedulable(pods["demo-rollout-1"], 31)
    moved = decide_for(run, pods, references=RWO, cluster=taken)
    assert "Moved" in events(moved)
    status = moved.status
    assert (status["attempt"], status.get("preemptions", 0), status.get("restarts", 0)) == (2, 0, 0)
    assert status["placement"] == {"node": "gpu-b"} and deletes(moved) == ["demo-learner-a1-0"]
    event = next(a for a in moved.actions if getattr(a, "reason", "") == "Moved")
    assert event.message.startswith("node gpu-a: the scheduler has not fit demo-rollout-1 there for 31s")

    # The next attempt: every pod left on gpu-a goes first, then all start on gpu-b.
    next_run = run_with(status, SPEC)
    pods["demo-learner-a1-0"] = on(pods["demo-learner-a1-0"], "gpu-a", "Failed")
    leaving = decide_for(next_run, pods, references=RWO, cluster=taken)
    assert deletes(leaving) == ["demo-rollout-0", "demo-rollout-1"] and created(leaving) == {}
    assert (
        leaving.status["message"] == "moving to node gpu-b: waiting for demo-rollout-0, demo-rollout-1 to go"
    )
    gone = {"demo-learner-a1-0": pods["demo-learner-a1-0"]}
    started = decide_for(next_run, gone, references=RWO, cluster=taken)
    assert sorted(created(started)) == ["demo-learner-a2-0", "demo-rollout-0", "demo-rollout-1"]
    assert {placement.pinned_node(p) for p in created(started).values()} == {"gpu-b"}


def test_a_stuck_run_with_nowhere_to_go_stays_and_says_why() -> None:
    run, pods = launched_on("gpu-a")
    pods["demo-rollout-1"] = unschedulable(pods["demo-rollout-1"], 31)
    taken = cluster(node("gpu-a", 8), pods=(foreign("gpu-a", 3),))
    decision = decide_for(run, pods, references=RWO, cluster=taken)
    assert deletes(decision) == [] and decision.status["attempt"] == 1
    placed = condition(decision, "Placed")
    assert (placed["status"], placed["reason"]) == ("False", "NoNodeFits")
    assert (
        "node gpu-a: the scheduler has not fit demo-rollout-1 there for 31s (0/2 nodes" in placed["message"]
    )
    assert condition(decision, "Ready")["reason"] == "NoNodeFits"
    assert decision.requeue == decide_module.PLACEMENT_RETRY_SECONDS
    # The room comes back and the pod is scheduled: placed again.
    pods["demo-rollout-1"] = on(pods["demo-rollout-1"], "gpu-a")
    back = decide_for(run_with(decision.status, SPEC), pods, references=RWO)
    assert condition(back, "Placed")["status"] == "True" and condition(back, "Ready")["status"] == "True"


def test_the_volumes_node_affinity_bounds_where_the_run_goes() -> None:
    local = {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-a"]}]}
        ]
    }
    nodes = cluster(node("gpu-a", 4), node("gpu-b", 8))
    decision = decide_for(run_with(spec=SPEC), references=RWO, cluster=nodes, volume_affinity=local)
    assert created(decision) == {}
    assert condition(decision, "Placed")["message"].endswith(
        "node gpu-a lacks nvidia.com/gpu 2; 1 node ruled out (1 by the checkpoint volume's node affinity)"
    )


@pytest.mark.parametrize("why", ["queued", "no node reads"])
def test_a_run_the_operator_does_not_place_follows_by_pod_affinity(
    why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kueue starts a queued run's pods the moment it admits them; with `rbac.scope: namespace` the
    operator may not list nodes. Either way the pods follow each other by pod affinity."""
    spec = {**SPEC, "queueName": "team-a"} if why == "queued" else SPEC
    if why == "no node reads":
        monkeypatch.setattr(decide_module, "PLACE_ON_NODES", False)
    run = run_with(spec=spec)
    decision = decide_for(run, references=RWO)
    assert not decision.needs_cluster and "placement" not in decision.status
    term = {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": "rlsd", "rlsd.io/run": "demo"}}}
    term["topologyKey"] = "kubernetes.io/hostname"
    pods = created(decision)
    assert len(pods) == 3
    for obj in pods.values():
        assert obj["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
            term
        ]
        assert placement.pinned_node(obj) is None
    # The servers' spec hash leaves where the run goes out: a server is not replaced when it moves.
    hashes = {
        p["metadata"]["annotations"]["rlsd.io/spec-hash"]
        for p in pods.values()
        if "rollout" in p["metadata"]["name"]
    }
    plain = desire(run, "cluster.local", References()).servers
    assert hashes == {s["metadata"]["annotations"]["rlsd.io/spec-hash"] for s in plain.values()}


def test_a_shared_claim_places_nothing() -> None:
    run = run_with(spec=SPEC)
    decision = decide_for(run, references=References(claim_access_modes=("ReadWriteMany",)))
    assert all("affinity" not in p["spec"] for p in created(decision).values())
    assert "placement" not in decision.status and not condition(decision, "Placed")
