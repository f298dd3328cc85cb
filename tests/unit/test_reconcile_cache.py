"""The Reconciler on the watch cache, without kopf and without a cluster: an in-memory API
server behind `Kube.request` counts every request. A reconcile sends no GET (it reads the
store, filled by one LIST per kind), writes what is missing, and, because every write's answer
goes back into the store, a second pass sends nothing at all."""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml

from finetune_operator.api import API_VERSION, KIND
from finetune_operator.cli import render
from finetune_operator.controller.cache import Store, fill
from finetune_operator.controller.kube import _RESOURCES, Kube, KubeError
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import OperatorSettings

Obj = dict[str, Any]
GOLDEN = Path(__file__).parent / "golden"
PLURALS = {plural: (api_version, kind) for (api_version, kind), (_, plural) in _RESOURCES.items()}


@dataclass
class FakeApiKube(Kube):
    """`Kube` whose requests an in-memory API server answers (just enough of one)."""

    api: Any = None
    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)  # plural, ns, name
    requests: Counter[str] = field(default_factory=Counter)
    rv: Any = field(default_factory=lambda: itertools.count(100))

    def add(self, obj: Obj) -> Obj:
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural = _RESOURCES[(api_version, kind)][1]
        obj = copy.deepcopy(obj)
        metadata = obj["metadata"]
        metadata.setdefault("uid", f"uid-{kind}-{metadata['name']}")
        metadata["resourceVersion"] = str(next(self.rv))
        self.objects[(plural, metadata["namespace"], metadata["name"])] = obj
        return copy.deepcopy(obj)

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
        parts = [unquote(p) for p in path.split("/") if p]
        namespace = parts[parts.index("namespaces") + 1]
        rest = parts[parts.index("namespaces") + 2 :]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
        self.requests[f"{method} {plural}{'/' + sub[0] if sub else ''}"] += 1
        key = (plural, namespace, name or "")
        if method == "GET" and name is None:
            params = dict(query or [])
            selector = params.get("labelSelector")
            items = [
                {k: v for k, v in copy.deepcopy(o).items() if k not in ("apiVersion", "kind")}
                for (p, ns, _), o in sorted(self.objects.items())
                if p == plural
                and ns == namespace
                and (not selector or selector in (o["metadata"].get("labels") or {}))
            ]
            return {"metadata": {"resourceVersion": str(next(self.rv))}, "items": items}
        if method == "GET":
            found = self.objects.get(key)
            if found is None and allow_missing:
                return None
            return copy.deepcopy(found)
        if method == "POST":
            if plural == "events":
                return body  # type: ignore[no-any-return]
            if (plural, namespace, body["metadata"]["name"]) in self.objects:
                raise KubeError(409, "already exists")
            return self.add(json.loads(json.dumps(body)))
        if method == "PATCH" and sub == ["status"]:
            found = self.objects.get(key)
            if found is None:
                return None
            status = found.setdefault("status", {})
            for k, v in body["status"].items():
                if v is None:
                    status.pop(k, None)
                else:
                    status[k] = v
            return self.add(found)
        if method == "PATCH":  # server-side apply: good enough, the applied object wins
            assert content_type == "application/apply-patch+yaml"
            previous = self.objects.get(key)
            applied = json.loads(json.dumps(body))
            if previous is not None:
                applied["metadata"]["uid"] = previous["metadata"]["uid"]
            return self.add(applied)
        if method == "DELETE":
            found = self.objects.pop(key, None)
            if found is None:
                return None
            return {"kind": "Status", "status": "Success"}
        raise AssertionError(f"unexpected {method} {path}")


def finetunejob(name: str = "tiny") -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "ns", "generation": 1},
        "spec": {"model": {"name": "m"}, "dataset": {"name": "d"}, "device": "cpu", "workers": 2},
    }


def worker_pod(index: int, job_uid: str, resource_version: int) -> Obj:
    """Worker pod `index` of the `tiny` FinetuneJob's Job, Running."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"tiny-worker-{index}-x",
            "namespace": "ns",
            "resourceVersion": str(resource_version),
            "labels": {"finetune.dev/job-name": "tiny"},
            "ownerReferences": [{"uid": job_uid}],
        },
        "status": {"phase": "Running"},
    }


@pytest.fixture
def api() -> FakeApiKube:
    return FakeApiKube()


def test_a_reconcile_sends_no_get_and_a_steady_job_nothing(api: FakeApiKube) -> None:
    api.add(finetunejob())
    store = Store()
    assert fill(store, api, ["ns"]) == {("ns", "tiny")}
    assert set(api.requests) == {
        "GET finetunejobs",
        "GET jobs",
        "GET pods",
        "GET serviceaccounts",
        "GET roles",
        "GET rolebindings",
        "GET configmaps",
        "GET services",
    }  # one LIST each
    reconciler = Reconciler(kube=api, settings=OperatorSettings(), store=store)

    api.requests.clear()
    # It wrote: look again at once (its own watch events change nothing in the store now).
    assert reconciler.reconcile_named("ns", "tiny") == 0.0
    assert not [r for r in api.requests if r.startswith("GET")], api.requests
    assert api.requests["PATCH serviceaccounts"] == 1 and api.requests["PATCH services"] == 1
    assert api.requests["POST jobs"] == 1 and api.requests["PATCH finetunejobs/status"] == 1
    status = api.objects[("finetunejobs", "ns", "tiny")]["status"]
    assert status["phase"] == "Pending"

    # The created Job is in the store (its create's answer): the next pass sees it and only
    # says so in status ("0/2 workers running"); then there is nothing left to do.
    api.requests.clear()
    assert reconciler.reconcile_named("ns", "tiny") == 0.0
    assert api.requests == Counter({"PATCH finetunejobs/status": 1}), api.requests
    api.requests.clear()
    assert reconciler.reconcile_named("ns", "tiny") is None  # converged: the Job's events next
    assert api.requests == Counter(), api.requests

    # The worker pods run (as their watch events would say): one status write, no reads.
    job = store.get("batch/v1", "Job", "ns", "tiny-worker")
    assert job is not None
    for index in range(2):
        pod = worker_pod(index, job["metadata"]["uid"], 1000 + index)
        pod["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
        pod["spec"] = {"nodeName": "n"}
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        store.observe("ADDED", pod)
    api.requests.clear()
    assert reconciler.reconcile_named("ns", "tiny") == 0.0
    assert set(api.requests) <= {"PATCH finetunejobs/status", "POST events"}, api.requests
    assert api.objects[("finetunejobs", "ns", "tiny")]["status"]["phase"] == "Running"
    api.requests.clear()
    assert reconciler.reconcile_named("ns", "tiny") is None
    assert api.requests == Counter()


def test_drift_in_the_cache_is_repaired(api: FakeApiKube) -> None:
    api.add(finetunejob())
    store = Store()
    fill(store, api, ["ns"])
    reconciler = Reconciler(kube=api, settings=OperatorSettings(), store=store)
    reconciler.reconcile_named("ns", "tiny")
    reconciler.reconcile_named("ns", "tiny")

    # Someone deletes the Service: its DELETED event reaches the store.
    service = store.get("v1", "Service", "ns", "tiny-workers")
    assert service is not None
    api.objects.pop(("services", "ns", "tiny-workers"))
    rv = str(int(service["metadata"]["resourceVersion"]) + 1000)
    store.observe(
        "DELETED", {**service, "metadata": {**service["metadata"], "resourceVersion": rv}}
    )
    api.requests.clear()
    reconciler.reconcile_named("ns", "tiny")
    assert api.requests == Counter({"PATCH services": 1}), api.requests
    assert ("services", "ns", "tiny-workers") in api.objects


def test_a_job_gone_from_the_store_is_left_alone(api: FakeApiKube) -> None:
    store = Store()
    reconciler = Reconciler(kube=api, settings=OperatorSettings(), store=store)
    assert reconciler.reconcile_named("ns", "missing") is None
    assert api.requests == Counter()


def settle(reconciler: Reconciler) -> None:
    for _ in range(10):
        if reconciler.reconcile_named("ns", "tiny") != 0.0:
            return


def test_pods_stopped_by_a_hand_made_suspend_are_no_failure(api: FakeApiKube) -> None:
    """Someone suspends the worker Job by hand: the Job controller deletes its pods, the
    operator resumes the Job (the spec says run). The pods going away then are not a worker
    failure, even before the Job's status says Suspended."""
    api.add(finetunejob())
    store = Store()
    fill(store, api, ["ns"])
    reconciler = Reconciler(kube=api, settings=OperatorSettings(), store=store)
    settle(reconciler)
    job = store.get("batch/v1", "Job", "ns", "tiny-worker")
    assert job is not None
    suspended = api.add({**job, "spec": {**job["spec"], "suspend": True}})
    store.observe("MODIFIED", suspended)
    stopping = datetime.now(timezone.utc) + timedelta(seconds=30)
    for index in range(2):
        pod = worker_pod(index, job["metadata"]["uid"], 2000 + index)
        pod["metadata"]["deletionTimestamp"] = stopping.strftime("%Y-%m-%dT%H:%M:%SZ")
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        store.observe("MODIFIED", pod)
    api.requests.clear()
    settle(reconciler)
    assert api.requests["PATCH jobs"] == 1  # resumed
    assert api.requests["DELETE jobs"] == 0  # no group restart
    status = api.objects[("finetunejobs", "ns", "tiny")]["status"]
    assert status["restarts"] == 0 and "lastFailure" not in status


@pytest.mark.parametrize("case", ["cpu-tiny", "qlora-4x2", "dpo"])
def test_render_prints_exactly_what_the_operator_applies(api: FakeApiKube, case: str) -> None:
    manifest = yaml.safe_load((GOLDEN / f"{case}.in.yaml").read_text())
    manifest["metadata"].update(namespace="ns", uid="ftj-uid", generation=1)
    name = manifest["metadata"]["name"]
    api.add(manifest)
    store = Store()
    fill(store, api, ["ns"])
    Reconciler(kube=api, settings=OperatorSettings(), store=store).reconcile_named("ns", name)

    rendered = list(yaml.safe_load_all(render(yaml.safe_dump(manifest), OperatorSettings())))
    applied = []
    for obj in rendered:
        plural = _RESOURCES[(obj["apiVersion"], obj["kind"])][1]
        written = copy.deepcopy(api.objects[(plural, "ns", obj["metadata"]["name"])])
        for server_field in ("uid", "resourceVersion"):
            del written["metadata"][server_field]  # set by the API server, not by either
        applied.append(written)
    assert applied == rendered
    created = {key for key in api.objects if key[0] != "finetunejobs"}
    assert len(created) == len(rendered), created


@dataclass
class RejectingJobsKube(FakeApiKube):
    """The API server refuses the worker Job, as it does a priorityClassName that is no name."""

    def request(self, method: str, path: str, **kwargs: Any) -> Obj | None:
        if method == "POST" and path.endswith("/jobs"):
            raise KubeError(422, 'Job.batch "tiny-worker" is invalid: priorityClassName')
        return super().request(method, path, **kwargs)


def test_a_rejected_child_is_reported_once_with_every_other_condition_kept() -> None:
    api = RejectingJobsKube()
    api.add(finetunejob())
    store = Store()
    fill(store, api, ["ns"])
    reconciler = Reconciler(kube=api, settings=OperatorSettings(), store=store)
    api.requests.clear()
    reconciler.reconcile_named("ns", "tiny")
    assert api.requests["PATCH finetunejobs/status"] == 2  # the pass's status, then the refusal
    conditions = {
        c["type"]: c["reason"]
        for c in api.objects[("finetunejobs", "ns", "tiny")]["status"]["conditions"]
    }
    assert conditions["Created"] == "ObjectRejected"
    assert {"Valid", "Running", "Failed", "Succeeded", "Suspended"} <= set(conditions)

    # The next pass finds nothing to write: the refusal stands until the spec changes.
    api.requests.clear()
    reconciler.reconcile_named("ns", "tiny")
    assert "PATCH finetunejobs/status" not in api.requests, api.requests
