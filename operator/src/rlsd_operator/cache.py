"""What the operator knows of the objects runs own, kept from watch events (an informer's store).

Every pod, Service, ConfigMap and claim labelled `app.kubernetes.io/name: rlsd` is filed under the
run its controller owner reference names, so a reconcile reads its run's objects without an API
call. The operator's own writes go in at once (a created object, a deletion under way), so the next
reconcile does not redo them before their watch events arrive.

Kueue's Workloads are owned by pods, not runs: one is filed under the run whose pods carry its pod
group's name, and only what the operator reads of it is kept (every other Workload is dropped).
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import Any

from rlsd_operator import kueue, names

Object = dict[str, Any]
RunKey = tuple[str, str]  # (namespace, run name)
# Uids of deleted objects remembered, so that a create's late response never resurrects one.
TOMBSTONES = 10_000


def controller_owner(obj: Object) -> Object | None:
    """The RLSDRun owner reference that controls `obj`, if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == names.KIND:
            return ref
    return None


class OwnedObjects:
    def __init__(self) -> None:
        self._by_run: dict[RunKey, dict[str, dict[str, Object]]] = {}
        self._deleted: OrderedDict[str, None] = OrderedDict()
        # (namespace, Kueue pod group) -> the run whose pods are in it; the run's Workloads by name.
        self._groups: dict[tuple[str, str], RunKey] = {}
        self._workloads: dict[RunKey, dict[str, Object]] = {}

    def _bucket(self, kind: str, obj: Object) -> dict[str, Object] | None:
        owner = controller_owner(obj)
        if owner is None:
            return None
        key = (obj["metadata"]["namespace"], owner["name"])
        group = kueue.group_of(obj) if kind == "Pod" else None
        if group:
            self._groups[(key[0], group)] = key
        return self._by_run.setdefault(key, {}).setdefault(kind, {})

    def observe(self, kind: str, event_type: str | None, obj: Object) -> RunKey | None:
        """File a watch event; returns the run it belongs to (to wake it), or None."""
        bucket = self._bucket(kind, obj)
        if bucket is None:
            return None
        name, uid = obj["metadata"]["name"], obj["metadata"].get("uid", "")
        if event_type == "DELETED":
            if bucket.get(name, {}).get("metadata", {}).get("uid") in (uid, None):
                bucket.pop(name, None)
            self._deleted[uid] = None
            if len(self._deleted) > TOMBSTONES:
                self._deleted.popitem(last=False)
        else:
            bucket[name] = obj
        owner = controller_owner(obj)
        return (obj["metadata"]["namespace"], owner["name"]) if owner else None

    def created(self, kind: str, obj: Object) -> None:
        """An object the operator just created (unless its watch events came first)."""
        bucket = self._bucket(kind, obj)
        name = obj["metadata"]["name"]
        if bucket is not None and name not in bucket and obj["metadata"].get("uid") not in self._deleted:
            bucket[name] = obj

    def deleting(self, key: RunKey, kind: str, name: str, gone: bool) -> None:
        """An object the operator just deleted: gone, or being deleted (graceful pod deletion)."""
        bucket = self._by_run.get(key, {}).get(kind, {})
        if name not in bucket:
            return
        if gone:
            del bucket[name]
        elif not bucket[name]["metadata"].get("deletionTimestamp"):
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            obj = bucket[name]
            bucket[name] = {**obj, "metadata": {**obj["metadata"], "deletionTimestamp": now}}

    def observe_workload(self, event_type: str | None, obj: Object) -> RunKey | None:
        """File a Workload event if it is a pod group of a run's; returns that run, or None."""
        key = self._groups.get((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        if key is None:
            return None
        workloads = self._workloads.setdefault(key, {})
        if event_type == "DELETED":
            workloads.pop(obj["metadata"]["name"], None)
        else:
            workloads[obj["metadata"]["name"]] = kueue.summary(obj)
        return key

    def workloads_of(self, key: RunKey) -> dict[str, Object]:
        return dict(self._workloads.get(key, {}))

    def of_run(self, key: RunKey) -> dict[str, dict[str, Object]]:
        """kind -> name -> object filed under the run (a copy of the mappings; objects are shared and
        never changed in place)."""
        return {kind: dict(objects) for kind, objects in self._by_run.get(key, {}).items()}

    def forget(self, key: RunKey) -> None:
        self._by_run.pop(key, None)
        self._workloads.pop(key, None)
        self._groups = {group: run for group, run in self._groups.items() if run != key}
