"""The operator's only door to the API server: plain dicts in and out.

Writes are server-side apply with one field manager (`finetune-operator`), and only when the
live object differs from the desired one (`is_subset`; the reconciler passes the live object
from its cache, so a steady job costs no request at all). Writes answer the object as
written, which the reconciler feeds back into its cache (read-your-writes).
Status is a JSON merge patch of the fields that changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.settings import FIELD_MANAGER

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Items = list[Obj]  # (a name: inside Kube, `list` is the method)

# apiVersion/kind -> (API path prefix, plural) for what the operator manages.
_RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
    ),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    (API_VERSION, KIND): (f"/apis/{GROUP}/{VERSION}", PLURAL),
    ("coordination.k8s.io/v1", "Lease"): ("/apis/coordination.k8s.io/v1", "leases"),
}


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted: the API server refuses new objects in it (a 403 that
        is no RBAC problem; everything in it is about to go anyway)."""
        return self.status == 403 and "because it is being terminated" in str(self)


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field set in `desired` has the same value in `live` (the API server's
    defaults in `live` are ignored; lists must match item by item)."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(is_subset(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, lv) for d, lv in zip(desired, live, strict=True))
    if isinstance(desired, bool) or live is None:
        return bool(desired == live)
    if isinstance(desired, (int, float)) and isinstance(live, (int, float)):
        return float(desired) == float(live)
    return str(desired) == str(live)


def path_for(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = _RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name else path


class RateLimiter:
    """Token bucket shared by every thread: at most `qps` requests a second, bursts of `burst`."""

    def __init__(self, qps: float, burst: int | None = None) -> None:
        self.qps = qps
        self.burst = float(burst or max(1, int(qps * 2)))
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                delay = (1 - self._tokens) / self.qps
            time.sleep(delay)


@dataclass
class Kube:
    """Thin wrapper over a `kubernetes.client.ApiClient` (sync; kopf runs handlers in threads)."""

    api: Any
    field_manager: str = FIELD_MANAGER
    timeout: float = 30.0
    limiter: RateLimiter | None = None

    @classmethod
    def from_environment(cls, qps: float | None = None) -> Kube:
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        configuration = client.Configuration.get_default_copy()
        if qps:
            # urllib3's pool bounds concurrency; the batching worker limit bounds the rate.
            configuration.connection_pool_maxsize = max(4, int(qps))
        return cls(api=client.ApiClient(configuration), limiter=RateLimiter(qps) if qps else None)

    # -- raw -------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        allow_missing: bool = False,
    ) -> Obj | None:
        if self.limiter is not None:
            self.limiter.wait()
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=self.timeout
        )
        response.read()
        data = response.data or b"{}"
        if response.status == 404 and allow_missing:
            return None
        if response.status >= 400:
            try:
                message = json.loads(data).get("message", data.decode())
            except ValueError:
                message = data.decode(errors="replace")
            raise KubeError(response.status, message)
        result: Obj = json.loads(data)
        return result

    # -- reads -----------------------------------------------------------------------------
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        return self.request("GET", path_for(api_version, kind, namespace, name), allow_missing=True)

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: str | None = None
    ) -> list[Obj]:
        items: list[Obj] = []
        for page, _ in self.list_pages(api_version, kind, namespace, selector):
            items += page
        return items

    def list_pages(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
        limit: int = 500,
    ) -> Iterator[tuple[Items, str]]:
        """LIST in pages of `limit` (one consistent snapshot): yields (items, the list's
        resourceVersion). Items carry no apiVersion/kind (the API server leaves them out)."""
        if namespace is None:
            prefix, plural = _RESOURCES[(api_version, kind)]
            path = f"{prefix}/{plural}"
        else:
            path = path_for(api_version, kind, namespace)
        token = ""
        while True:
            query = [("limit", str(limit))]
            if selector:
                query.append(("labelSelector", selector))
            if token:
                query.append(("continue", token))
            result = self.request("GET", path, query=query) or {}
            metadata = result.get("metadata") or {}
            items: Items = result.get("items") or []
            del result
            yield items, str(metadata.get("resourceVersion") or "")
            token = metadata.get("continue") or ""
            if not token:
                return

    # -- writes ----------------------------------------------------------------------------
    def apply(
        self, desired: Obj, live: Obj | None = None, *, check_live: bool = True
    ) -> Obj | None:
        """Server-side apply `desired` unless the live object already matches it. Returns the
        API server's answer (the object as written), None when nothing was written.
        `check_live=False`: `live` is all there is to compare with (None: absent), no GET."""
        metadata = desired["metadata"]
        if check_live and live is None:
            live = self.get(
                desired["apiVersion"], desired["kind"], metadata["namespace"], metadata["name"]
            )
        if live is not None and is_subset(desired, live):
            return None
        path = path_for(
            desired["apiVersion"], desired["kind"], metadata["namespace"], metadata["name"]
        )
        return self.request(
            "PATCH",
            path,
            body=desired,
            query=[("fieldManager", self.field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def create(self, obj: Obj) -> Obj | None:
        metadata = obj["metadata"]
        return self.request(
            "POST",
            path_for(obj["apiVersion"], obj["kind"], metadata["namespace"]),
            body=obj,
            query=[("fieldManager", self.field_manager)],
        )

    def replace(self, obj: Obj) -> Obj | None:
        metadata = obj["metadata"]
        return self.request(
            "PUT",
            path_for(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"]),
            body=obj,
            query=[("fieldManager", self.field_manager)],
        )

    def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        *,
        uid: str | None = None,
        propagation: str = "Background",
    ) -> Obj | None:
        """Delete (only the object with `uid`, when given). Returns the API server's answer
        (the object, marked for deletion, or a Status when it is gone already); None when
        there was nothing to delete."""
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            result = self.request(
                "DELETE",
                path_for(api_version, kind, namespace, name),
                body=body,
                allow_missing=True,
            )
        except KubeError as error:
            if error.status == 409:  # precondition: a newer object by that name
                return None
            raise
        return result

    def patch_status(self, namespace: str, name: str, patch: Obj) -> Obj | None:
        return self.request(
            "PATCH",
            path_for(API_VERSION, KIND, namespace, name) + "/status",
            body={"status": patch},
            query=[("fieldManager", self.field_manager)],
            content_type="application/merge-patch+json",
            allow_missing=True,
        )

    def event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, instance: str
    ) -> None:
        """A core/v1 Event on `involved` (what `kubectl describe` lists)."""
        metadata = involved.get("metadata") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = metadata.get("namespace", "default")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{metadata.get('name')}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", API_VERSION),
                "kind": involved.get("kind", KIND),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "reportingInstance": instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.create(event)
        except KubeError as error:  # an Event is never worth failing a reconcile
            if error.namespace_terminating:
                return
            log.warning("could not post Event %s on %s: %s", reason, metadata.get("name"), error)
