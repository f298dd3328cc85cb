"""The operator's view of the cluster: a thread-safe store of the objects it watches.

Why: without it a reconcile would GET the FinetuneJob, its worker Job, its pods and its
Service, and each child before applying it. The watch streams kopf already holds carry every
change of those objects; kept here, a reconcile reads memory and sends only writes
(client-go's informer cache, with kopf as the watch layer).

- `Store.observe(type, body)` takes a watch event (or a LIST item, or the response of our own
  write: read-your-writes) and never replaces an object by one with an older
  resourceVersion, nor brings back one it saw deleted (a tombstone remembers the
  resourceVersion of the deletion for a while). It answers whether anything changed, so an
  event that repeats what is known (kopf's re-list after a reconnect) triggers nothing.
- Objects are stored trimmed: never `managedFields` (nor kubectl's last-applied annotation);
  of a Pod only what `status.pod_view` and the ownership check read; keys and short strings
  interned. Stored objects are shared: callers must not mutate them.
- Pods are indexed by (namespace, `finetune.dev/job-name` label): a job's pods in O(its pods).
- `fill(store, kube, namespaces)` LISTs every watched kind (paged) and reconciles the store
  with the result: what the LIST has is observed, what the store has that the LIST (at its
  resourceVersion) no longer has is removed. The operator fills the store once before any
  reconcile runs (a half-filled cache would show a running group's pods as gone and restart
  it), and again after kopf re-lists (a watch that reconnected may have missed deletions)
  and on a slow period as a safety net.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.objects import JOB_NAME_LABEL

if TYPE_CHECKING:
    from finetune_operator.controller.kube import Kube

Obj = dict[str, Any]
Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name
JobKey = tuple[str, str]  # namespace, FinetuneJob name

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_INTERN_MAX = 64  # longer strings (messages, the trainer's config) are rarely repeated
# How long a deletion is remembered, so that a late, older copy cannot bring the object back.
TOMBSTONE_SECONDS = 300.0


@dataclass(frozen=True)
class Watched:
    """A kind the operator watches and caches: kopf's (group, version, plural), the selector."""

    api_version: str
    kind: str
    plural: str
    labelled: bool  # only objects with JOB_NAME_LABEL (all but the FinetuneJobs)

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def selector(self) -> str | None:
        return JOB_NAME_LABEL if self.labelled else None


FINETUNEJOBS = Watched(API_VERSION, KIND, PLURAL, labelled=False)
WATCHED: tuple[Watched, ...] = (
    FINETUNEJOBS,
    Watched("batch/v1", "Job", "jobs", labelled=True),
    Watched("v1", "Pod", "pods", labelled=True),
    Watched("v1", "ServiceAccount", "serviceaccounts", labelled=True),
    Watched("rbac.authorization.k8s.io/v1", "Role", "roles", labelled=True),
    Watched("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", labelled=True),
    Watched("v1", "ConfigMap", "configmaps", labelled=True),
    Watched("v1", "Service", "services", labelled=True),
)
assert FINETUNEJOBS.group == GROUP and FINETUNEJOBS.version == VERSION

_POD_METADATA = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
)
_CONDITION_FIELDS = ("type", "status", "reason", "message")
_TERMINATED_FIELDS = ("exitCode", "reason", "message")


def key_of(body: Mapping[str, Any]) -> Key:
    metadata = body.get("metadata") or {}
    return (
        str(body.get("apiVersion", "")),
        str(body.get("kind", "")),
        str(metadata.get("namespace", "")),
        str(metadata.get("name", "")),
    )


def job_key(body: Mapping[str, Any]) -> JobKey | None:
    """The FinetuneJob an object belongs to: itself, or the one its label names."""
    metadata = body.get("metadata") or {}
    namespace = metadata.get("namespace")
    if not namespace:
        return None
    if body.get("apiVersion") == API_VERSION and body.get("kind") == KIND:
        return namespace, metadata.get("name", "")
    owner = (metadata.get("labels") or {}).get(JOB_NAME_LABEL)
    return (namespace, owner) if owner else None


def _rv(value: Any) -> int | None:
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() else None


def is_older(candidate: Any, known: Any) -> bool:
    """True when resourceVersion `candidate` is known to be older than `known` (both numeric,
    as etcd's are; opaque ones are never judged older)."""
    a, b = _rv(candidate), _rv(known)
    return a is not None and b is not None and a < b


def _trim_pod(body: Mapping[str, Any]) -> Obj:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    trimmed_status: Obj = {
        k: status[k] for k in ("phase", "reason", "message") if status.get(k) is not None
    }
    if status.get("conditions"):
        trimmed_status["conditions"] = [
            {k: c[k] for k in _CONDITION_FIELDS if k in c} for c in status["conditions"]
        ]
    containers = []
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        entry: Obj = {"name": container.get("name")}
        if terminated:
            entry["state"] = {
                "terminated": {k: terminated[k] for k in _TERMINATED_FIELDS if k in terminated}
            }
        containers.append(entry)
    if containers:
        trimmed_status["containerStatuses"] = containers
    spec = body.get("spec") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: metadata[k] for k in _POD_METADATA if k in metadata},
        "spec": {"nodeName": spec["nodeName"]} if spec.get("nodeName") else {},
        "status": trimmed_status,
    }


def _compact(value: Any) -> Any:
    """A deep copy with every key and short string interned: json.loads makes new strings for
    each document, so 10,000 cached objects would hold 10,000 copies of "metadata",
    "finetune.dev/job-name" and the like (interning halves the cache's memory)."""
    if isinstance(value, dict):
        return {sys.intern(k): _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= _INTERN_MAX:
        return sys.intern(value)
    return value


def trim(body: Mapping[str, Any]) -> Obj:
    """The copy the store keeps: a new, compact object that shares nothing with `body`."""
    if body.get("kind") == "Pod" and body.get("apiVersion") == "v1":
        trimmed = _trim_pod(body)
    else:
        metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
        annotations = metadata.get("annotations")
        if annotations and LAST_APPLIED in annotations:
            metadata["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        trimmed = {**body, "metadata": metadata}
    result: Obj = _compact(trimmed)
    return result


class Store:
    """Observed objects by (apiVersion, kind, namespace, name); see the module's docstring."""

    def __init__(self, tombstone_seconds: float = TOMBSTONE_SECONDS) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self._pods: dict[JobKey, dict[str, Obj]] = {}
        self._tombstones: OrderedDict[Key, tuple[str, float]] = OrderedDict()
        self._tombstone_seconds = tombstone_seconds

    # -- reads -----------------------------------------------------------------------------
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._kinds.get((api_version, kind), {}).get((namespace, name))

    def objects(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj]:
        with self._lock:
            objects = self._kinds.get((api_version, kind), {})
            if namespace is None:
                return list(objects.values())
            return [o for (ns, _), o in objects.items() if ns == namespace]

    def pods_of(self, namespace: str, job_name: str) -> list[Obj]:
        """The pods labelled `finetune.dev/job-name=job_name` in `namespace`."""
        with self._lock:
            return list(self._pods.get((namespace, job_name), {}).values())

    def __len__(self) -> int:
        with self._lock:
            return sum(len(objects) for objects in self._kinds.values())

    # -- writes ----------------------------------------------------------------------------
    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Take one watch event (type None/ADDED/MODIFIED/DELETED) or a write's response.
        True when the store changed."""
        key = key_of(body)
        if not key[1] or not key[3]:
            return False
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if event_type == "DELETED":
            with self._lock:
                return self._remove(key, rv)
        trimmed = trim(body)
        with self._lock:
            tombstone = self._tombstones.get(key)
            if tombstone is not None:
                if not is_older(tombstone[0], rv):
                    return False  # deleted at or after this version
                del self._tombstones[key]
            objects = self._kinds.setdefault((key[0], key[1]), {})
            stored = objects.get((key[2], key[3]))
            if stored is not None:
                known = (stored.get("metadata") or {}).get("resourceVersion")
                if (rv and str(known) == rv) or is_older(rv, known):
                    return False
                self._unindex(key, stored)
            objects[(key[2], key[3])] = trimmed
            self._index(key, trimmed)
            return True

    def forget(self, body: Mapping[str, Any]) -> bool:
        """The object is gone (our DELETE answered so): remove it, remembering the deletion."""
        with self._lock:
            key = key_of(body)
            stored = self._kinds.get((key[0], key[1]), {}).get((key[2], key[3]))
            rv = (stored or body).get("metadata", {}).get("resourceVersion") or ""
            return self._remove(key, str(rv))

    def retain(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        seen: set[tuple[str, str]],
        list_rv: str,
    ) -> list[Obj]:
        """After a LIST at `list_rv`: remove the objects of that kind (and namespace) that the
        LIST did not have and that are older than it. Returns the removed objects."""
        removed: list[Obj] = []
        with self._lock:
            objects = self._kinds.get((api_version, kind), {})
            for (ns, name), obj in list(objects.items()):
                if (namespace is not None and ns != namespace) or (ns, name) in seen:
                    continue
                known = (obj.get("metadata") or {}).get("resourceVersion")
                if is_older(known, list_rv) or _rv(known) is None:
                    self._remove((api_version, kind, ns, name), list_rv)
                    removed.append(obj)
        return removed

    # -- under the lock --------------------------------------------------------------------
    def _remove(self, key: Key, rv: str) -> bool:
        objects = self._kinds.get((key[0], key[1]), {})
        stored = objects.get((key[2], key[3]))
        changed = False
        if stored is not None:
            known = (stored.get("metadata") or {}).get("resourceVersion")
            if is_older(rv, known):
                return False  # a deletion older than what we know: recreated since
            del objects[(key[2], key[3])]
            self._unindex(key, stored)
            changed = True
        now = time.monotonic()
        if _rv(rv) is not None:
            self._tombstones[key] = (rv, now)
            self._tombstones.move_to_end(key)
        while self._tombstones:
            oldest = next(iter(self._tombstones.values()))
            if now - oldest[1] < self._tombstone_seconds:
                break
            self._tombstones.popitem(last=False)
        return changed

    def _index(self, key: Key, obj: Obj) -> None:
        if key[1] == "Pod":
            owner = (obj["metadata"].get("labels") or {}).get(JOB_NAME_LABEL)
            if owner:
                self._pods.setdefault((key[2], owner), {})[key[3]] = obj

    def _unindex(self, key: Key, obj: Obj) -> None:
        if key[1] == "Pod":
            owner = (obj["metadata"].get("labels") or {}).get(JOB_NAME_LABEL)
            pods = self._pods.get((key[2], owner or ""))
            if pods is not None:
                pods.pop(key[3], None)
                if not pods:
                    del self._pods[(key[2], owner or "")]


def fill(store: Store, kube: Kube, namespaces: Iterable[str | None]) -> set[JobKey]:
    """LIST every watched kind in each namespace (None: cluster-wide) into `store`, removing
    what the lists no longer have. Returns the FinetuneJobs whose objects changed."""
    touched: set[JobKey] = set()
    for namespace in namespaces:
        for watched in WATCHED:
            seen: set[tuple[str, str]] = set()
            list_rv = ""
            for items, page_rv in kube.list_pages(
                watched.api_version, watched.kind, namespace, watched.selector
            ):
                list_rv = list_rv or page_rv
                for item in items:
                    item.setdefault("apiVersion", watched.api_version)
                    item.setdefault("kind", watched.kind)
                    metadata = item.get("metadata") or {}
                    seen.add((metadata.get("namespace", ""), metadata.get("name", "")))
                    if store.observe(None, item):
                        owner = job_key(item)
                        if owner is not None:
                            touched.add(owner)
                del items
            for gone in store.retain(watched.api_version, watched.kind, namespace, seen, list_rv):
                owner = job_key(gone)
                if owner is not None:
                    touched.add(owner)
    return touched
