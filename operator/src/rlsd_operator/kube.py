"""The Kubernetes API calls the operator makes, as plain dicts in the API's own (camelCase) form.

The official client is synchronous; every call runs in a thread pool of its own, sized for the
concurrency the operator wants (and the client's connection pool with it), so the event loop never
blocks on the API and many runs' calls are in flight at once. Responses are read as raw JSON (the
client's model objects cost more CPU than the calls themselves).

When more calls wait than the pool runs, the most urgent go first: recording a decision (a run's
status), then pods (what holds GPUs, or frees them), then everything else.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes import client, config

from rlsd_operator import names

Object = dict[str, Any]
# Calls in flight at once, over all runs (each run has a share of its own, see handlers.RUN_CALLS).
API_WORKERS = int(os.environ.get("RLSD_OPERATOR_API_WORKERS", "32"))
# The kinds a run owns, by the plural their watch and list use.
OWNED_KINDS = {
    "pods": "Pod",
    "services": "Service",
    "configmaps": "ConfigMap",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "networkpolicies": "NetworkPolicy",
}
# The API group and version of each owned kind outside the core group.
API_GROUPS = {"NetworkPolicy": ("networking.k8s.io", "v1")}


def load_configuration() -> client.Configuration:
    """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # Read KUBECONFIG now: the client library reads it once, at import time.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return configuration


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration as `Kube` (kopf's own client login would read
    a KUBECONFIG set after start-up nowhere)."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


# Call priorities (lower first).
STATUS, PODS, OTHER = 0, 1, 2


def absent(exc: Exception) -> bool:
    return isinstance(exc, client.ApiException) and exc.status == 404


class PriorityGate:
    """At most `size` holders at once; waiters get in by priority, then in arrival order."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self.order = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (priority, next(self.order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed the slot just as the waiter was cancelled
            raise

    def release(self) -> None:
        while self.waiting:
            _, _, turn = heapq.heappop(self.waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1


class Kube:
    def __init__(self, configuration: client.Configuration, workers: int = API_WORKERS) -> None:
        configuration.connection_pool_maxsize = workers
        api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        networking = client.NetworkingV1Api(api)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="rlsd-kube")
        self.gate = PriorityGate(workers)
        core = self.core
        self._create = {
            "Pod": core.create_namespaced_pod,
            "Service": core.create_namespaced_service,
            "ConfigMap": core.create_namespaced_config_map,
            "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
            "NetworkPolicy": networking.create_namespaced_network_policy,
            "Secret": core.create_namespaced_secret,  # the run's token, never read back into a log
        }
        self._read = {
            "Pod": core.read_namespaced_pod,
            "Service": core.read_namespaced_service,
            "ConfigMap": core.read_namespaced_config_map,
            "PersistentVolumeClaim": core.read_namespaced_persistent_volume_claim,
            "Secret": core.read_namespaced_secret,
            "NetworkPolicy": networking.read_namespaced_network_policy,
        }
        self._replace = {
            "ConfigMap": core.replace_namespaced_config_map,
            "NetworkPolicy": networking.replace_namespaced_network_policy,
        }
        self._delete = {
            "Pod": core.delete_namespaced_pod,
            "NetworkPolicy": networking.delete_namespaced_network_policy,
        }
        self._list = {
            "Pod": (core.list_pod_for_all_namespaces, core.list_namespaced_pod),
            "Service": (core.list_service_for_all_namespaces, core.list_namespaced_service),
            "ConfigMap": (core.list_config_map_for_all_namespaces, core.list_namespaced_config_map),
            "PersistentVolumeClaim": (
                core.list_persistent_volume_claim_for_all_namespaces,
                core.list_namespaced_persistent_volume_claim,
            ),
            "NetworkPolicy": (
                networking.list_network_policy_for_all_namespaces,
                networking.list_namespaced_network_policy,
            ),
        }

    async def _json(
        self, method: Callable[..., Any], *args: Any, priority: int = OTHER, **kwargs: Any
    ) -> Any:
        """`method(*args, **kwargs)` in the pool, its response body parsed as JSON (there too: a list of
        every pod of a large cluster takes a while to parse, and the event loop must not wait)."""
        call = functools.partial(method, *args, _preload_content=False, **kwargs)

        def fetch() -> Any:
            response = call()
            return json.loads(response.data) if response.data else None

        await self.gate.acquire(priority)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fetch)
        finally:
            self.gate.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- runs -------------------------------------------------------------------------------------

    async def patch_run_status(self, namespace: str, name: str, status: Object) -> Object:
        return await self._json(
            self.custom.patch_namespaced_custom_object_status,
            names.GROUP, names.VERSION, namespace, names.PLURAL, name, {"status": status},
            priority=STATUS,
        )  # fmt: skip

    async def delete_run(self, namespace: str, name: str) -> None:
        try:
            await self._json(
                self.custom.delete_namespaced_custom_object,
                names.GROUP, names.VERSION, namespace, names.PLURAL, name,
            )  # fmt: skip
        except client.ApiException as exc:
            if not absent(exc):
                raise

    # -- owned objects ----------------------------------------------------------------------------

    async def create(self, namespace: str, obj: Object) -> Object:
        """The created object; raises ApiException (409 when the name is taken)."""
        priority = PODS if obj["kind"] == "Pod" else OTHER
        return await self._json(self._create[obj["kind"]], namespace, obj, priority=priority)

    async def read(self, kind: str, namespace: str, name: str) -> Object | None:
        try:
            return await self._json(self._read[kind], name, namespace)
        except client.ApiException as exc:
            if absent(exc):
                return None
            raise

    async def replace(self, namespace: str, obj: Object) -> Object:
        """The replaced object (a ConfigMap or NetworkPolicy); raises ApiException."""
        name = obj["metadata"]["name"]
        return await self._json(self._replace[obj["kind"]], name, namespace, obj)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """False when it was already gone."""
        priority = PODS if kind == "Pod" else OTHER
        try:
            await self._json(self._delete[kind], name, namespace, priority=priority)
        except client.ApiException as exc:
            if absent(exc):
                return False
            raise
        return True

    async def list_owned(self, kind: str, namespaces: list[str]) -> list[Object]:
        """Every object of `kind` labelled as the operator's, in `namespaces` (empty: all)."""
        selector = f"{names.LABEL_APP}={names.APP}"
        everywhere, namespaced = self._list[kind]
        if not namespaces:
            return (await self._json(everywhere, label_selector=selector))["items"]
        items = []
        for namespace in namespaces:
            items += (await self._json(namespaced, namespace, label_selector=selector))["items"]
        return items

    async def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `group`/`version` (API discovery)."""
        try:
            found = await self._json(self.custom.get_api_resources, group, version)
        except client.ApiException as exc:
            if absent(exc):
                return False
            raise
        return any(resource.get("name") == plural for resource in (found or {}).get("resources") or [])

    # -- where runs go (placement.py) --------------------------------------------------------------

    async def may_place(self) -> bool:
        """Whether the operator may list the nodes and every namespace's pods (what placing a run on one
        node reads): not with the chart's `rbac.scope: namespace`."""
        try:
            await self._json(self.core.list_node, limit=1)
            await self._json(self.core.list_pod_for_all_namespaces, limit=1)
        except client.ApiException as exc:
            if exc.status == 403:
                return False
            raise
        return True

    async def nodes(self) -> list[Object]:
        return (await self._json(self.core.list_node))["items"]

    async def unfinished_pods(self) -> list[Object]:
        """Every namespace's pods that hold room on a node or may take some (not Succeeded or Failed,
        as the scheduler counts them)."""
        selector = "status.phase!=Succeeded,status.phase!=Failed"
        return (await self._json(self.core.list_pod_for_all_namespaces, field_selector=selector))["items"]

    async def volume_affinity(self, namespace: str, claim: str) -> Object | None:
        """The required node affinity of the volume bound to `claim` (None: not bound, or any node)."""
        found = await self.read("PersistentVolumeClaim", namespace, claim)
        volume = ((found or {}).get("spec") or {}).get("volumeName")
        if not volume:
            return None
        try:
            bound = await self._json(self.core.read_persistent_volume, volume)
        except client.ApiException as exc:
            if absent(exc):
                return None
            raise
        return ((bound.get("spec") or {}).get("nodeAffinity") or {}).get("required")

    # -- references the user names ----------------------------------------------------------------

    async def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        secret = await self.read("Secret", namespace, name)
        return None if secret is None else set((secret.get("data") or {}).keys())

    async def claim_access_modes(self, namespace: str, name: str) -> list[str] | None:
        claim = await self.read("PersistentVolumeClaim", namespace, name)
        return None if claim is None else list((claim.get("spec") or {}).get("accessModes") or [])
