"""kopf handlers: watch runs and the objects they own, and reconcile each run in its own task.

Events only file the object (`cache.OwnedObjects`, the run's body) and wake the run's task; the task
reads what it needs from memory, asks `decide` what to do, records the decision in the run's status
*before* acting, then acts: its creates and deletes run concurrently in the API thread pool (at most
RUN_CALLS of one run at a time, so one huge run never starves the others). Many runs reconcile at
once, one asyncio task each; events that arrive during a reconcile fold into the next one.

No finalizer is involved (kopf's daemons and timers would add one): deleting a run never waits for
the operator, and the garbage collector removes what the run owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import os
import secrets
import time
from typing import Any

import aiohttp
import kopf
from kubernetes import client

from rlsd_operator import admission, builders, decide, kueue, metrics, names, placement
from rlsd_operator.cache import OwnedObjects, RunKey, controller_owner
from rlsd_operator.decide import (
    Create,
    Decision,
    Delete,
    DeleteRun,
    Desired,
    Event,
    Observed,
    Progress,
    Refusal,
    Replace,
)
from rlsd_operator.kube import API_GROUPS, OWNED_KINDS, Kube, absent, connection_info, load_configuration

Object = dict[str, Any]
log = logging.getLogger("rlsd_operator")

CLUSTER_DOMAIN = os.environ.get("RLSD_CLUSTER_DOMAIN", "cluster.local")
# API calls of one run in flight at once.
RUN_CALLS = 8
ERROR_RETRY_SECONDS = 5.0
SCRAPE_TIMEOUT_SECONDS = 3.0
# Namespaces the operator watches (main sets them; empty: all).
WATCHED_NAMESPACES: list[str] = []
# The runs' NetworkPolicy defaults (RLSD_OPERATOR_NETWORK_POLICY, read at start-up).
NETWORK_POLICY = builders.NetworkPolicyDefaults()
# A ResourceQuota that frees room retries the creates it refused at once, but no sooner than this
# after they were refused: quota usage changes with every pod of a busy namespace.
QUOTA_RETRY_SECONDS = 2.0
# How long the nodes and pods read to place a run serve the next runs to place (every run waiting for
# a node with room looks again every decide.PLACEMENT_RETRY_SECONDS: one read serves them all).
CLUSTER_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class PendingRefusal:
    """A create the API server refused: why, when it was refused and when to retry it (monotonic)."""

    reason: str
    message: str
    refused_at: float
    until: float


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RunReconciler:
    """Reconciles one run; `reconcile()` returns when it wants to run again (seconds) or None."""

    def __init__(self, runs: Runs, key: RunKey) -> None:
        self.runs = runs
        self.kube = runs.kube
        self.key = key
        self.namespace, self.name = key
        self.calls = asyncio.Semaphore(RUN_CALLS)
        self.gone = False
        self.phase: str | None = None
        # The status as this operator last wrote it: newer than a watch event that may still be on
        # its way (only this operator writes it).
        self.status: Object | None = None
        self.uid: str | None = None
        self.references: decide.References | None = None
        self.references_at = 0.0
        self.references_generation: int | None = None
        self.desired: tuple[tuple[Any, ...], Desired] | None = None
        # "Kind/name" -> the create the API server refused, until it is retried and goes through.
        self.refusals: dict[str, PendingRefusal] = {}
        # Refused retries in a row (the back-off), and what the writes of one reconcile had refused.
        self.refused_retries = 0
        self.just_refused: dict[str, tuple[str, str]] = {}
        self.last_scrape = 0.0
        # Whether the run's token Secret is known to exist (checked once per run and operator start).
        self.token_ready = False
        # The scrape under way, and the latest one's result with the attempt it read.
        self.scraping: asyncio.Task[None] | None = None
        self.progress: tuple[int, Progress] | None = None

    # -- observing --------------------------------------------------------------------------------

    async def _references(self, run: Object) -> decide.References:
        """The Secrets and claim the spec names: looked up once per spec, and again every
        REFERENCE_RETRY_SECONDS while one is missing (nothing the operator watches says it appeared)."""
        generation = run["metadata"].get("generation")
        if self.references is not None and self.references_generation == generation:
            due = time.monotonic() - self.references_at >= decide.REFERENCE_RETRY_SECONDS
            if not (self.references.missing and due):
                return self.references
        spec = run["spec"]
        read = builders.secret_keys_read(spec)
        secrets = [s["name"] for s in spec.get("imagePullSecrets") or []]
        claim = spec["checkpoint"]["volume"].get("claimName")
        modes = await self._api(self.kube.claim_access_modes, self.namespace, claim) if claim else []
        keys = await asyncio.gather(
            *(self._api(self.kube.secret_keys, self.namespace, ref["name"]) for _, ref in read)
        )
        pulls = await asyncio.gather(*(self._api(self.kube.secret_keys, self.namespace, s) for s in secrets))
        unread = (
            ("MissingSecret", f"{field}: Secret {ref['name']!r} not found")
            if found is None
            else ("MissingSecretKey", f"{field}: Secret {ref['name']!r} has no key {ref['key']!r}")
            for (field, ref), found in zip(read, keys, strict=True)
            if found is None or ref["key"] not in found
        )
        unpulled = (
            ("MissingImagePullSecret", f"imagePullSecrets: Secret {name!r} not found")
            for name, found in zip(secrets, pulls, strict=True)
            if found is None
        )
        unclaimed = (
            [("MissingClaim", f"checkpoint.volume.claimName: PersistentVolumeClaim {claim!r} not found")]
            if modes is None
            else []
        )
        missing = next(itertools.chain(unread, unpulled, unclaimed), None)
        self.references = decide.References(missing, tuple(modes or ()))
        self.references_at, self.references_generation = time.monotonic(), generation
        return self.references

    async def _run_token(self, run: Object) -> tuple[str, str] | None:
        """Makes the run's token Secret (a random value, never logged) unless it exists; (reason,
        message) when it cannot be had, which holds the run like a missing reference. No rotation:
        the servers, which outlive learner attempts, keep the token they started with."""
        if self.token_ready:
            return None
        name = names.run_token_name(self.name)
        existing = await self._api(self.kube.read, "Secret", self.namespace, name)
        if existing is None:
            try:
                await self._api(
                    self.kube.create, self.namespace, builders.build_run_token(run, secrets.token_urlsafe(32))
                )
            except client.ApiException as exc:
                message = _api_message(exc)
                if exc.status == 409:  # made meanwhile (an earlier operator's create): check its owner
                    existing = await self._api(self.kube.read, "Secret", self.namespace, name)
                elif admission.is_refusal(exc.status, message):
                    return admission.refusal("Secret", name, exc.status, message)
                else:
                    raise
        owner = controller_owner(existing) if existing is not None else {"uid": self.uid}
        if owner is None or owner.get("uid") != self.uid:
            return (
                "NameConflict",
                f"Secret {name} exists and is not this run's (the run's token goes there)",
            )
        self.token_ready = True
        return None

    async def _desired(self, run: Object, references: decide.References) -> Desired:
        """What the spec asks for, built once per spec generation and claim (in a thread: a run with
        hundreds of server pods takes a while to build, and the event loop must not wait)."""
        key = (run["metadata"].get("generation"), references.claim_access_modes, CLUSTER_DOMAIN)
        if self.desired is None or self.desired[0] != key:
            self.desired = (
                key,
                await asyncio.to_thread(decide.desire, run, CLUSTER_DOMAIN, references, NETWORK_POLICY),
            )
        return self.desired[1]

    def _observed(self, run: Object, references: decide.References, progress: Progress | None) -> Observed:
        uid = run["metadata"]["uid"]
        mine: dict[str, dict[str, Object]] = {kind: {} for kind in OWNED_KINDS.values()}
        now = time.monotonic()
        refusals = {
            what: Refusal(r.reason, r.message, max(r.until - now, 0.0)) for what, r in self.refusals.items()
        }
        for kind, objects in self.runs.cache.of_run(self.key).items():
            for name, obj in objects.items():
                owner = controller_owner(obj)
                if owner is not None and owner.get("uid") == uid:
                    mine[kind][name] = obj
                else:
                    refusals[f"{kind}/{name}"] = Refusal(
                        "NameConflict",
                        f"{kind} {name} belongs to an earlier run {self.name!r} (waiting until it is gone)",
                    )
        return Observed(
            now=_now(),
            pods=mine["Pod"],
            services=mine["Service"],
            config_maps=mine["ConfigMap"],
            claims=mine["PersistentVolumeClaim"],
            network_policies=mine["NetworkPolicy"],
            refusals=refusals,
            references=references,
            progress=progress,
            workloads=self.runs.cache.workloads_of(self.key),
        )

    async def _with_cluster(self, run: Object, observed: Observed) -> Observed:
        """`observed` with the nodes and their pods, and the node affinity of the checkpoint claim's
        volume (a local volume, or a zonal disk, holds the run to its nodes)."""
        claim = run["spec"]["checkpoint"]["volume"].get("claimName") or names.claim_name(self.name)
        cluster, volume = await asyncio.gather(
            self.runs.cluster(), self._api(self.kube.volume_affinity, self.namespace, claim)
        )
        return dataclasses.replace(observed, cluster=cluster, volume_affinity=volume)

    def _scrape(self, run: Object) -> Progress | None:
        """The latest scrape of this attempt's learner rank 0 (None before the first), and the next
        one started in the background when SCRAPE_SECONDS have passed: a reconcile never waits on the
        network, and a scrape that ends wakes the run. Read from the pod's own address, never from a
        name or URL a run's author could point elsewhere."""
        status = run.get("status") or {}
        if status.get("phase") != "Running":
            return None
        attempt = status.get("attempt")
        idle = self.scraping is None or self.scraping.done()
        if idle and time.monotonic() - self.last_scrape >= decide.SCRAPE_SECONDS:
            pods = self.runs.cache.of_run(self.key).get("Pod", {})
            mine = {n: pod for n, pod in pods.items() if (controller_owner(pod) or {}).get("uid") == self.uid}
            source = decide.progress_source(mine, attempt)
            if source is not None:
                self.last_scrape = time.monotonic()
                url = names.metrics_url(source["status"]["podIP"])
                self.scraping = asyncio.create_task(self._fetch_progress(url, attempt))
        return self.progress[1] if self.progress and self.progress[0] == attempt else None

    async def _fetch_progress(self, url: str, attempt: int) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
            async with self.runs.http().get(url, timeout=timeout) as response:
                response.raise_for_status()
                progress = Progress(url, metrics.parse_progress(await response.text()))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            metrics.ERRORS.labels("scrape").inc()
            progress = Progress(url, error=repr(exc))
        self.progress = (attempt, progress)
        if self.key in self.runs.bodies:
            self.runs.wake(self.key)

    def close(self) -> None:
        if self.scraping is not None:
            self.scraping.cancel()

    # -- the loop body ----------------------------------------------------------------------------

    async def reconcile(self) -> float | None:
        body = self.runs.bodies.get(self.key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.gone = body is None
            return None
        if body["metadata"]["uid"] != self.uid:  # a new run of the same name
            self.uid, self.status, self.desired, self.refusals = body["metadata"]["uid"], None, None, {}
            self.references, self.refused_retries, self.progress = None, 0, None
            self.token_ready = False
        run = {**body, "status": self.status if self.status is not None else body.get("status") or {}}
        with metrics.RECONCILE_SECONDS.time():
            references = await self._references(run)
            if (token_problem := await self._run_token(run)) and not references.missing:
                references = dataclasses.replace(references, missing=token_problem)
            desired = await self._desired(run, references)
            progress = self._scrape(run)
            due = {what for what, refusal in self.refusals.items() if refusal.until <= time.monotonic()}
            observed = self._observed(run, references, progress)
            decision = decide.decide(run, desired, observed)
            if decision.needs_cluster:  # the run is to be placed: read where it can go, decide again
                decision = decide.decide(run, desired, await self._with_cluster(run, observed))
            if (decision.status.get("placement") or {}) != (run["status"].get("placement") or {}):
                self.runs.forget_cluster()  # the next run placed sees this one's pods
            if not decision.record_after and not await self._record(run, decision):
                return None
            self.just_refused = {}
            acted = await self._act(decision)
            self._settle_refusals(due)
            if decision.record_after:
                if self.just_refused:
                    return 0.0  # a create was refused: what was decided did not happen
                if not await self._record(run, decision):
                    return None
            for event in decision.actions:
                if isinstance(event, Event):
                    self._post(run, event)
        self.phase = decision.status.get("phase")
        # What was just done is in the cache already: look again at once, until nothing is left to do.
        return 0.0 if acted else decision.requeue

    async def _api(self, method: Any, *args: Any) -> Any:
        async with self.calls:
            return await method(*args)

    async def _record(self, run: Object, decision: Decision) -> bool:
        """Patch what changed in the status (before acting on it, unless the decision says it may
        follow); False when the run is gone."""
        saved = run.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if saved.get(k) != v}
        if patch:
            try:
                response = await self._api(self.kube.patch_run_status, self.namespace, self.name, patch)
            except client.ApiException as exc:
                if absent(exc):  # deleted meanwhile: nothing left to do
                    self.gone = True
                    return False
                raise
            self.status = response.get("status") or {}
        elif self.status is None:
            self.status = saved
        return True

    async def _act(self, decision: Decision) -> bool:
        """Carry out the decision's actions but its events; True when an owned object was created,
        replaced or deleted (the next reconcile sees the result in the cache at once)."""
        # A re-rendered ConfigMap first (the attempt's learners read it); creates and deletes at once
        # (a pod created before its ConfigMap or claim waits for it in the kubelet or the scheduler).
        replaces = [a for a in decision.actions if isinstance(a, Replace)]
        rest = [a for a in decision.actions if not isinstance(a, Event | Replace)]
        for stage in (replaces, rest):
            await asyncio.gather(*(self._do(action) for action in stage))
        return any(not isinstance(action, DeleteRun) for action in replaces + rest)

    async def _do(self, action: Create | Replace | Delete | DeleteRun) -> None:
        if isinstance(action, Create):
            await self._create(action.obj)
        elif isinstance(action, Replace):
            replaced = await self._write(self.kube.replace, action.obj)
            if replaced is not None:
                self.runs.cache.observe(replaced["kind"], "MODIFIED", replaced)
        elif isinstance(action, Delete):
            gone = not await self._api(self.kube.delete, action.kind, self.namespace, action.name)
            self.runs.cache.deleting(self.key, action.kind, action.name, gone)
        else:
            await self._api(self.kube.delete_run, self.namespace, self.name)

    async def _create(self, obj: Object) -> None:
        created = await self._write(self.kube.create, obj)
        if created is not None:
            self.runs.cache.created(obj["kind"], created)

    async def _write(self, write: Any, obj: Object) -> Object | None:
        """`write(namespace, obj)`, a create or a replace: the object written, or None when the API
        server refused it (recorded in `just_refused`: surfaced, retried later) or the namespace goes."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            return await self._api(write, self.namespace, obj)
        except client.ApiException as exc:
            message = _api_message(exc)
            if exc.status == 409:
                return await self._name_taken(obj)
            if _namespace_terminating(exc):
                self.gone = True  # the run goes with its namespace: nothing to do or report
            elif admission.is_refusal(exc.status, message):
                self.just_refused[f"{kind}/{name}"] = admission.refusal(kind, name, exc.status, message)
            else:
                raise
            return None

    async def _name_taken(self, obj: Object) -> Object | None:
        """A create found its name taken: made by an earlier operator before its watch events reached
        this one (the object, which is ours), or held by someone else (a refusal; None)."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        existing = await self._api(self.kube.read, kind, self.namespace, name)
        owner = controller_owner(existing) if existing else None
        if owner is not None and owner.get("uid") == self.uid:
            return existing
        who = f"is owned by {owner['kind']} {owner['name']}" if owner else "is not owned by this run"
        self.just_refused[f"{kind}/{name}"] = ("NameConflict", f"{kind} {name} exists and {who}")
        return None

    def _settle_refusals(self, due: set[str]) -> None:
        """After a reconcile's writes: the retried creates that went through are no longer refused;
        those refused now (again) are retried after the back-off, which grows while they keep failing."""
        for what in due - set(self.just_refused):
            self.refusals.pop(what, None)
        if self.just_refused:
            self.refused_retries += 1
            now = time.monotonic()
            until = now + decide.refusal_retry_seconds(self.refused_retries)
            for what, (reason, message) in self.just_refused.items():
                self.refusals[what] = PendingRefusal(reason, message, now, until)
        elif not self.refusals:
            self.refused_retries = 0

    def quota_freed(self) -> bool:
        """A ResourceQuota of the run's namespace has room again: creates it refused are retried now
        (but no sooner than QUOTA_RETRY_SECONDS after they were refused). Whether there were any."""
        freed = False
        for what, refusal in self.refusals.items():
            if refusal.reason in admission.QUOTA_REASONS:
                until = min(refusal.until, refusal.refused_at + QUOTA_RETRY_SECONDS)
                self.refusals[what] = dataclasses.replace(refusal, until=until)
                freed = True
        return freed

    def _post(self, run: Object, event: Event) -> None:
        """One decision: an Event on the run, one log line, and the counters it moves."""
        (log.warning if event.warning else log.info)(
            "%s/%s: %s: %s", self.namespace, self.name, event.reason, event.message
        )
        (kopf.warn if event.warning else kopf.info)(run, reason=event.reason, message=event.message[:1000])
        if event.reason == "Preempted":
            metrics.PREEMPTIONS.inc()
        elif event.reason == "LearnerFailed":
            metrics.RESTARTS.inc()


def _namespace_terminating(exc: client.ApiException) -> bool:
    return exc.status == 403 and "NamespaceTerminating" in (exc.body or "")


def _api_message(exc: client.ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: the operator has event handlers only (no on.create/update/resume), so kopf never
    compares an object with its last-handled state, and building that state (a deep copy of every
    event's object) would be wasted work on every pod event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class Runs:
    """The reconcile loops of all runs this operator sees, one asyncio task per run."""

    def __init__(self, kube: Kube, cache: OwnedObjects) -> None:
        self.kube = kube
        self.cache = cache
        self._http: aiohttp.ClientSession | None = None
        self.bodies: dict[RunKey, Object] = {}
        self.wakeups: dict[RunKey, asyncio.Event] = {}
        self.tasks: dict[RunKey, asyncio.Task[None]] = {}
        self.reconcilers: dict[RunKey, RunReconciler] = {}
        self.phases: dict[RunKey, str] = {}
        # The ResourceQuotas last seen, by (namespace, name): a change that frees room wakes the runs
        # of that namespace that a quota refused.
        self.quotas: dict[tuple[str, str], Object] = {}
        # The nodes and their pods as last read to place a run (monotonic time of the read), read by one
        # run at a time: never watched (every pod of the cluster), read only when a run is placed.
        self._cluster: tuple[float, placement.Cluster] | None = None
        self._cluster_read = asyncio.Lock()

    def http(self) -> aiohttp.ClientSession:
        """One HTTP client for every run's scrapes (its connections are kept between scrapes)."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def cluster(self) -> placement.Cluster:
        """The nodes and what their pods take, read again when older than CLUSTER_SECONDS."""
        async with self._cluster_read:
            if self._cluster is None or time.monotonic() - self._cluster[0] >= CLUSTER_SECONDS:
                nodes, pods = await asyncio.gather(self.kube.nodes(), self.kube.unfinished_pods())
                self._cluster = (time.monotonic(), await asyncio.to_thread(placement.cluster, nodes, pods))
            return self._cluster[1]

    def forget_cluster(self) -> None:
        self._cluster = None

    def on_run(self, event_type: str | None, body: Object) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.bodies.pop(key, None)
            self.forget(key)
            self.cache.forget(key)
        else:
            self.bodies[key] = body
            self.wake(key)

    def on_owned(self, kind: str, event_type: str | None, obj: Object) -> None:
        key = self.cache.observe(kind, event_type, obj)
        if key is not None and key in self.bodies:
            self.wake(key)

    def on_quota(self, event_type: str | None, quota: Object) -> None:
        namespace = quota["metadata"]["namespace"]
        key = (namespace, quota["metadata"]["name"])
        old = self.quotas.get(key)
        new = None if event_type == "DELETED" else quota
        if new is None:
            self.quotas.pop(key, None)
        else:
            self.quotas[key] = new
        if not admission.quota_freed(old, new):
            return
        for run, reconciler in list(self.reconcilers.items()):
            if run[0] == namespace and reconciler.quota_freed():
                self.wake(run)

    def on_workload(self, event_type: str | None, obj: Object) -> None:
        key = self.cache.observe_workload(event_type, obj)
        if key is not None and key in self.bodies:
            self.wake(key)

    def wake(self, key: RunKey) -> None:
        if key not in self.tasks or self.tasks[key].done():
            self.wakeups[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._loop(key), name=f"rlsdrun {key[0]}/{key[1]}")
        self.wakeups[key].set()

    async def _loop(self, key: RunKey) -> None:
        reconciler = self.reconcilers[key] = RunReconciler(self, key)
        wakeup = self.wakeups[key]
        try:
            while True:
                wakeup.clear()
                try:
                    delay = await reconciler.reconcile()
                except asyncio.CancelledError:
                    raise
                except client.ApiException as exc:
                    if _namespace_terminating(exc):
                        return
                    metrics.ERRORS.labels("reconcile").inc()
                    log.warning(
                        "%s/%s: API error %s (%s); retrying in %.0fs",
                        *key, exc.status, _api_message(exc), ERROR_RETRY_SECONDS,
                    )  # fmt: skip
                    delay = ERROR_RETRY_SECONDS
                except Exception:
                    metrics.ERRORS.labels("reconcile").inc()
                    log.exception("%s/%s: reconcile failed; retrying in %.0fs", *key, ERROR_RETRY_SECONDS)
                    delay = ERROR_RETRY_SECONDS
                if reconciler.gone:
                    return
                if reconciler.phase:
                    self.phases[key] = reconciler.phase
                    metrics.publish_phases(self.phases)
                if delay == 0.0:
                    await asyncio.sleep(0)  # let other runs go first
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=delay)
        finally:
            reconciler.close()
            if self.reconcilers.get(key) is reconciler:
                del self.reconcilers[key]
            self.phases.pop(key, None)
            metrics.publish_phases(self.phases)

    def forget(self, key: RunKey) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self.wakeups.pop(key, None)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.kube.close()
        if self._http is not None:
            await self._http.close()


# -- kopf handlers, grouped by resource -------------------------------------------------------------


def _owned_resource(resource: kopf.Resource) -> bool:
    kind = OWNED_KINDS.get(resource.plural)
    return kind is not None and resource.group == API_GROUPS.get(kind, ("", "v1"))[0]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # A watch that silently stalls would stall every run: reconnect well before proxies drop it.
    settings.watching.server_timeout = int(os.environ.get("RLSD_OPERATOR_WATCH_SERVER_TIMEOUT", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    # Only the objects the operator made, filtered by the API server (not every pod of the cluster).
    settings.watching.label_selectors[_owned_resource] = f"{names.LABEL_APP}={names.APP}"
    # One replica (Deployment strategy Recreate): no peering objects needed in the cluster.
    settings.peering.standalone = True
    # The runs' namespaces and the CRD are known: no cluster-wide scanning (and no RBAC for it).
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # kopf logs a line per handled event ("Handler ... succeeded"); the operator logs its decisions.
    # ... and aiohttp one per /healthz probe.
    if os.environ.get("RLSD_OPERATOR_VERBOSE", "") not in ("1", "true"):
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    decide.SCRAPE_SECONDS = float(os.environ.get("RLSD_OPERATOR_SCRAPE_SECONDS", decide.SCRAPE_SECONDS))
    decide.REFERENCE_RETRY_SECONDS = float(
        os.environ.get("RLSD_OPERATOR_REFERENCE_RETRY_SECONDS", decide.REFERENCE_RETRY_SECONDS)
    )
    global NETWORK_POLICY
    try:
        NETWORK_POLICY = builders.NetworkPolicyDefaults.from_json(
            os.environ.get("RLSD_OPERATOR_NETWORK_POLICY", "")
        )
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from None
    decide.DEFAULT_QUEUE_NAME = os.environ.get("RLSD_OPERATOR_DEFAULT_QUEUE_NAME", decide.DEFAULT_QUEUE_NAME)
    kube = Kube(load_configuration())
    decide.PLACE_ON_NODES = await kube.may_place()
    if not decide.PLACE_ON_NODES:
        log.warning(
            "the operator may not list nodes and every namespace's pods (rbac.scope namespace): the pods "
            "of a run whose checkpoint claim is ReadWriteOnce follow each other by pod affinity, which a "
            "busy cluster can leave pending"
        )
    # Kueue's Workloads say why a queued run waits; watched when the cluster serves them (looked up
    # once: an operator started before Kueue was installed still queues runs, without Kueue's words).
    if await kube.serves(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS):
        _watch_workloads()
        log.info("Kueue's Workloads found: queued runs report why Kueue holds them back")
    cache = OwnedObjects()
    # What the runs own, before any run reconciles: a run reconciled before its pods were seen would
    # take them for lost.
    for plural, kind in OWNED_KINDS.items():
        for obj in await kube.list_owned(kind, WATCHED_NAMESPACES):
            cache.observe(kind, None, obj)
        log.debug("seeded %s", plural)
    memo.runs = Runs(kube, cache)


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return connection_info(load_configuration())


@kopf.on.cleanup()
async def stop_runs(memo: kopf.Memo, **_: Any) -> None:
    await memo.runs.stop()


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def on_run_event(event: Object, memo: kopf.Memo, **_: Any) -> None:
    memo.runs.on_run(event["type"], event["object"])


def _on_owned(kind: str) -> Any:
    async def on_owned_event(event: Object, memo: kopf.Memo, **_: Any) -> None:
        memo.runs.on_owned(kind, event["type"], event["object"])

    return on_owned_event


async def on_workload_event(event: Object, memo: kopf.Memo, **_: Any) -> None:
    memo.runs.on_workload(event["type"], event["object"])


_WORKLOAD_WATCH: list[Any] = []


def _watch_workloads() -> None:
    """Registers the Workload watch (at start-up, before kopf resolves what to watch), once per
    process (tests start the operator many times)."""
    if not _WORKLOAD_WATCH:
        handler = kopf.on.event(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS, id="on-workloads")
        _WORKLOAD_WATCH.append(handler(on_workload_event))


for _plural, _kind in OWNED_KINDS.items():
    _group, _version = API_GROUPS.get(_kind, ("", "v1"))
    kopf.on.event(_group, _version, _plural, labels={names.LABEL_APP: names.APP}, id=f"on-{_plural}")(
        _on_owned(_kind)
    )


@kopf.on.event("", "v1", "resourcequotas")
async def on_quota_event(event: Object, memo: kopf.Memo, **_: Any) -> None:
    memo.runs.on_quota(event["type"], event["object"])
