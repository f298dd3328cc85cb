"""The watch cache (`cache.Store`): resourceVersion guard, tombstones, trimming, the pod index,
and `fill`'s reconciliation of a LIST with what is stored."""

from __future__ import annotations

from typing import Any

from finetune_operator.controller.cache import Store, fill, job_key, trim
from finetune_operator.status import pod_view


def obj(kind: str, name: str, rv: str, api_version: str = "v1", **extra: Any) -> dict[str, Any]:
    labels = extra.pop("labels", {"finetune.dev/job-name": "j"})
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "labels": labels},
        **extra,
    }


def test_newer_replaces_older_never() -> None:
    store = Store()
    assert store.observe("ADDED", obj("ConfigMap", "c", "10", data={"v": "1"}))
    assert store.observe("MODIFIED", obj("ConfigMap", "c", "12", data={"v": "2"}))
    # an older copy (a late watch event after our own write's answer) is ignored
    assert not store.observe("MODIFIED", obj("ConfigMap", "c", "11", data={"v": "old"}))
    # the same version again (kopf's re-list) changes nothing
    assert not store.observe(None, obj("ConfigMap", "c", "12", data={"v": "2"}))
    stored = store.get("v1", "ConfigMap", "ns", "c")
    assert stored is not None and stored["data"] == {"v": "2"}
    # numeric comparison, not string: "9" < "10"
    assert not store.observe("MODIFIED", obj("ConfigMap", "c", "9"))


def test_deleted_objects_do_not_come_back() -> None:
    store = Store()
    store.observe("ADDED", obj("Service", "s", "5"))
    assert store.observe("DELETED", obj("Service", "s", "7"))
    assert store.get("v1", "Service", "ns", "s") is None
    # a write's answer or late event from before the deletion does not resurrect it
    assert not store.observe("MODIFIED", obj("Service", "s", "6"))
    assert store.get("v1", "Service", "ns", "s") is None
    # a new object by that name does
    assert store.observe("ADDED", obj("Service", "s", "8"))
    assert store.get("v1", "Service", "ns", "s") is not None
    # a deletion older than what is stored is ignored (recreated since)
    assert not store.observe("DELETED", obj("Service", "s", "7"))
    assert store.get("v1", "Service", "ns", "s") is not None
    # forget: our DELETE said it is gone
    assert store.forget(obj("Service", "s", ""))
    assert not store.observe("MODIFIED", obj("Service", "s", "8"))


def test_opaque_resource_versions_are_taken_as_they_come() -> None:
    store = Store()
    store.observe("ADDED", obj("ConfigMap", "c", "b", data={"v": "1"}))
    assert store.observe("MODIFIED", obj("ConfigMap", "c", "a", data={"v": "2"}))


def full_pod(name: str, rv: str, job: str = "j", owner: str = "job-uid") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "labels": {"finetune.dev/job-name": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
            "ownerReferences": [{"kind": "Job", "uid": owner}],
            "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:x": {}}}],
            "generateName": f"{job}-worker-",
            "creationTimestamp": "2026-01-01T12:00:00Z",
        },
        "spec": {
            "nodeName": "gpu-node-3",
            "containers": [{"name": "trainer", "image": "img", "env": [{"name": "A"}] * 20}],
            "volumes": [{"name": "v"}] * 5,
        },
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "hostIP": "10.0.0.1",
            "conditions": [
                {"type": "Ready", "status": "False", "lastProbeTime": None},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t"},
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "img",
                    "imageID": "sha",
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "message": "out of memory",
                            "startedAt": "t",
                        }
                    },
                    "lastState": {},
                }
            ],
        },
    }


def test_pods_are_trimmed_to_what_the_reconciler_reads() -> None:
    pod = full_pod("p", "3")
    trimmed = trim(pod)
    assert pod_view(trimmed) == pod_view(pod)
    assert "managedFields" not in trimmed["metadata"]
    assert "generateName" not in trimmed["metadata"]
    assert trimmed["spec"] == {"nodeName": "gpu-node-3"}
    assert "hostIP" not in trimmed["status"]
    assert trimmed["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
    assert len(repr(trimmed)) < len(repr(pod)) / 2


def test_every_object_loses_managed_fields_and_last_applied() -> None:
    body = obj(
        "FinetuneJob",
        "j",
        "1",
        api_version="finetune.dev/v1alpha1",
        spec={"workers": 2},
    )
    body["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    body["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": "{...}",
        "keep": "me",
    }
    trimmed = trim(body)
    assert "managedFields" not in trimmed["metadata"]
    assert trimmed["metadata"]["annotations"] == {"keep": "me"}
    assert trimmed["spec"] == {"workers": 2}
    assert "managedFields" in body["metadata"]  # the input is not changed


def test_pods_are_indexed_by_job() -> None:
    store = Store()
    store.observe("ADDED", full_pod("a-0", "1", job="a"))
    store.observe("ADDED", full_pod("a-1", "2", job="a"))
    store.observe("ADDED", full_pod("b-0", "3", job="b"))
    assert sorted(p["metadata"]["name"] for p in store.pods_of("ns", "a")) == ["a-0", "a-1"]
    assert [p["metadata"]["name"] for p in store.pods_of("ns", "b")] == ["b-0"]
    assert store.pods_of("other", "a") == []
    store.observe("DELETED", full_pod("a-0", "4", job="a"))
    assert [p["metadata"]["name"] for p in store.pods_of("ns", "a")] == ["a-1"]
    # relabelled: moves between jobs
    store.observe("MODIFIED", full_pod("a-1", "5", job="b"))
    assert store.pods_of("ns", "a") == []
    assert len(store.pods_of("ns", "b")) == 2


def test_job_key() -> None:
    ftj = obj("FinetuneJob", "j", "1", api_version="finetune.dev/v1alpha1", labels={})
    assert job_key(ftj) == ("ns", "j")
    assert job_key(full_pod("p", "1", job="other")) == ("ns", "other")
    assert job_key(obj("ConfigMap", "c", "1", labels={})) is None


class ListingKube:
    """Answers `list_pages` from a dict kind -> (items, list resourceVersion)."""

    def __init__(self, lists: dict[str, tuple[list[dict[str, Any]], str]]) -> None:
        self.lists = lists
        self.calls: list[tuple[str, str | None, str | None]] = []

    def list_pages(
        self, api_version: str, kind: str, namespace: str | None, selector: str | None = None
    ) -> Any:
        self.calls.append((kind, namespace, selector))
        items, rv = self.lists.get(kind, ([], "100"))
        # LIST items carry no apiVersion/kind
        yield [{k: v for k, v in i.items() if k not in ("apiVersion", "kind")} for i in items], rv


def test_fill_lists_every_kind_and_removes_what_is_gone() -> None:
    store = Store()
    ftj = obj("FinetuneJob", "j", "10", api_version="finetune.dev/v1alpha1", labels={})
    kube = ListingKube(
        {
            "FinetuneJob": ([ftj], "20"),
            "Pod": ([full_pod("j-0", "11"), full_pod("j-1", "12")], "20"),
        }
    )
    touched = fill(store, kube, ["ns"])  # type: ignore[arg-type]
    assert touched == {("ns", "j")}
    assert {c[0] for c in kube.calls} == {
        "FinetuneJob",
        "Job",
        "Pod",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
    }
    assert all(c[2] == "finetune.dev/job-name" for c in kube.calls if c[0] != "FinetuneJob")
    assert store.get("finetune.dev/v1alpha1", "FinetuneJob", "ns", "j") is not None
    assert len(store.pods_of("ns", "j")) == 2

    # Unchanged: nothing touched. j-1 gone, and a pod newer than the list is kept.
    store.observe("ADDED", full_pod("j-2", "25"))
    kube.lists["Pod"] = ([full_pod("j-0", "11")], "21")
    assert fill(store, kube, ["ns"]) == {("ns", "j")}  # type: ignore[arg-type]
    assert sorted(p["metadata"]["name"] for p in store.pods_of("ns", "j")) == ["j-0", "j-2"]
    assert fill(store, kube, ["ns"]) == set()  # type: ignore[arg-type]
