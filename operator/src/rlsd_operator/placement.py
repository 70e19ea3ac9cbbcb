"""Where a run whose pods must share a node goes: one node with room for all of them at once (pure).

A ReadWriteOnce checkpoint claim is mounted by the pods of one node only. The scheduler places pods
one by one, so pods that follow the first with a pod affinity deadlock a busy cluster: the first
lands on a node with room for itself only, and the others can never join it. So the operator
chooses the node for all of the run's pods together, from what the scheduler checks (their requests
against the node's allocatable less what its other pods request, the pod count included; a cordoned
node; NoSchedule and NoExecute taints; the pods' nodeSelector and required node affinity; the node
affinity of the claim's volume), and pins every pod there (`pinned`). What it does not model (host
ports, other pods' anti-affinity, topology spread, dynamic resources) the scheduler still checks: a
pinned pod it cannot fit stays Unschedulable, and the run moves (decide).

`cluster` reduces the API server's nodes and pods to what placing needs; `choose` picks the node.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

from rlsd_operator.cache import controller_owner

Object = dict[str, Any]
Quantities = dict[str, Decimal]
PODS = "pods"  # a node's allocatable pod count; every pod takes one
PIN_FIELD = "metadata.name"
# Resources the scheduler reads from every node; any other one a pod requests (nvidia.com/gpu) is
# scarce: the tightest fit is judged by it first.
BASIC_RESOURCES = {"cpu", "memory", "ephemeral-storage", PODS}
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
# Nodes named in a message that none fits, the closest first; the others are counted.
NAMED_NODES = 3


def pinned(pod: Object, node: str) -> Object:
    """`pod` allowed on node `node` only: a required node affinity on the node's name, ANDed into each
    of the pod's own required terms (terms are ORed: a term of its own would allow any node the
    others allow)."""
    pin = {"key": PIN_FIELD, "operator": "In", "values": [node]}
    spec = copy.deepcopy(pod["spec"])
    node_affinity = spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    required["nodeSelectorTerms"] = [
        {**term, "matchFields": [*(term.get("matchFields") or []), pin]}
        for term in required.get("nodeSelectorTerms") or [{}]
    ]
    return {**pod, "spec": spec}


def pinned_node(pod: Object) -> str | None:
    """The node `pinned` put `pod` on, if any."""
    spec = pod.get("spec") or {}
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in (required.get("nodeSelectorTerms") or [])[:1]:
        for field in term.get("matchFields") or []:
            if field.get("key") == PIN_FIELD and field.get("operator") == "In" and len(field["values"]) == 1:
                return str(field["values"][0])
    return None


def node_of(pod: Object) -> str | None:
    """The node a pod is on, or is pinned to while not yet bound."""
    return (pod.get("spec") or {}).get("nodeName") or pinned_node(pod)


# -- quantities -----------------------------------------------------------------------------------


def _add(total: Quantities, amounts: Quantities, sign: int = 1) -> None:
    for resource, amount in amounts.items():
        total[resource] = total.get(resource, Decimal(0)) + sign * amount


def _container_requests(container: Object) -> Quantities:
    """A container's requests; a resource with a limit and no request requests its limit (what the API
    server defaults, so the run's pods count before they are created as they will after)."""
    resources = container.get("resources") or {}
    return _parsed({**(resources.get("limits") or {}), **(resources.get("requests") or {})})


def _parsed(amounts: Object) -> Quantities:
    return {resource: parse_quantity(amount) for resource, amount in amounts.items()}


def pod_requests(pod: Object) -> Quantities:
    """What a pod takes from a node, as the scheduler counts it: its containers' requests (and its
    sidecars'), or an init container's when larger, plus the pod overhead and one of `pods`."""
    spec = pod.get("spec") or {}
    total: Quantities = {}
    for container in spec.get("containers") or []:
        _add(total, _container_requests(container))
    sidecars: Quantities = {}
    peak: Quantities = {}
    for container in spec.get("initContainers") or []:
        requests = _container_requests(container)
        if container.get("restartPolicy") == "Always":  # a sidecar: runs beside what follows
            _add(sidecars, requests)
            _add(total, requests)
            running = dict(sidecars)
        else:
            running = dict(sidecars)
            _add(running, requests)
        for resource, amount in running.items():
            peak[resource] = max(peak.get(resource, Decimal(0)), amount)
    for resource, amount in peak.items():
        total[resource] = max(total.get(resource, Decimal(0)), amount)
    _add(total, _parsed(spec.get("overhead") or {}))
    total[PODS] = total.get(PODS, Decimal(0)) + 1
    return total


def quantity(resource: str, amount: Decimal) -> str:
    """`amount` of `resource` as people write it: 24Gi, 6, 500m."""
    if resource == "memory" or resource.startswith(("hugepages-", "ephemeral-storage")):
        for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
            if amount >= size and amount % size == 0:
                return f"{amount // size}{suffix}"
    if amount == amount.to_integral_value():
        return str(int(amount))
    millis = amount * 1000
    return f"{int(millis)}m" if millis == millis.to_integral_value() else str(amount)


def _amounts(amounts: Quantities) -> str:
    return ", ".join(f"{r} {quantity(r, a)}" for r, a in sorted(amounts.items()) if r != PODS and a > 0)


# -- the cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str]
    taints: tuple[Object, ...]
    unschedulable: bool
    allocatable: Quantities
    # Requests of the pods on it (bound, or pinned by a run and not yet bound), `pods` included.
    used: Quantities


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    # What each run's own pods use, by the run's uid and node: not in the way of that run's placement
    # (its pods there stay, or move with it).
    runs: dict[str, dict[str, Quantities]]


def cluster(nodes: list[Object], pods: list[Object]) -> Cluster:
    """The nodes and what their pods take, from the API server's nodes and non-terminal pods. A run's
    pod pinned to a node and not yet bound counts there already: the room is the run's."""
    used: dict[str, Quantities] = collections.defaultdict(dict)
    runs: dict[str, dict[str, Quantities]] = {}
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        owner = controller_owner(pod)
        node = (pod.get("spec") or {}).get("nodeName") or (pinned_node(pod) if owner else None)
        if not node:
            continue
        requests = pod_requests(pod)
        _add(used[node], requests)
        if owner is not None:
            _add(runs.setdefault(owner["uid"], {}).setdefault(node, {}), requests)
    return Cluster(
        tuple(
            Node(
                name=node["metadata"]["name"],
                labels=dict(node["metadata"].get("labels") or {}),
                taints=tuple((node.get("spec") or {}).get("taints") or ()),
                unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
                allocatable=_parsed((node.get("status") or {}).get("allocatable") or {}),
                used=used.get(node["metadata"]["name"], {}),
            )
            for node in nodes
        ),
        runs,
    )


# -- what the pods accept -------------------------------------------------------------------------


def _tolerates(tolerations: list[Object], taint: Object) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists":
            if not toleration.get("key") or toleration["key"] == taint.get("key"):
                return True
        elif toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (
            taint.get("value") or ""
        ):
            return True
    return False


def _requirement(requirement: Object, value: str | None) -> bool:
    operator, values = requirement.get("operator"), requirement.get("values") or []
    if operator == "In":
        return value in values
    if operator == "NotIn":
        return value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            number, bound = int(value), int(values[0])
        except ValueError:
            return False
        return number > bound if operator == "Gt" else number < bound
    return False


def _term(term: Object, node: Node) -> bool:
    """A NodeSelectorTerm: every requirement holds (an empty term matches no node)."""
    expressions, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not expressions and not fields:
        return False
    return all(_requirement(r, node.labels.get(r["key"])) for r in expressions) and all(
        _requirement(r, node.name if r["key"] == PIN_FIELD else None) for r in fields
    )


def selects(selector: Object | None, node: Node) -> bool:
    """A NodeSelector (a required node affinity): any of its terms matches; None selects every node."""
    return selector is None or any(_term(term, node) for term in selector.get("nodeSelectorTerms") or [])


def _excluded(spec: Object, node: Node, volume: Object | None) -> str | None:
    """Why the pods of `spec` cannot go to `node` whatever its room, or None."""
    tolerations = spec.get("tolerations") or []
    if node.unschedulable and not _tolerates(
        tolerations, {"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}
    ):
        return "cordoned"
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(tolerations, taint):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"taint {taint.get('key')}{value}:{taint['effect']}"
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    selector = spec.get("nodeSelector") or {}
    if any(node.labels.get(key) != value for key, value in selector.items()) or not selects(affinity, node):
        return "nodeSelector/affinity"
    if not selects(volume, node):
        return "the checkpoint volume's node affinity"
    return None


# -- the choice -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The node for every pod of the run, or None; the message says which and why (or why none)."""

    node: str | None
    message: str


def choose(
    pods: list[Object],
    view: Cluster,
    run_uid: str,
    volume: Object | None = None,
    prefer: str | None = None,
    avoid: dict[str, str] | None = None,
) -> Choice:
    """One node with room for all of `pods` (the run's pods, alike in where they may go) at once.

    `volume` is the required node affinity of the claim's volume; `prefer` keeps the run where it is
    (the claim is attached there) while that node has room; `avoid` names nodes not to choose, with
    why (the scheduler found no room there). Among the others the tightest fit wins: the fewest
    scarce resources (GPUs) left over, then the smallest share of cpu and memory, then the name, so
    that large nodes stay free for large runs and the same observations give the same node."""
    demand: Quantities = {}
    for pod in pods:
        _add(demand, pod_requests(pod))
    count = int(demand[PODS])
    what = f"the run's {count} pod{'s' if count != 1 else ''}" + (" together" if count > 1 else "")
    what += f" ({_amounts(demand)})" if _amounts(demand) else ""
    avoid = avoid or {}
    own = view.runs.get(run_uid, {})
    fits: list[tuple[Node, Quantities]] = []
    short: list[tuple[Node, Quantities]] = []
    excluded: collections.Counter[str] = collections.Counter()
    for node in view.nodes:
        if node.name in avoid:
            continue
        reason = _excluded(pods[0]["spec"], node, volume)
        if reason is not None:
            excluded[reason] += 1
            continue
        free = dict(node.allocatable)
        _add(free, node.used, -1)
        _add(free, own.get(node.name, {}))
        lacks = {
            r: need - free.get(r, Decimal(0)) for r, need in demand.items() if need > free.get(r, Decimal(0))
        }
        (short if lacks else fits).append((node, lacks if lacks else free))
    if fits:
        chosen = next((n for n, _ in fits if n.name == prefer), None)
        if chosen is None:
            chosen = min(fits, key=lambda fit: _tightness(fit[0], fit[1], demand))[0]
        return Choice(chosen.name, f"every pod of the run on node {chosen.name}, which has room for {what}")
    reasons = [f"node {name}: {why}" for name, why in sorted(avoid.items())]
    short.sort(key=lambda s: (len(s[1]), sum(_share(s[0], r, a) for r, a in s[1].items()), s[0].name))
    reasons += [f"node {node.name} lacks {_lacks(lacks)}" for node, lacks in short[:NAMED_NODES]]
    if len(short) > NAMED_NODES:
        more = len(short) - NAMED_NODES
        reasons.append(f"{more} more node{'s lack' if more != 1 else ' lacks'} room")
    if excluded:
        ruled = ", ".join(f"{n} by {reason}" for reason, n in sorted(excluded.items()))
        reasons.append(f"{_nodes(sum(excluded.values()))} ruled out ({ruled})")
    if not view.nodes:
        reasons.append("the cluster has no nodes")
    return Choice(None, f"no node has room for {what}: {'; '.join(reasons)}")


def _nodes(count: int) -> str:
    return f"{count} node{'s' if count != 1 else ''}"


def _lacks(lacks: Quantities) -> str:
    pods = int(lacks.get(PODS, 0))
    more = f"room for {pods} more pod{'s' if pods != 1 else ''}" if pods else ""
    return ", ".join(part for part in (_amounts(lacks), more) if part)


def _share(node: Node, resource: str, amount: Decimal) -> Decimal:
    """`amount` as a share of the node's allocatable `resource` (a node without any is the farthest)."""
    allocatable = node.allocatable.get(resource, Decimal(0))
    return amount / allocatable if allocatable > 0 else Decimal("Infinity")


def _tightness(node: Node, free: Quantities, demand: Quantities) -> tuple[Decimal, Decimal, str]:
    """Sort key of a node that fits: what would be left of the scarce resources the run requests, then
    of cpu and memory (as shares of the node), then the name."""
    left = {r: free.get(r, Decimal(0)) - demand.get(r, Decimal(0)) for r in free}
    scarce = sum((left[r] for r in demand if r not in BASIC_RESOURCES and r in left), Decimal(0))
    basic = sum(
        (_share(node, r, left[r]) for r in ("cpu", "memory") if node.allocatable.get(r, 0) > 0), Decimal(0)
    )
    return scarce, basic, node.name
