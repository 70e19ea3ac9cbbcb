"""The run life cycle as one pure function: `decide(run, desired, observed)` -> the status to record,
the actions that carry the decision out, and when to look again.

No I/O and no clock: the handlers observe (the run, the objects it owns, the references it names,
learner rank 0's progress, the time), call `decide`, patch the status it returns *before* acting,
then run its actions. Decisions are level-triggered: the same observations give the same decision,
so a reconcile interrupted at any point is redone by the next one with the same result, and an
owned object that goes missing is recreated by whichever reconcile sees it missing.

A refusal (a spec the trainer would refuse, a claim the pods cannot share, a name held by another
object, a create the API server refused) is a condition plus a Warning event, decided here like every
other outcome; a new kind of refusal is one more check in `_Decider.decide` that returns
`self._fail(...)` or `self._hold(...)`, or one more `Refusal` the handlers observe.
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass, field
from typing import Any

from rlsd_contracts.wire import LEARNER, SERVER_ROLES
from rlsd_operator import builders, kueue, lifecycle, names, placement
from rlsd_operator.lifecycle import FINISHED, GangState, Verdict

Object = dict[str, Any]
# How often a run waiting for a missing Secret or claim looks again (nothing it watches wakes it).
REFERENCE_RETRY_SECONDS = 10.0
# A create the API server refused (admission, quota, a name someone else holds) is retried after
# REFUSAL_RETRY_SECONDS, doubling with every refused retry up to REFUSAL_RETRY_MAX_SECONDS: what fixes
# it (a PriorityClass, a namespace label, a webhook) is mostly nothing the operator watches. A quota
# that frees up wakes the run sooner (handlers watch ResourceQuotas).
REFUSAL_RETRY_SECONDS = 5.0
REFUSAL_RETRY_MAX_SECONDS = 60.0
# How often learner rank 0's metrics are read into the status of a Running run.
SCRAPE_SECONDS = 15.0
# The Kueue LocalQueue of runs that name none (the operator's setting; empty: such runs are not queued).
DEFAULT_QUEUE_NAME = ""
# Whether the operator chooses the node of a run whose pods must share one (placement.py): it may list
# the nodes and every namespace's pods (the handlers find out at start-up). Else, as for queued runs,
# the pods follow each other by pod affinity (builders.beside_run).
PLACE_ON_NODES = True
# How often a run that no node has room for looks again (nothing it watches says room appeared).
PLACEMENT_RETRY_SECONDS = 10.0
# How long a pod pinned to the run's node may stay Unschedulable (another tenant took the room, the
# node went) before the run moves to a node with room for all of its pods.
PLACEMENT_GRACE_SECONDS = 30.0


# -- what the handlers observe ------------------------------------------------------------------------


@dataclass(frozen=True)
class References:
    """What the spec names outside the run: the first missing one (reason, message), and the access
    modes of `checkpoint.volume.claimName` when it exists."""

    missing: tuple[str, str] | None = None
    claim_access_modes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Progress:
    """One scrape of learner rank 0's metrics: the values read, or the error."""

    url: str
    values: dict[str, float] | None = None
    error: str | None = None


def refusal_retry_seconds(refused_retries: int) -> float:
    """Delay before retrying creates after `refused_retries` refused attempts in a row (1 or more)."""
    return min(REFUSAL_RETRY_SECONDS * 2 ** max(refused_retries - 1, 0), REFUSAL_RETRY_MAX_SECONDS)


@dataclass(frozen=True)
class Refusal:
    """An object the run cannot have yet: why (a reason, a message naming the object and quoting the
    API server), and the seconds until its create is retried (0: due now; None: whenever what holds it
    changes, as with a name another object holds, which the watches see go)."""

    reason: str
    message: str
    retry_in: float | None = None


@dataclass(frozen=True)
class Observed:
    """The run's own objects (owned by this run's uid), by kind and name, and what else was seen."""

    now: datetime.datetime
    pods: dict[str, Object] = field(default_factory=dict)
    services: dict[str, Object] = field(default_factory=dict)
    config_maps: dict[str, Object] = field(default_factory=dict)
    claims: dict[str, Object] = field(default_factory=dict)
    network_policies: dict[str, Object] = field(default_factory=dict)
    # "Kind/name" of objects the run cannot have (yet): a name another object holds, a create the API
    # server refused.
    refusals: dict[str, Refusal] = field(default_factory=dict)
    references: References = References()
    progress: Progress | None = None
    # Kueue Workloads of the run's pod groups, by name (kueue.summary of each).
    workloads: dict[str, Object] = field(default_factory=dict)
    # The nodes and what their pods take, and the required node affinity of the checkpoint claim's
    # volume: read only when a decision places the run (see NeedsCluster).
    cluster: placement.Cluster | None = None
    volume_affinity: Object | None = None


@dataclass(frozen=True)
class Desired:
    """What the spec asks for, built once per spec (generation) and claim: the shared objects and the
    server pods, or why the spec cannot be realised."""

    cluster_domain: str
    problem: str | None = None
    config_map: Object | None = None
    claim: Object | None = None
    services: tuple[Object, ...] = ()
    network_policy: Object | None = None
    # Server pods by hostname (the server's slot: its DNS name, and its pod name outside Kueue).
    servers: dict[str, Object] = field(default_factory=dict)
    # Every pod of the run must be on one node (its checkpoint claim is ReadWriteOnce).
    colocate: bool = False
    # The rollout staleness bound of the trainer config (recorded in the status at an attempt's launch).
    max_staleness: int = 0


def desire(
    run: Object,
    cluster_domain: str,
    references: References,
    network_policy: builders.NetworkPolicyDefaults = builders.NO_NETWORK_POLICY,
) -> Desired:
    """The objects `run` should own (pure; raises nothing: a spec that cannot be realised is a problem)."""
    spec = run["spec"]
    volume = spec["checkpoint"]["volume"]
    modes = list(references.claim_access_modes) if volume.get("claimName") else []
    if volume.get("claimTemplate"):
        modes = builders.template_access_modes(spec)
    try:
        config_map = builders.build_config_map(run, cluster_domain)
    except builders.InvalidSpec as exc:
        return Desired(cluster_domain, problem=str(exc))
    problem = builders.volume_problem(spec, modes) if modes else None
    if problem:
        return Desired(cluster_domain, problem=problem)
    servers = {p["metadata"]["name"]: p for p in builders.build_server_pods(run)}
    return Desired(
        cluster_domain,
        config_map=config_map,
        claim=builders.build_claim(run),
        services=tuple(builders.build_services(run)),
        network_policy=builders.build_network_policy(run, network_policy),
        servers=servers,
        colocate=bool(modes) and builders.colocated(modes),
        max_staleness=builders.max_staleness(config_map),
    )


# -- what the handlers do -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    obj: Object


@dataclass(frozen=True)
class Replace:
    """Replace an existing object (the ConfigMap, re-rendered when an attempt starts)."""

    obj: Object


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str


@dataclass(frozen=True)
class Event:
    """A decision, as an Event on the run and one log line."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class DeleteRun:
    """The run itself (ttlSecondsAfterFinished passed)."""


Action = Create | Replace | Delete | Event | DeleteRun


@dataclass
class Decision:
    status: Object
    actions: list[Action]
    requeue: float | None  # seconds until the run should be looked at again without a new event
    # The status is recorded after the actions succeeded rather than before: only for a launch,
    # whose pods' names already follow from the recorded attempt (redoing it finds them).
    record_after: bool = False
    # Nothing was decided: the run is to be placed, and `Observed.cluster` was not read (decide again
    # with it).
    needs_cluster: bool = False


class NeedsCluster(Exception):
    """Raised by the decider when it places a run without `Observed.cluster`: the nodes and every
    namespace's pods are read only for the decisions that place a run, never for the others."""


def decide(run: Object, desired: Desired, observed: Observed) -> Decision:
    decider = _Decider(run, desired, observed)
    try:
        requeue = decider.decide()
    except NeedsCluster:
        return Decision(copy.deepcopy(run.get("status") or {}), [], None, needs_cluster=True)
    return Decision(decider.status, decider.actions, requeue, decider.record_after)


# -- the life cycle -----------------------------------------------------------------------------------


def timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def role(pod: Object) -> str:
    return pod["metadata"]["labels"].get(names.LABEL_ROLE, "")


def attempt_of(pod: Object) -> int:
    return int(pod["metadata"]["labels"].get(names.LABEL_ATTEMPT, "0"))


def progress_source(pods: dict[str, Object], attempt: int | None) -> Object | None:
    """The pod whose metrics are the run's progress: learner rank 0 of the current attempt, once it
    runs and has an address (the operator reads only pods it made, never an address a user gives)."""
    for pod in pods.values():
        labels = pod["metadata"]["labels"]
        if (
            role(pod) == LEARNER
            and labels.get(names.LABEL_RANK) == "0"
            and attempt_of(pod) == attempt
            and (pod.get("status") or {}).get("phase") == "Running"
            and (pod.get("status") or {}).get("podIP")
            and not _deleting(pod)
        ):
            return pod
    return None


def _spec_hash(obj: Object) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(names.ANNOTATION_SPEC_HASH)


def _deleting(obj: Object) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def slot(pod: Object) -> str:
    """Which server a server pod is: its hostname (a replacement in a Kueue group has another name)."""
    return pod["spec"].get("hostname") or pod["metadata"]["name"]


def unschedulable(pod: Object) -> Object | None:
    """The `PodScheduled` condition of a pod the scheduler found no node for, or None."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled":
            failed = condition.get("status") == "False" and condition.get("reason") == "Unschedulable"
            return condition if failed and condition.get("lastTransitionTime") else None
    return None


def _sooner(*delays: float | None) -> float | None:
    return min((d for d in delays if d is not None), default=None)


class _Decider:
    def __init__(self, run: Object, desired: Desired, observed: Observed) -> None:
        self.run = run
        self.spec: Object = run["spec"]
        self.name: str = run["metadata"]["name"]
        self.desired = desired
        self.observed = observed
        self.status: Object = copy.deepcopy(run.get("status") or {})
        self.now = observed.now.replace(microsecond=0)
        self.actions: list[Action] = []
        self.record_after = False
        self.queue = kueue.queue_name(run, DEFAULT_QUEUE_NAME)
        # Whether the operator chooses the node of the run's pods (placement.py). Not for a queued run:
        # its node could only be chosen once Kueue admits its pod group, and Kueue ungates the pods at
        # that moment, after which their node affinity cannot change; its pods follow each other by
        # pod affinity (builders.beside_run).
        self.places = desired.colocate and not self.queue and PLACE_ON_NODES
        # While a refused create waits for its retry, the run creates nothing (everything else goes on:
        # following the learners, deleting, suspending).
        self.blocked = any(r.retry_in is None or r.retry_in > 0 for r in observed.refusals.values())

    # -- helpers ----------------------------------------------------------------------------------

    def _condition(self, kind: str, status: bool, reason: str, message: str = "") -> None:
        conditions = self.status.get("conditions") or []
        self.status["conditions"] = lifecycle.set_condition(
            conditions, kind, status, reason, message, timestamp(self.now)
        )

    def _condition_of(self, kind: str) -> Object:
        return next((c for c in self.status.get("conditions") or [] if c["type"] == kind), {})

    def _phase(self, phase: str, message: str) -> None:
        self.status["phase"] = phase
        self.status["message"] = message

    def _event(self, reason: str, message: str, warning: bool = False) -> None:
        self.actions.append(Event(reason, message, warning))

    def _create(self, obj: Object) -> bool:
        """Create `obj`, unless a refusal blocks every create for now; whether it will be created."""
        if not self.blocked:
            self.actions.append(Create(obj))
        return not self.blocked

    def _refused(self, kind: str, name: str) -> bool:
        return f"{kind}/{name}" in self.observed.refusals

    def _delete_pod(self, pod: Object) -> None:
        self.actions.append(Delete("Pod", pod["metadata"]["name"]))

    def _group(self) -> str | None:
        """The Kueue pod group of the current attempt (None: the run is not queued)."""
        if not self.queue:
            return None
        return kueue.group_name(self.name, self.run["metadata"]["uid"], self.status["attempt"])

    def _queued(self, pod: Object) -> Object:
        """`pod` in the current attempt's Kueue pod group (as it is when the run is not queued)."""
        group = self._group()
        if group is None:
            return pod
        return kueue.grouped(pod, self.run, self.queue, group, builders.pod_count(self.spec))

    def _colocated(self, pod: Object) -> Object:
        """`pod` where the run's pods must be: pinned to the node `_place` recorded when the operator
        places the run, else (a run whose pods must share a node all the same) beside its others."""
        if self.places:
            return placement.pinned(pod, self.status["placement"]["node"])
        return builders.beside_run(pod, self.name) if self.desired.colocate else pod

    # -- placing the run on one node ----------------------------------------------------------------

    def _own_live_pods(self) -> list[Object]:
        """The run's pods that run or will: the current attempt's learners and the servers, by name."""
        attempt = self.status.get("attempt")
        return sorted(
            (
                p
                for p in self.observed.pods.values()
                if not lifecycle.is_terminated(p) and (role(p) != LEARNER or attempt_of(p) == attempt)
            ),
            key=lambda p: p["metadata"]["name"],
        )

    def _place(self, avoid: dict[str, str] | None = None) -> str | None:
        """The node with room for every pod of the run at once (placement.choose), recorded in the
        status with the `Placed` condition; None when no node has room (`_no_room`). The node the
        run's pods are on, or were last placed on, is kept while it has room (its claim is attached
        there); `avoid`: nodes not to choose, with why."""
        if self.observed.cluster is None:
            raise NeedsCluster
        attempt = self.status["attempt"]
        pods = [
            *(
                builders.build_learner_pod(self.run, rank, attempt, self.desired.cluster_domain)
                for rank in range(self.spec["learner"]["nodes"])
            ),
            *self.desired.servers.values(),
        ]
        recorded = (self.status.get("placement") or {}).get("node")
        where = next((n for p in self._own_live_pods() if (n := placement.node_of(p))), None)
        choice = placement.choose(
            pods,
            self.observed.cluster,
            self.run["metadata"]["uid"],
            volume=self.observed.volume_affinity,
            prefer=recorded or where,
            avoid=avoid,
        )
        if choice.node is None:
            self._no_room(choice.message)
            return None
        if choice.node != recorded or self._condition_of("Placed").get("status") != "True":
            self._event("Placed", choice.message)
        self.status["placement"] = {"node": choice.node}
        self._placed(choice.message)
        return choice.node

    def _placed(self, message: str) -> None:
        self._condition("Placed", True, "NodeChosen", message)
        if self._condition_of("Ready").get("reason") == "NoNodeFits":  # no longer why it waits
            self._condition("Ready", False, "Placed", message)

    def _no_room(self, message: str) -> None:
        """No node has room for the run's pods together: `Placed` and `Ready` False (reason
        `NoNodeFits`, which `kubectl get rlsd` shows), the message naming the closest nodes and what
        each lacks, one Warning event until the run is placed; it looks again in
        PLACEMENT_RETRY_SECONDS."""
        if self._condition_of("Placed").get("reason") != "NoNodeFits":
            self._event("NoNodeFits", message, warning=True)
        self._condition("Placed", False, "NoNodeFits", message)
        self._condition("Ready", False, "NoNodeFits", message)
        self.status["message"] = message

    def _leave_other_nodes(self, node: str) -> list[str]:
        """Delete the run's pods that are not on (or pinned to) `node`, where the run is placed: the
        claim is mounted on one node at a time. The names of those still there (to wait for)."""
        leaving = [p for p in self._own_live_pods() if placement.node_of(p) != node]
        for pod in leaving:
            if not _deleting(pod):
                self._delete_pod(pod)
        return [p["metadata"]["name"] for p in leaving]

    def _unstick(self, current: list[Object], requeue: float | None) -> float | None:
        """A pod of the run that the scheduler has not fit on the run's node for
        PLACEMENT_GRACE_SECONDS (another tenant took the room meanwhile, the node is going): the run
        moves to a node with room for all of its pods, as a new learner attempt (its learners stop and
        save a checkpoint; neither a preemption nor a failure: nothing was lost). While no node has
        room, it stays where it is (the room may come back) and says why."""
        waits, stuck = [], []
        for pod in self._own_live_pods():
            condition = unschedulable(pod)
            if condition is None or _deleting(pod):
                continue
            since = (self.now - parse_timestamp(condition["lastTransitionTime"])).total_seconds()
            if since < PLACEMENT_GRACE_SECONDS:
                waits.append(PLACEMENT_GRACE_SECONDS - since)
            else:
                stuck.append((pod, condition, since))
        node = (self.status.get("placement") or {}).get("node")
        if not stuck:
            if node and self._condition_of("Placed").get("status") == "False":  # the room came back
                self._placed(f"every pod of the run on node {node}")
            return _sooner(requeue, *waits)
        pod, condition, since = stuck[0]
        node = node or placement.node_of(pod)
        why = (
            f"the scheduler has not fit {pod['metadata']['name']} there for {since:.0f}s "
            f"({condition.get('message') or 'Unschedulable'})"
        )
        target = self._place(avoid={node: why} if node else None)
        if target is None:
            return _sooner(requeue, PLACEMENT_RETRY_SECONDS)
        self._event("Moved", f"node {node}: {why}; moving every pod of the run to node {target}", True)
        self._next_attempt("Moved", 0.0)
        self._delete_live(current)
        return 0.0

    def _delete_live(self, pods: list[Object]) -> None:
        """Delete the pods that still run (their learners get SIGTERM and save a checkpoint); those that
        exited stay, with their logs."""
        for pod in pods:
            if (
                not _deleting(pod)
                and not lifecycle.is_terminated(pod)
                and not lifecycle.containers_exited(pod)
            ):
                self._delete_pod(pod)

    # -- the decision -----------------------------------------------------------------------------

    def decide(self) -> float | None:
        if self.status.get("phase") in FINISHED:
            return self._finished()
        if self.desired.problem:
            return self._fail("InvalidSpec", self.desired.problem)
        missing = self.observed.references.missing
        if missing:
            return self._hold("ReferencesResolved", *missing, retry=REFERENCE_RETRY_SECONDS)
        self._condition("ReferencesResolved", True, "Found", "every Secret and claim the spec names exists")
        return self._surface_refusals(self._reconcile())

    def _reconcile(self) -> float | None:
        """The run's objects and learner gang (creates held back while `self.blocked`)."""
        self._ensure_shared_objects()
        if not self.places:
            self.status.pop("placement", None)
            self.status["conditions"] = lifecycle.drop_condition(
                self.status.get("conditions") or [], "Placed"
            )

        pods = list(self.observed.pods.values())
        if self.spec["suspend"]:
            return self._suspend(pods)
        if self.status.get("phase") == "Suspended" or not self.status.get("attempt"):
            self._next_attempt("Resumed" if self.status.get("attempt") else "Started", 0.0)
        attempt = self.status["attempt"]
        learners = [p for p in pods if role(p) == LEARNER]
        current = [p for p in learners if attempt_of(p) == attempt]
        stale = [p for p in learners if attempt_of(p) != attempt]
        self._delete_live(stale)
        if not self.status.get("attemptLaunched"):
            return self._launch(current, stale)
        requeue = self._follow(current, self._heal_servers())
        if self.places and self.status.get("attemptLaunched") and self.status.get("phase") not in FINISHED:
            return self._unstick(current, requeue)
        return requeue

    def _hold(self, kind: str, reason: str, message: str, retry: float) -> float:
        """Wait for something outside the run (a Secret, a claim, a name): condition, event, retry."""
        if self.status.get("phase") in (None, "Pending"):
            self._phase("Pending", message)
        if (
            self._condition_of(kind).get("reason") != reason
            or self._condition_of(kind).get("status") != "False"
        ):
            self._event(reason, message, warning=True)
        self._condition(kind, False, reason, message)
        return retry

    def _surface_refusals(self, requeue: float | None) -> float | None:
        """Objects the API server refused (or whose names others hold): `Ready=False` with the first
        one's reason, the phase's message naming the object and quoting the API server, one Warning
        event when the reason changes (not per retry); look again when the next retry is due."""
        refusals = self.observed.refusals
        if not refusals or self.status.get("phase") in FINISHED | {"Suspended"}:
            return requeue
        (_, first), *others = sorted(refusals.items())
        message = first.message + (f" (and {len(others)} more objects refused)" if others else "")
        recorded = next(
            (c for c in (self.run.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {}
        )
        if (recorded.get("status"), recorded.get("reason")) != ("False", first.reason):
            self._event(first.reason, message, warning=True)
        # From the recorded condition, whatever this decision set before (its transition time stays).
        conditions = lifecycle.drop_condition(self.status.get("conditions") or [], "Ready")
        self.status["conditions"] = conditions + ([recorded] if recorded else [])
        self._condition("Ready", False, first.reason, message)
        self.status["message"] = message
        timers = [r.retry_in for r in refusals.values() if r.retry_in]
        return min([*timers, *([requeue] if requeue is not None else [])], default=None)

    def _ensure_shared_objects(self) -> None:
        """Create the claim, Services, ConfigMap and NetworkPolicy that are missing (whenever they are);
        replace the NetworkPolicy when the spec changed it, delete it when the spec turned it off."""
        desired = [*([self.desired.claim] if self.desired.claim else []), *self.desired.services]
        if self.desired.config_map is not None:
            desired.append(self.desired.config_map)
        observed = {
            "PersistentVolumeClaim": self.observed.claims,
            "Service": self.observed.services,
            "ConfigMap": self.observed.config_maps,
            "NetworkPolicy": self.observed.network_policies,
        }
        policy = self.desired.network_policy
        for name in self.observed.network_policies:
            if policy is None or policy["metadata"]["name"] != name:
                self.actions.append(Delete("NetworkPolicy", name))
        existing = self.observed.network_policies.get(policy["metadata"]["name"]) if policy else None
        changed = policy is not None and existing is not None and _spec_hash(existing) != _spec_hash(policy)
        if changed and not self.blocked:
            self.actions.append(Replace(policy))
        for obj in [*desired, *([policy] if policy else [])]:
            if obj["metadata"]["name"] not in observed[obj["kind"]]:
                self._create(obj)

    def _next_attempt(self, reason: str, delay: float) -> None:
        """Record the next learner attempt (launched once the old pods stopped and `delay` passed)."""
        attempt = self.status.get("attempt", 0) + 1
        self.status["attempt"] = attempt
        self.status["attemptLaunched"] = False
        self.status["restartAfter"] = timestamp(self.now + datetime.timedelta(seconds=delay))
        phase = "Pending" if attempt == 1 else "Restarting"
        self._phase(
            phase, f"{reason}: starting learner attempt {attempt}" + (f" in {delay:.0f}s" if delay else "")
        )
        self._condition("Ready", False, reason, self.status["message"])

    def _launch(self, current: list[Object], stale: list[Object]) -> float | None:
        """Start the attempt: once the old learners stopped, replace changed servers (under Kueue
        every server of the last group: its quota is released during the back-off); once the
        back-off passed, re-render the ConfigMap, then create the learners (and, under Kueue, the
        servers of the attempt's group) and, once they are created, record the attempt as launched."""
        attempt = self.status["attempt"]
        # Stopped learners of the last attempt stay for their logs; older ones go.
        for pod in stale:
            if attempt_of(pod) < attempt - 1 and not _deleting(pod):
                self._delete_pod(pod)
        stopping = sorted(p["metadata"]["name"] for p in stale if not lifecycle.stopped(p))
        if stopping:
            why = self._condition_of("Ready").get("message") or f"learner attempt {attempt}"
            waiting = f"waiting for {', '.join(stopping)} to stop (they save a checkpoint)"
            self._phase("Restarting", f"{why}; {waiting}")
            return None
        servers_replaced = self._replace_changed_servers()
        wait = (parse_timestamp(self.status["restartAfter"]) - self.now).total_seconds()
        if wait > 0:
            return wait
        if not servers_replaced:
            self._phase("Restarting", "waiting for changed rollout/teacher pods to be replaced")
            return None
        if self.blocked:
            return None  # launched when the refused creates are retried (see _surface_refusals)
        if self.places:
            node = self._place()
            if node is None:
                return PLACEMENT_RETRY_SECONDS
            leaving = self._leave_other_nodes(node)
            if leaving:
                self._phase(
                    self.status["phase"], f"moving to node {node}: waiting for {', '.join(leaving)} to go"
                )
                return None
        config_map = self.desired.config_map
        observed = self.observed.config_maps.get(config_map["metadata"]["name"]) if config_map else None
        if config_map is not None and observed is not None and observed.get("data") != config_map["data"]:
            self.actions.append(Replace(config_map))
        self._heal_servers()
        nodes = self.spec["learner"]["nodes"]
        existing = {p["metadata"]["name"] for p in current}
        for rank in range(nodes):
            pod = builders.build_learner_pod(self.run, rank, attempt, self.desired.cluster_domain)
            if pod["metadata"]["name"] not in existing:
                self._create(self._queued(self._colocated(pod)))
        # Launched once the learners exist: recorded after their creates (a crash between the two
        # makes the next reconcile find them under the same names), never before (an attempt
        # recorded as launched whose learners are missing would count as preempted).
        self.record_after = len(existing) < nodes
        self.status["attemptLaunched"] = True
        self.status["maxStaleness"] = self.desired.max_staleness  # what this attempt's config says
        self.status.setdefault("startTime", timestamp(self.now))
        self.status["conditions"] = lifecycle.drop_condition(
            self.status.get("conditions") or [], "SpecChangeDeferred"
        )
        if self.queue:
            where = f"Kueue pod group {self._group()} in LocalQueue {self.queue!r}"
            self._phase("Pending", f"learner attempt {attempt}: {where}")
        else:
            self._phase("Initializing", f"learner attempt {attempt}: {nodes} pods created")
        self._event("AttemptStarted", f"created the learner pods of attempt {attempt}")
        return 0.0

    def _replace_changed_servers(self) -> bool:
        """At an attempt's start: delete servers whose spec changed, that are gone from the spec or,
        under Kueue, that belong to an earlier attempt's pod group (every attempt is one group: see
        operator/README.md). True when none is left to wait for: without Kueue, until they are gone
        (the replacement takes the name); in a Kueue group, until they stopped."""
        waiting = False
        group = self._group()
        for pod in self.observed.pods.values():
            if role(pod) not in SERVER_ROLES:
                continue
            wanted = self.desired.servers.get(slot(pod))
            annotations = pod["metadata"].get("annotations") or {}
            if (
                wanted is None
                or kueue.group_of(pod) != group
                or annotations.get(names.ANNOTATION_SPEC_HASH)
                != (wanted["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH])
            ):
                if not _deleting(pod):
                    self._delete_pod(pod)
                waiting = waiting or (wanted is not None and (group is None or not lifecycle.stopped(pod)))
        return not waiting

    def _servers_of(self, server: str) -> list[Object]:
        """The pods of one server slot (the pod, and under Kueue its stopped predecessors)."""
        return [p for p in self.observed.pods.values() if role(p) in SERVER_ROLES and slot(p) == server]

    def _heal_servers(self) -> str | None:
        """Create missing rollout/teacher pods and delete stopped ones; returns why the attempt cannot
        go on, if a server cannot be replaced.

        Without Kueue a replacement takes the stopped pod's name once it is gone. In a Kueue pod group
        it joins the group at once under a name of its own (Kueue releases a stopped pod only when its
        replacement exists, and the admitted group ungates it: it never queues), once the pod it
        replaces no longer counts for Kueue; a server that exited 0 counts for good, so the attempt
        restarts as a new group."""
        group = self._group()
        for server, wanted in self.desired.servers.items():
            pods = self._servers_of(server)
            for pod in pods:  # (an earlier group's are replaced when an attempt starts)
                if kueue.group_of(pod) == group and lifecycle.is_terminated(pod) and not _deleting(pod):
                    what = f"{pod['metadata']['name']} stopped ({pod['status'].get('phase')})"
                    self._event("ServerLost", f"{what}; replacing it", warning=True)
                    self._delete_pod(pod)
            if group is None:
                if not pods:
                    self._create_server(server, wanted)
                continue
            members = [p for p in pods if kueue.group_of(p) == group]
            if any(kueue.holds_quota_slot(p) and not lifecycle.is_terminated(p) for p in members):
                continue
            if any(kueue.holds_quota_slot(p) for p in members):  # exited 0 inside the group
                return f"{server}: exited 0, which Kueue counts as done for its pod group {group}"
            self._create_server(server, wanted)
        return None

    def _create_server(self, server: str, wanted: Object) -> None:
        if self.places and "placement" not in self.status and self._place() is None:
            return  # (a run launched before the operator placed it: by an earlier version, say)
        pod = self._colocated(wanted)
        if self.queue:  # <server>-a<attempt>, then -1, -2, ... for its replacements in the group
            base = name = f"{server}-a{self.status['attempt']}"
            n = 0
            while name in self.observed.pods:
                n += 1
                name = f"{base}-{n}"
            pod = {**pod, "metadata": {**pod["metadata"], "name": name}}
        retry = self._refused("Pod", pod["metadata"]["name"])  # its refusal is the news, not each retry
        if self._create(self._queued(pod)) and self.status.get("attemptLaunched") and not retry:
            self._event("ServerRecreated", f"recreated {server} as {pod['metadata']['name']}", warning=True)

    def _follow(self, current: list[Object], server_blocked: str | None = None) -> float | None:
        waiting = self._admission()
        gang = lifecycle.assess_gang(current, self.spec["learner"]["nodes"])
        if server_blocked and gang.verdict in (Verdict.STARTING, Verdict.RUNNING):
            gang = GangState(Verdict.PREEMPTED, server_blocked)
        if gang.verdict is Verdict.BAD_CONFIG:
            return self._fail("BadConfig", gang.message)
        if gang.verdict is Verdict.PREEMPTED:
            self.status["preemptions"] = self.status.get("preemptions", 0) + 1
            self._event(
                "Preempted", f"{gang.message}; restarting all learners from the latest checkpoint", True
            )
            self._next_attempt("Preempted", 0.0)
            self._delete_live(current)
            return 0.0
        if gang.verdict is Verdict.FAILED:
            restarts = self.status.get("restarts", 0) + 1
            self.status["restarts"] = restarts
            limit = self.spec["restartPolicy"]["backoffLimit"]
            if restarts > limit:
                return self._fail(
                    "BackoffLimitExceeded", f"{gang.message}; {restarts} failures, backoffLimit {limit}"
                )
            delay = lifecycle.backoff_seconds(self.spec["restartPolicy"], restarts)
            self._event("LearnerFailed", f"{gang.message}; restart {restarts}/{limit} in {delay:.0f}s", True)
            self._next_attempt("LearnerFailed", delay)
            self._delete_live(current)
            return 0.0
        if gang.verdict is Verdict.SUCCEEDED:
            self._phase("Succeeded", gang.message)
            self.status["completionTime"] = timestamp(self.now)
            # Exit 0 means every step ran (rlsd_contracts.exit_codes), whatever the last scrape saw.
            config_map = self.desired.config_map
            ran = self.observed.config_maps.get(config_map["metadata"]["name"]) if config_map else None
            if ran is not None:
                self.status["step"] = builders.total_steps(ran)
            self._condition("Ready", False, "Succeeded", gang.message)
            self._condition("Completed", True, "AllLearnersExited0", gang.message)
            self._event("Succeeded", gang.message)
            return self._finished()
        self._note_deferred_changes()
        if waiting:
            return None
        servers = [self._live_server(server) for server in self.desired.servers]
        if gang.verdict is Verdict.RUNNING and all(
            p is not None and (p.get("status") or {}).get("phase") == "Running" for p in servers
        ):
            if self.status.get("phase") != "Running":
                self._event("Running", "every learner and server pod is running")
            self._phase("Running", "every learner and server pod is running")
            self._condition("Ready", True, "Running", "every learner and server pod is running")
            self._progress()
            return SCRAPE_SECONDS
        self._phase("Initializing", gang.message or "waiting for rollout/teacher pods")
        return None

    def _live_server(self, server: str) -> Object | None:
        group = self._group()
        live = [
            p
            for p in self._servers_of(server)
            if kueue.group_of(p) == group and not _deleting(p) and not lifecycle.is_terminated(p)
        ]
        return live[0] if live else None

    def _admission(self) -> bool:
        """The `Admitted` condition of a queued run's current pod group; True while Kueue holds the
        group back (the run is Pending, with Kueue's reason; `Ready` is False, reason `Queued`, which
        `kubectl get rlsd` shows)."""
        group = self._group()
        if group is None:
            conditions = self.status.get("conditions") or []
            self.status["conditions"] = lifecycle.drop_condition(conditions, "Admitted")
            return False
        members = [p for p in self.observed.pods.values() if kueue.group_of(p) == group and not _deleting(p)]
        workload = self.observed.workloads.get(group)
        previous = self._condition_of("Admitted")
        if not kueue.admitted(workload) and any(kueue.gated(p) for p in members):
            reason, message = kueue.waiting_reason(workload, self.queue, group)
            if previous.get("status") != "False" or previous.get("reason") == "NotManagedByKueue":
                self._event("Queued", message)
            self._condition("Admitted", False, reason, message)
            self._condition("Ready", False, "Queued", message)
            self._phase("Pending", message)
            return True
        if members and not all(kueue.managed(p) for p in members):
            message = (
                f"the run's queue is {self.queue!r}, but Kueue did not take its pods (is Kueue installed, "
                "with the pod integration on and this namespace in its managedJobsNamespaceSelector?): "
                "they run without queueing"
            )
            if previous.get("reason") != "NotManagedByKueue":
                self._event("NotManagedByKueue", message, warning=True)
            self._condition("Admitted", False, "NotManagedByKueue", message)
            return False
        if members:
            message = kueue.admitted_message(workload, self.queue, group)
            if previous.get("status") != "True":
                self._event("Admitted", message)
            self._condition("Admitted", True, "Admitted", message)
            if self._condition_of("Ready").get("reason") == "Queued":  # no longer why it waits
                self._condition("Ready", False, "Admitted", message)
        return False

    def _progress(self) -> None:
        """Step, reward, accuracy, rollout staleness and latest checkpoint from learner rank 0's
        metrics, when scraped; a failed scrape is a condition, never an error."""
        progress = self.observed.progress
        if progress is None:
            return
        if progress.values is None:
            self._condition(
                "MetricsAvailable", False, "ScrapeFailed", f"{progress.url}: {progress.error}"[:500]
            )
            return
        for key in ("step", "latestCheckpointStep", "staleness"):
            if key in progress.values:
                self.status[key] = int(progress.values[key])
        for key in ("reward", "accuracy"):
            if key in progress.values:
                self.status[key] = round(progress.values[key], 6)
        self._condition("MetricsAvailable", True, "Scraped", progress.url)

    def _note_deferred_changes(self) -> None:
        config_map = self.desired.config_map
        observed = self.observed.config_maps.get(config_map["metadata"]["name"]) if config_map else None
        applied_json = ((observed or {}).get("data") or {}).get(names.APPLIED_SPEC_FILE)
        changed = lifecycle.deferred_fields(json.loads(applied_json), self.spec) if applied_json else []
        if changed:
            message = (
                f"{', '.join(changed)} changed; applied at the next learner attempt "
                "(suspend and resume to apply now)"
            )
            if self._condition_of("SpecChangeDeferred").get("message") != message:
                self._event("SpecChangeDeferred", message)
            self._condition("SpecChangeDeferred", True, "RunningAttempt", message)
        else:
            self.status["conditions"] = lifecycle.drop_condition(
                self.status.get("conditions") or [], "SpecChangeDeferred"
            )

    def _suspend(self, pods: list[Object]) -> float | None:
        self._delete_live(pods)
        running = sorted(p["metadata"]["name"] for p in pods if not lifecycle.is_terminated(p))
        if self.status.get("phase") != "Suspended":
            self._event("Suspended", "spec.suspend is true: stopping all pods (learners save a checkpoint)")
        self._phase("Suspended", f"stopping {', '.join(running)}" if running else "all pods stopped")
        self._condition("Ready", False, "Suspended", "spec.suspend is true")
        return None

    def _fail(self, reason: str, message: str) -> float | None:
        """Failed for good: the learners still running stop (they save a checkpoint), servers go."""
        self._phase("Failed", message)
        self.status["completionTime"] = timestamp(self.now)
        self._condition("Ready", False, reason, message)
        self._condition("Failed", True, reason, message)
        self._event(reason, message, warning=True)
        return self._finished()

    def _finished(self) -> float | None:
        """A finished run keeps its stopped learner pods (for their logs) and frees every GPU."""
        self._delete_live([p for p in self.observed.pods.values() if role(p) == LEARNER])
        for pod in self.observed.pods.values():
            if role(pod) in SERVER_ROLES and not _deleting(pod):
                self._delete_pod(pod)
        ttl = self.spec.get("ttlSecondsAfterFinished")
        if ttl is None or not self.status.get("completionTime"):
            return None
        left = (parse_timestamp(self.status["completionTime"]) - self.now).total_seconds() + ttl
        if left > 0:
            return left
        self._event("Deleted", f"ttlSecondsAfterFinished ({ttl}s) passed")
        self.actions.append(DeleteRun())
        return None
