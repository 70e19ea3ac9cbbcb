"""kopf handlers: one level-triggered reconcile loop per RLSDRun.

Events on a run and on its pods only wake the run's loop; the loop reads the run and its pods from
the API server and makes the world match the spec. Every decision is recorded in the run's status
before it is acted on, so a reconcile interrupted at any point (operator killed, API error) is
redone from the start by the next one with the same result: names are deterministic and creation
tolerates objects that already exist.

No finalizer is involved (kopf's daemons and timers would add one): deleting a run never waits for
the operator, and the garbage collector removes what the run owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import logging
import os
import time
from typing import Any

import aiohttp
import kopf

from rlsd_operator import builders, lifecycle, metrics, names
from rlsd_operator.kube import Kube, connection_info, load_api_client
from rlsd_operator.lifecycle import FINISHED, Verdict
from rlsd_operator.trainer_config import spec_problems

Object = dict[str, Any]
log = logging.getLogger("rlsd_operator")

CLUSTER_DOMAIN = os.environ.get("RLSD_CLUSTER_DOMAIN", "cluster.local")
# How often learner rank 0's metrics are read into the status of a Running run.
SCRAPE_SECONDS = float(os.environ.get("RLSD_OPERATOR_SCRAPE_SECONDS", "15"))
# How often a run waiting for a missing Secret or claim looks again (nothing wakes it otherwise).
REFERENCE_RETRY_SECONDS = float(os.environ.get("RLSD_OPERATOR_REFERENCE_RETRY_SECONDS", "10"))
ERROR_RETRY_SECONDS = 5.0
SCRAPE_TIMEOUT_SECONDS = 3.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def _role(pod: Object) -> str:
    return pod["metadata"]["labels"].get(names.LABEL_ROLE, "")


def _attempt(pod: Object) -> int:
    return int(pod["metadata"]["labels"].get(names.LABEL_ATTEMPT, "0"))


class RunReconciler:
    """Reconciles one run; `reconcile()` returns when it wants to run again (seconds) or None."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.last_scrape = 0.0
        self.phase: str | None = None
        self.gone = False
        # The Services, claim and ConfigMap are created once per operator process (and per attempt).
        self.ensured = False

    async def _call(self, method: Any, *args: Any) -> Any:
        return await asyncio.to_thread(method, *args)

    # -- status -----------------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Patch what changed in the status, before acting on it."""
        patch = {k: v for k, v in self.status.items() if self.saved.get(k) != v}
        if patch:
            await self._call(self.kube.patch_run_status, self.namespace, self.name, patch)
            self.saved = copy.deepcopy(self.status)

    def _condition(self, kind: str, status: bool, reason: str, message: str = "") -> None:
        conditions = self.status.get("conditions") or []
        self.status["conditions"] = lifecycle.set_condition(
            conditions, kind, status, reason, message, self.now
        )

    def _condition_of(self, kind: str) -> Object:
        return next((c for c in self.status.get("conditions") or [] if c["type"] == kind), {})

    def _phase(self, phase: str, message: str) -> None:
        self.status["phase"] = phase
        self.status["message"] = message

    def _event(self, reason: str, message: str, warning: bool = False) -> None:
        (kopf.warn if warning else kopf.info)(self.run, reason=reason, message=message)

    # -- the loop body ----------------------------------------------------------------------------

    async def reconcile(self) -> float | None:
        run = await self._call(self.kube.get_run, self.namespace, self.name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            self.gone = True
            return None
        self.run = run
        self.saved = run.get("status") or {}
        self.status = copy.deepcopy(self.saved)
        self.now = _timestamp(_now())
        with metrics.RECONCILE_SECONDS.time():
            delay = await self._reconcile(run["spec"])
            await self._flush()
        self.phase = self.status.get("phase")
        return delay

    async def _reconcile(self, spec: Object) -> float | None:
        if self.status.get("phase") in FINISHED:
            return await self._finished(spec)
        problems = spec_problems(spec)
        if problems:
            await self._fail("InvalidSpec", "; ".join(problems))
            return None
        missing = await self._missing_references(spec)
        if missing:
            reason, message = missing
            if self.status.get("phase") is None or self.status.get("phase") == "Pending":
                self._phase("Pending", message)
            if self._condition_of("ReferencesResolved").get("reason") != reason:
                self._event(reason, message, warning=True)
            self._condition("ReferencesResolved", False, reason, message)
            return REFERENCE_RETRY_SECONDS
        self._condition("ReferencesResolved", True, "Found", "every Secret and claim the spec names exists")
        if not self.ensured:
            await self._ensure_shared_objects(replace_config=False)

        pods = await self._call(self.kube.list_pods, self.namespace, self.name)
        if spec["suspend"]:
            return await self._suspend(pods)
        if self.status.get("phase") == "Suspended" or not self.status.get("attempt"):
            await self._next_attempt("Resumed" if self.status.get("attempt") else "Started", 0.0)
        attempt = self.status["attempt"]
        learners = [p for p in pods if _role(p) == names.LEARNER]
        current = [p for p in learners if _attempt(p) == attempt]
        stale = [p for p in learners if _attempt(p) != attempt]
        await self._delete_live(stale)
        if not self.status.get("attemptLaunched"):
            # Stopped learners of the last attempt stay for their logs; older ones go.
            for pod in stale:
                if _attempt(pod) < attempt - 1 and not pod["metadata"].get("deletionTimestamp"):
                    await self._call(self.kube.delete_pod, self.namespace, pod["metadata"]["name"])
            return await self._launch(spec, pods, stale)
        await self._heal_servers(pods)
        return await self._follow(spec, current, pods)

    # -- steps of the life cycle ------------------------------------------------------------------

    async def _missing_references(self, spec: Object) -> tuple[str, str] | None:
        """(reason, message) for the first Secret or claim that the spec names and that is missing."""
        token = spec.get("huggingFaceTokenSecret")
        if token:
            keys = await self._call(self.kube.secret_keys, self.namespace, token["name"])
            if keys is None:
                return "MissingSecret", f"huggingFaceTokenSecret: Secret {token['name']!r} not found"
            if token["key"] not in keys:
                return (
                    "MissingSecretKey",
                    f"huggingFaceTokenSecret: Secret {token['name']!r} has no key {token['key']!r}",
                )
        for secret in spec.get("imagePullSecrets") or []:
            if await self._call(self.kube.secret_keys, self.namespace, secret["name"]) is None:
                return "MissingImagePullSecret", f"imagePullSecrets: Secret {secret['name']!r} not found"
        claim = spec["checkpoint"]["volume"].get("claimName")
        if claim and not await self._call(self.kube.claim_exists, self.namespace, claim):
            return "MissingClaim", f"checkpoint.volume.claimName: PersistentVolumeClaim {claim!r} not found"
        return None

    async def _ensure_shared_objects(self, replace_config: bool) -> None:
        """Claim, Services and ConfigMap; the ConfigMap is re-rendered when an attempt starts."""
        claim = builders.build_claim(self.run)
        for obj in [*([claim] if claim else []), *builders.build_services(self.run)]:
            await self._call(self.kube.create, self.namespace, obj)
        config_map = builders.build_config_map(self.run, CLUSTER_DOMAIN)
        if replace_config:
            await self._call(self.kube.replace_config_map, self.namespace, config_map)
        else:
            await self._call(self.kube.create, self.namespace, config_map)
        self.ensured = True

    async def _delete_live(self, pods: list[Object]) -> None:
        """Delete the pods that still run (their learners get SIGTERM and save a checkpoint)."""
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp") and not lifecycle.is_terminated(pod):
                await self._call(self.kube.delete_pod, self.namespace, pod["metadata"]["name"])

    async def _next_attempt(self, reason: str, delay: float) -> None:
        """Record the next learner attempt (launched once the old pods stopped and `delay` passed)."""
        attempt = self.status.get("attempt", 0) + 1
        self.status["attempt"] = attempt
        self.status["attemptLaunched"] = False
        self.status["restartAfter"] = _timestamp(_now() + datetime.timedelta(seconds=delay))
        phase = "Pending" if attempt == 1 else "Restarting"
        self._phase(
            phase, f"{reason}: starting learner attempt {attempt}" + (f" in {delay:.0f}s" if delay else "")
        )
        self._condition("Ready", False, reason, self.status["message"])
        await self._flush()

    async def _launch(self, spec: Object, pods: list[Object], stale: list[Object]) -> float | None:
        attempt = self.status["attempt"]
        stopping = [p["metadata"]["name"] for p in stale if not lifecycle.is_terminated(p)]
        if stopping:
            self._phase("Restarting", f"waiting for {', '.join(stopping)} to stop (they save a checkpoint)")
            return None
        wait = (_parse_timestamp(self.status["restartAfter"]) - _now()).total_seconds()
        if wait > 0:
            return wait
        await self._ensure_shared_objects(replace_config=True)
        if not await self._replace_changed_servers(pods):
            self._phase("Restarting", "waiting for changed rollout/teacher pods to be replaced")
            return None
        await self._heal_servers(pods)
        for rank in range(spec["learner"]["nodes"]):
            pod = builders.build_learner_pod(self.run, rank, attempt, CLUSTER_DOMAIN)
            await self._call(self.kube.create, self.namespace, pod)
        self.status["attemptLaunched"] = True
        self.status.setdefault("startTime", self.now)
        self.status["conditions"] = lifecycle.drop_condition(
            self.status.get("conditions") or [], "SpecChangeDeferred"
        )
        self._phase("Initializing", f"learner attempt {attempt}: {spec['learner']['nodes']} pods created")
        self._event("AttemptStarted", f"created the learner pods of attempt {attempt}")
        return None

    def _desired_servers(self) -> dict[str, Object]:
        return {pod["metadata"]["name"]: pod for pod in builders.build_server_pods(self.run)}

    async def _replace_changed_servers(self, pods: list[Object]) -> bool:
        """At an attempt's start: delete servers whose spec changed or that are gone from the spec.
        True when none is left to wait for."""
        desired = self._desired_servers()
        waiting = False
        for pod in pods:
            if _role(pod) not in names.SERVER_ROLES:
                continue
            name = pod["metadata"]["name"]
            annotations = pod["metadata"].get("annotations") or {}
            wanted = desired.get(name)
            if (
                wanted is None
                or annotations.get(names.ANNOTATION_SPEC_HASH)
                != wanted["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]
            ):
                if not pod["metadata"].get("deletionTimestamp"):
                    await self._call(self.kube.delete_pod, self.namespace, name)
                waiting = waiting or wanted is not None
        return not waiting

    async def _heal_servers(self, pods: list[Object]) -> None:
        """Create missing rollout/teacher pods; delete stopped ones (recreated once they are gone)."""
        existing = {p["metadata"]["name"]: p for p in pods if _role(p) in names.SERVER_ROLES}
        for name, wanted in self._desired_servers().items():
            pod = existing.get(name)
            if pod is None:
                if await self._call(self.kube.create, self.namespace, wanted) and self.status.get(
                    "attemptLaunched"
                ):
                    self._event("ServerRecreated", f"recreated {name}", warning=True)
            elif lifecycle.is_terminated(pod) and not pod["metadata"].get("deletionTimestamp"):
                self._event(
                    "ServerLost", f"{name} stopped ({pod['status'].get('phase')}); replacing it", warning=True
                )
                await self._call(self.kube.delete_pod, self.namespace, name)

    async def _follow(self, spec: Object, current: list[Object], pods: list[Object]) -> float | None:
        gang = lifecycle.assess_gang(current, spec["learner"]["nodes"])
        if gang.verdict is Verdict.BAD_CONFIG:
            await self._fail("BadConfig", gang.message)
            return None
        if gang.verdict is Verdict.PREEMPTED:
            self.status["preemptions"] = self.status.get("preemptions", 0) + 1
            metrics.PREEMPTIONS.inc()
            self._event(
                "Preempted", f"{gang.message}; restarting all learners from the latest checkpoint", True
            )
            await self._next_attempt("Preempted", 0.0)
            await self._delete_live(current)
            return 0.0
        if gang.verdict is Verdict.FAILED:
            restarts = self.status.get("restarts", 0) + 1
            self.status["restarts"] = restarts
            limit = spec["restartPolicy"]["backoffLimit"]
            if restarts > limit:
                await self._fail(
                    "BackoffLimitExceeded", f"{gang.message}; {restarts} failures, backoffLimit {limit}"
                )
                await self._delete_live(current)
                return None
            delay = lifecycle.backoff_seconds(spec["restartPolicy"], restarts)
            metrics.RESTARTS.inc()
            self._event("LearnerFailed", f"{gang.message}; restart {restarts}/{limit} in {delay:.0f}s", True)
            await self._next_attempt("LearnerFailed", delay)
            await self._delete_live(current)
            return delay
        if gang.verdict is Verdict.SUCCEEDED:
            self._phase("Succeeded", gang.message)
            self.status["completionTime"] = self.now
            self._condition("Ready", False, "Succeeded", gang.message)
            self._condition("Completed", True, "Succeeded", gang.message)
            self._event("Succeeded", gang.message)
            await self._flush()
            return await self._finished(spec)
        await self._note_deferred_changes(spec)
        servers = [p for p in pods if _role(p) in names.SERVER_ROLES]
        servers_up = all((p.get("status") or {}).get("phase") == "Running" for p in servers)
        if gang.verdict is Verdict.RUNNING and servers_up and len(servers) == len(self._desired_servers()):
            if self.status.get("phase") != "Running":
                self._event("Running", f"all pods of learner attempt {self.status['attempt']} are running")
            self._phase("Running", f"learner attempt {self.status['attempt']} running")
            self._condition("Ready", True, "Running", "every learner and server pod is running")
            return await self._scrape()
        self._phase("Initializing", gang.message or "waiting for rollout/teacher pods")
        return None

    async def _note_deferred_changes(self, spec: Object) -> None:
        data = await self._call(self.kube.read_config_map, self.namespace, names.config_map_name(self.name))
        applied = json.loads((data or {}).get(names.APPLIED_SPEC_FILE) or "{}")
        changed = lifecycle.deferred_fields(applied, spec) if applied else []
        conditions = self.status.get("conditions") or []
        if changed:
            message = (
                f"{', '.join(changed)} changed; applied at the next learner attempt "
                "(suspend and resume to apply now)"
            )
            if self._condition_of("SpecChangeDeferred").get("message") != message:
                self._event("SpecChangeDeferred", message)
            self._condition("SpecChangeDeferred", True, "RunningAttempt", message)
        else:
            self.status["conditions"] = lifecycle.drop_condition(conditions, "SpecChangeDeferred")

    async def _suspend(self, pods: list[Object]) -> float | None:
        await self._delete_live(pods)
        running = [p["metadata"]["name"] for p in pods if not lifecycle.is_terminated(p)]
        if self.status.get("phase") != "Suspended":
            self._event("Suspended", "spec.suspend is true: stopping all pods (learners save a checkpoint)")
        self._phase("Suspended", f"stopping {', '.join(running)}" if running else "all pods stopped")
        self._condition("Ready", False, "Suspended", "spec.suspend is true")
        return None

    async def _fail(self, reason: str, message: str) -> None:
        self._phase("Failed", message)
        self.status["completionTime"] = self.now
        self._condition("Ready", False, reason, message)
        self._condition("Failed", True, reason, message)
        self._event(reason, message, warning=True)
        await self._flush()

    async def _finished(self, spec: Object) -> float | None:
        """A finished run keeps its learner pods (for their logs) but frees the servers' GPUs."""
        pods = await self._call(self.kube.list_pods, self.namespace, self.name)
        servers = [p for p in pods if _role(p) in names.SERVER_ROLES]
        for pod in servers:
            if not pod["metadata"].get("deletionTimestamp"):
                await self._call(self.kube.delete_pod, self.namespace, pod["metadata"]["name"])
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is None or not self.status.get("completionTime"):
            return None
        left = (_parse_timestamp(self.status["completionTime"]) - _now()).total_seconds() + ttl
        if left > 0:
            return left
        self._event("Deleted", f"ttlSecondsAfterFinished ({ttl}s) passed")
        await self._call(self.kube.delete_run, self.namespace, self.name)
        return None

    async def _scrape(self) -> float:
        """Progress from learner rank 0's metrics; a failure is a condition, never an error."""
        wait = self.last_scrape + SCRAPE_SECONDS - time.monotonic()
        if wait > 0:
            return wait
        self.last_scrape = time.monotonic()
        annotations = self.run["metadata"].get("annotations") or {}
        default = names.learner_metrics_url(self.name, self.namespace, CLUSTER_DOMAIN)
        url = annotations.get(names.ANNOTATION_METRICS_URL, default)
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                response.raise_for_status()
                progress = metrics.parse_progress(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            metrics.ERRORS.labels("scrape").inc()
            self._condition("MetricsAvailable", False, "ScrapeFailed", f"{url}: {exc!r}"[:500])
            return SCRAPE_SECONDS
        for field in ("step", "latestCheckpointStep"):
            if field in progress:
                self.status[field] = int(progress[field])
        for field in ("reward", "accuracy"):
            if field in progress:
                self.status[field] = round(progress[field], 6)
        self._condition("MetricsAvailable", True, "Scraped", url)
        return SCRAPE_SECONDS


class Runs:
    """The reconcile loops of all runs this operator sees, one asyncio task per run."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.phases: dict[tuple[str, str], str] = {}

    def wake(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self.tasks or self.tasks[key].done():
            self.wakeups[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._loop(key), name=f"rlsdrun {namespace}/{name}")
        self.wakeups[key].set()

    async def _loop(self, key: tuple[str, str]) -> None:
        reconciler = RunReconciler(self.kube, *key)
        wakeup = self.wakeups[key]
        try:
            while True:
                wakeup.clear()
                try:
                    delay = await reconciler.reconcile()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    metrics.ERRORS.labels("reconcile").inc()
                    log.exception(
                        "reconciling rlsdrun %s/%s failed; retrying in %.0fs", *key, ERROR_RETRY_SECONDS
                    )
                    delay = ERROR_RETRY_SECONDS
                if reconciler.gone:
                    return
                if reconciler.phase:
                    self.phases[key] = reconciler.phase
                    metrics.publish_phases(self.phases)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=delay)
        finally:
            self.phases.pop(key, None)
            metrics.publish_phases(self.phases)

    def forget(self, namespace: str, name: str) -> None:
        task = self.tasks.pop((namespace, name), None)
        if task is not None:
            task.cancel()
        self.wakeups.pop((namespace, name), None)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()


# -- kopf handlers, grouped by resource -------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # A watch that silently stalls would stall every run: reconnect well before proxies drop it.
    settings.watching.server_timeout = int(os.environ.get("RLSD_OPERATOR_WATCH_SERVER_TIMEOUT", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    # One replica (Deployment strategy Recreate): no peering objects needed in the cluster.
    settings.peering.standalone = True
    # The runs' namespaces and the CRD are known: no cluster-wide scanning (and no RBAC for it).
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.GROUP)
    memo.runs = Runs(Kube(load_api_client()))


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return connection_info(load_api_client())


@kopf.on.cleanup()
async def stop_runs(memo: kopf.Memo, **_: Any) -> None:
    await memo.runs.stop()


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def on_run_event(event: Object, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if event["type"] == "DELETED":
        memo.runs.forget(namespace, name)
    else:
        memo.runs.wake(namespace, name)


@kopf.on.event("", "v1", "pods", labels={names.LABEL_RUN: kopf.PRESENT, names.LABEL_APP: "rlsd"})
async def on_pod_event(labels: dict[str, str], namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.runs.wake(namespace, labels[names.LABEL_RUN])
