"""The operator under real Kueue (v0.17.0, hack/tools/kueue) on the simulated Intel GPU nodes.

Kueue is started on the session's cluster by `FTO_KUEUE=1 hack/dev-cluster up` (its controller
as a local process, its webhooks registered with the API server) and stopped again when this
module is done. Each test makes its own ClusterQueue with 8 `gpu.intel.com/i915` (one 4 x 2
job), a LocalQueue in its namespace, and FinetuneJobs whose worker pods stay Running until the
test ends them, as training would.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from local_cluster import DEV_CLUSTER, REPO_ROOT, Cluster, set_pod_phase, unique_name, wait_for
from operator_fixtures import Ftj, OperatorProcess, xpu_job

from finetune_operator.settings import FIELD_MANAGER

pytestmark = pytest.mark.e2e

KUEUE = ("kueue.x-k8s.io", "v1beta2")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
FLAVOR_NODE_LABEL = "gpu.intel.com/family"


def dev_cluster(cluster: Cluster, *args: str, kueue: bool) -> subprocess.CompletedProcess[str]:
    # kwokctl keeps each cluster's kubeconfig in a folder named after the cluster.
    env = dict(os.environ, FTO_CLUSTER_NAME=cluster.kubeconfig.parent.name)
    if kueue:
        env["FTO_KUEUE"] = "1"
    return subprocess.run(
        [str(DEV_CLUSTER), *args], capture_output=True, text=True, env=env, timeout=1800
    )


@pytest.fixture(scope="module")
def kueue(cluster: Cluster) -> Iterator[None]:
    """Kueue on the session's cluster for this module; removed afterwards (its CRDs stay)."""
    started = dev_cluster(cluster, "up", kueue=True)
    assert started.returncode == 0, started.stderr[-6000:]
    try:
        yield
    finally:
        stopped = dev_cluster(cluster, "kueue-stop", kueue=True)
        assert stopped.returncode == 0, stopped.stderr[-3000:]


@pytest.fixture
def queue(kueue: None, cluster: Cluster, ftj: Ftj) -> Iterator[str]:
    """A ClusterQueue of 8 GPUs (higher priority preempts lower) and its LocalQueue in the
    test's namespace, from examples/kueue-queues.yaml; the LocalQueue's name."""
    cluster_queue = unique_name("gpus")
    documents = list(yaml.safe_load_all((REPO_ROOT / "examples" / "kueue-queues.yaml").read_text()))
    by_kind = {d["kind"]: d for d in documents}
    by_kind["ClusterQueue"]["metadata"]["name"] = cluster_queue
    by_kind["LocalQueue"]["spec"]["clusterQueue"] = cluster_queue
    by_kind["LocalQueue"]["metadata"]["namespace"] = ftj.namespace
    applied = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    assert applied.returncode == 0, applied.stderr
    try:
        yield str(by_kind["LocalQueue"]["metadata"]["name"])
    finally:
        cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false")


def queued_job(name: str, queue: str, priority: str | None = None) -> dict[str, Any]:
    manifest = xpu_job(name, workers=4, devices=2)
    labels = {QUEUE_LABEL: queue}
    if priority:
        labels[PRIORITY_LABEL] = priority
    manifest["metadata"]["labels"] = labels
    return manifest


def suspend_owners(job: Any) -> set[str]:
    """The field managers that own the Job's spec.suspend (server-side apply bookkeeping)."""
    return {
        entry.manager
        for entry in job.metadata.managed_fields or []
        if "f:suspend" in ((entry.fields_v1 or {}).get("f:spec") or {})
    }


def worker_job(ftj: Ftj, name: str) -> Any:
    jobs = ftj.jobs(name)
    assert len(jobs) == 1, [j.metadata.name for j in jobs]
    return jobs[0]


def workloads(ftj: Ftj) -> list[dict[str, Any]]:
    found: dict[str, Any] = ftj.custom_api.list_namespaced_custom_object(
        *KUEUE, ftj.namespace, "workloads"
    )
    return list(found["items"])


def finish(ftj: Ftj, name: str) -> None:
    """Every worker of `name` exits 0, as at the end of training."""
    for pod in ftj.pods(name):
        set_pod_phase(ftj.core_api, ftj.namespace, pod.metadata.name, "Succeeded")
    ftj.wait_phase(name, "Succeeded", timeout=60)


def running(ftj: Ftj, name: str, timeout: float = 90) -> dict[str, Any]:
    return ftj.wait_phase(name, "Running", timeout=timeout)


def test_the_second_job_waits_in_the_queue_then_runs(
    operator: OperatorProcess, ftj: Ftj, queue: str
) -> None:
    first, second = unique_name("first"), unique_name("second")
    assert ftj.apply(queued_job(first, queue)).returncode == 0
    running(ftj, first)
    # Kueue admitted the whole group as one workload, with its flavor's node label, and the
    # operator kept what Kueue set.
    admitted = worker_job(ftj, first)
    assert admitted.spec.suspend is False
    assert admitted.spec.template.spec.node_selector.get(FLAVOR_NODE_LABEL) == "Max_Series"
    assert ftj.condition(first, "Queued")["reason"] == "Admitted"
    assert len(ftj.pods(first)) == 4
    # Kueue, not the operator, owns the switch; and the operator's applies were accepted.
    assert FIELD_MANAGER not in suspend_owners(admitted)
    assert ftj.condition(first, "Created")["reason"] == "ObjectsCreated"

    assert ftj.apply(queued_job(second, queue)).returncode == 0
    status = ftj.wait_phase(second, "Queued", timeout=60)
    held = ftj.condition(second, "Queued")
    assert held["status"] == "True" and held["reason"] == "Queued"
    assert queue in held["message"]
    assert ftj.table_row(second)["PHASE"] == "Queued"
    assert status["restarts"] == 0
    assert worker_job(ftj, second).spec.suspend is True
    assert ftj.pods(second) == []
    # Still waiting a while later: the operator does not unsuspend it.
    wait_for(lambda: len(workloads(ftj)) == 2, timeout=30, description="two workloads")
    assert ftj.status(second)["phase"] == "Queued" and ftj.pods(second) == []

    finish(ftj, first)
    status = running(ftj, second)
    assert status["restarts"] == 0
    assert ftj.condition(second, "Queued")["reason"] == "Admitted"
    assert ftj.table_row(second)["PHASE"] == "Running"

    # The user's suspend still works for a queued job: its Job (and workload) goes, the quota
    # is free; resuming queues it again and it runs.
    ftj.patch_spec(second, {"suspend": True})
    ftj.wait_phase(second, "Suspended", timeout=60)
    wait_for(lambda: not ftj.jobs(second), timeout=60, description="the Job deleted")
    assert ftj.condition(second, "Queued")["reason"] == "Suspended"
    ftj.patch_spec(second, {"suspend": False})
    status = running(ftj, second)
    assert status["restarts"] == 0 and "lastFailure" not in status


def test_a_higher_priority_job_preempts_and_the_first_resumes(
    operator: OperatorProcess, ftj: Ftj, queue: str
) -> None:
    low, high = unique_name("research"), unique_name("production")
    assert ftj.apply(queued_job(low, queue, "research")).returncode == 0
    running(ftj, low)
    first_pods = {p.metadata.uid for p in ftj.pods(low)}
    # Rank 0 reports a checkpoint, as the trainer does after each save.
    ftj.custom_api.patch_namespaced_custom_object_status(
        "finetune.dev",
        "v1alpha1",
        ftj.namespace,
        "finetunejobs",
        low,
        {"status": {"checkpoint": {"step": 20, "latest": "/output/checkpoint-20"}}},
    )

    assert ftj.apply(queued_job(high, queue, "production")).returncode == 0
    status = ftj.wait_phase(low, "Preempted", timeout=90)
    preempted = ftj.condition(low, "Queued")
    assert preempted["status"] == "True" and preempted["reason"] == "Preempted"
    assert status["restarts"] == 0 and "lastFailure" not in status
    assert ftj.condition(low, "Failed")["status"] == "False"
    assert ftj.table_row(low)["PHASE"] == "Preempted"
    running(ftj, high)
    assert worker_job(ftj, low).spec.suspend is True

    finish(ftj, high)
    status = running(ftj, low)
    # The same group resumes (a new set of pods, from the checkpoint it reported), with no
    # restart counted.
    assert status["restarts"] == 0 and "lastFailure" not in status
    assert status["checkpoint"]["step"] == 20
    assert not first_pods & {p.metadata.uid for p in ftj.pods(low)}
    assert ftj.condition(low, "Queued")["reason"] == "Admitted"
    finish(ftj, low)


def test_a_job_without_the_label_is_untouched_by_kueue(
    operator: OperatorProcess, ftj: Ftj, queue: str
) -> None:
    name = unique_name("unqueued")
    assert ftj.apply(xpu_job(name, workers=4, devices=2)).returncode == 0
    running(ftj, name)
    job = worker_job(ftj, name)
    assert QUEUE_LABEL not in (job.metadata.labels or {})
    assert FLAVOR_NODE_LABEL not in (job.spec.template.spec.node_selector or {})
    assert ftj.condition(name, "Queued") == {}
    assert workloads(ftj) == []
