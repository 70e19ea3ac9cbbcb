"""placement.py: what a pod takes from a node, which nodes the run's pods may go to, and the node that
has room for all of them (pure, no cluster)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from controlplane import KWOK_TOLERATION, gpu_node
from rlsdrun_samples import defaulted_run

from rlsd_operator import builders, names, placement

Object = dict[str, Any]
GPU = "nvidia.com/gpu"


def pod(*requests: Object, **spec: Any) -> Object:
    """A pod whose containers request `requests` (a dict of resources each), with `spec` besides."""
    containers = [{"name": f"c{i}", "resources": {"requests": r}} for i, r in enumerate(requests)]
    return {"metadata": {"name": "p"}, "spec": {"containers": containers, **spec}}


def node(name: str, **allocatable: str) -> Object:
    capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", **allocatable}
    return gpu_node(name, {k.replace("_", "/"): v for k, v in capacity.items()})


def run_pods(*gpus: int) -> list[Object]:
    """Pods as a run has them (kwok's nodeSelector and toleration), each requesting one of `gpus`."""
    scheduling = {"nodeSelector": {"type": "kwok"}, "tolerations": [dict(KWOK_TOLERATION)]}
    return [pod({GPU: str(g), "cpu": "2", "memory": "8Gi"}, **scheduling) for g in gpus]


def owned(obj: Object, uid: str, where: str | None = None) -> Object:
    """`obj` as a pod of the run `uid`, bound to `where` (or pending)."""
    ref = {"kind": "RLSDRun", "name": "demo", "uid": uid, "controller": True}
    spec = {**obj["spec"], **({"nodeName": where} if where else {})}
    return {**obj, "metadata": {**obj["metadata"], "ownerReferences": [ref]}, "spec": spec}


def test_a_pod_requests_what_the_scheduler_counts() -> None:
    limits_only = {"name": "a", "resources": {"limits": {GPU: 2, "memory": "1Gi"}}}
    both = {"name": "b", "resources": {"limits": {"cpu": "4"}, "requests": {"cpu": "500m"}}}
    init = {"name": "i", "resources": {"requests": {"cpu": "8"}}}
    sidecar = {
        "name": "s",
        "restartPolicy": "Always",
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
    }
    spec = {
        "containers": [limits_only, both],
        "initContainers": [sidecar, init],
        "overhead": {"memory": "64Mi"},
    }
    requests = placement.pod_requests({"spec": spec})
    # cpu: the init container (8) with the sidecar started before it (1) beats 0.5 + 1; memory: the
    # containers' 1Gi plus the sidecar's plus the overhead.
    assert requests == {
        GPU: Decimal(2),
        "cpu": Decimal(9),
        "memory": Decimal(2 * 2**30 + 64 * 2**20),
        "pods": Decimal(1),
    }


@pytest.mark.parametrize(
    ("resource", "amount", "text"),
    [
        ("memory", 24 * 2**30, "24Gi"),
        ("memory", 1500, "1500"),
        ("cpu", 6, "6"),
        ("cpu", Decimal("0.5"), "500m"),
    ],
)
def test_quantities_read_as_people_write_them(resource: str, amount: Decimal | int, text: str) -> None:
    assert placement.quantity(resource, Decimal(amount)) == text


def test_pinned_ands_the_node_into_every_term_of_the_pods_own_affinity() -> None:
    gpu_terms = [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]},
    ]
    required = {"nodeSelectorTerms": gpu_terms}
    mine = pod({}, affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}})
    pinned = placement.pinned(mine, "gpu-7")
    terms = pinned["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    pin = {"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}
    assert terms["nodeSelectorTerms"] == [{**term, "matchFields": [pin]} for term in gpu_terms]
    assert placement.pinned_node(pinned) == "gpu-7" and placement.pinned_node(mine) is None
    assert (
        "matchFields"
        not in mine["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]
    )  # not changed in place
    bare = placement.pinned(pod({}), "gpu-7")["spec"]["affinity"]["nodeAffinity"]
    assert bare["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [pin]}]
    }


def test_the_built_pods_of_a_run_carry_no_placement_of_their_own() -> None:
    run = defaulted_run(spec={"learner": {"nodes": 1}})
    for built in [builders.build_learner_pod(run, 0, 1), *builders.build_server_pods(run)]:
        assert "affinity" not in built["spec"]
    beside = builders.beside_run(builders.build_learner_pod(run, 0, 1), "demo")
    term = beside["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == [
        {
            "labelSelector": {"matchLabels": names.labels("demo")},
            "topologyKey": "kubernetes.io/hostname",
        }
    ]


def test_the_tightest_fit_wins_and_a_preferred_node_stays_while_it_has_room() -> None:
    view = placement.cluster(
        [node("big", **{GPU: "8"}), node("fits", **{GPU: "4"}), node("small", **{GPU: "2"})], []
    )
    assert placement.choose(run_pods(2, 1, 1), view, "run").node == "fits"
    assert placement.choose(run_pods(2, 1, 1), view, "run", prefer="big").node == "big"
    assert placement.choose(run_pods(2, 1, 1), view, "run", prefer="small").node == "fits"
    assert placement.choose(run_pods(2, 1, 1), view, "run", avoid={"fits": "full"}).node == "big"


def test_room_is_what_other_pods_leave_and_the_runs_own_pods_are_not_in_its_way() -> None:
    other = pod({GPU: "3"}, nodeName="a")
    done = {**pod({GPU: "4"}, nodeName="b"), "status": {"phase": "Succeeded"}}
    mine = owned(pod({GPU: "2"}), "run", "b")
    # Another run's pod pinned to b and not bound yet holds its room already; a pending pod that is
    # no run's does not.
    reserved = owned(placement.pinned(pod({GPU: "1"}), "b"), "another")
    unpinned = pod({GPU: "8"})
    view = placement.cluster(
        [node("a", **{GPU: "4"}), node("b", **{GPU: "4"})], [other, done, mine, reserved, unpinned]
    )
    assert view.nodes[1].used[GPU] == Decimal(3) and view.runs["run"] == {"b": {GPU: 2, "pods": 1}}
    # b: 4 - 1 (another run's) = 3 for the run, its own 2 there included.
    assert placement.choose(run_pods(2, 1), view, "run").node == "b"
    assert placement.choose(run_pods(2, 1), view, "someone-else").node is None


def test_no_room_names_the_closest_nodes_and_what_each_lacks() -> None:
    nodes = [
        node("gpu-a", **{GPU: "1"}),
        node("gpu-b", **{GPU: "8"}, cpu="4"),
        node("gpu-c", **{GPU: "8"}, pods="2"),
        node("gpu-d"),
        node("gpu-e", **{GPU: "2"}),
    ]
    message = placement.choose(run_pods(2, 1, 1), placement.cluster(nodes, []), "run").message
    # The closest first: the smallest shortfall as a share of the node (one without GPUs is last).
    assert message == (
        "no node has room for the run's 3 pods together (cpu 6, memory 24Gi, nvidia.com/gpu 4): "
        "node gpu-b lacks cpu 2; node gpu-c lacks room for 1 more pod; node gpu-e lacks nvidia.com/gpu 2; "
        "2 more nodes lack room"
    )


def test_nodes_the_pods_may_not_go_to_are_counted_by_why() -> None:
    cordoned = {**node("cordoned", **{GPU: "8"}), "spec": {"unschedulable": True, "taints": []}}
    tainted = node("tainted", **{GPU: "8"})
    tainted["spec"]["taints"].append({"key": "dedicated", "value": "infer", "effect": "NoSchedule"})
    elsewhere = node("elsewhere", **{GPU: "8"})
    elsewhere["metadata"]["labels"]["type"] = "real"
    soft = node("soft", **{GPU: "8"})
    soft["spec"]["taints"].append({"key": "spot", "effect": "PreferNoSchedule"})
    message = placement.choose(
        run_pods(1), placement.cluster([cordoned, tainted, elsewhere], []), "run"
    ).message
    assert message == (
        "no node has room for the run's 1 pod (cpu 2, memory 8Gi, nvidia.com/gpu 1): 3 nodes ruled out "
        "(1 by cordoned, 1 by nodeSelector/affinity, 1 by taint dedicated=infer:NoSchedule)"
    )
    # A PreferNoSchedule taint keeps no pod away.
    view = placement.cluster([cordoned, tainted, elsewhere, soft], [])
    assert placement.choose(run_pods(1), view, "run").node == "soft"
    assert (
        "the cluster has no nodes" in placement.choose(run_pods(1), placement.cluster([], []), "run").message
    )


@pytest.mark.parametrize(
    ("requirement", "selected"),
    [
        ({"key": "zone", "operator": "In", "values": ["a", "b"]}, True),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, False),
        ({"key": "rack", "operator": "NotIn", "values": ["a"]}, True),
        ({"key": "zone", "operator": "Exists"}, True),
        ({"key": "rack", "operator": "DoesNotExist"}, True),
        ({"key": "gpus", "operator": "Gt", "values": ["7"]}, True),
        ({"key": "gpus", "operator": "Lt", "values": ["8"]}, False),
    ],
)
def test_node_selector_requirements(requirement: Object, selected: bool) -> None:
    gpu = placement.Node("n", {"zone": "a", "gpus": "8"}, (), False, {}, {})
    assert placement.selects({"nodeSelectorTerms": [{"matchExpressions": [requirement]}]}, gpu) is selected
    # Terms are ORed; an empty term selects nothing; no selector selects every node.
    assert (
        placement.selects({"nodeSelectorTerms": [{}, {"matchExpressions": [requirement]}]}, gpu) is selected
    )
    assert not placement.selects({"nodeSelectorTerms": [{}]}, gpu) and placement.selects(None, gpu)


def test_tolerations_match_taints_as_the_scheduler_does() -> None:
    taint = {"key": "dedicated", "value": "train", "effect": "NoSchedule"}
    assert placement._tolerates([{"operator": "Exists"}], taint)
    assert placement._tolerates([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}], taint)
    assert placement._tolerates([{"key": "dedicated", "value": "train"}], taint)
    assert not placement._tolerates([{"key": "dedicated", "value": "infer"}], taint)
    assert not placement._tolerates(
        [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}], taint
    )
