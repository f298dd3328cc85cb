"""The product in real containers on the local cluster's real node (hack/kwok/real-node.sh).

`helm install` of the chart with the locally built operator image (the operator runs as a pod,
with the chart's ServiceAccount and in-cluster config); `kubectl apply` of the tiny CPU example
with two workers on the real node, which rendezvous through the headless Service's DNS names,
patch their FinetuneJob's status with their pods' ServiceAccount token and write checkpoints
and the adapter to a PersistentVolume as uid 1000 on a read-only root filesystem; a worker
deleted mid-run restarts the group from the last checkpoint; `helm uninstall` keeps the CRD
and the jobs, and a second install picks them up.

The tests run in file order and share one cluster, one release and one namespace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import (
    Cluster,
    audited_requests,
    service_account_username,
    unique_name,
    wait_for,
)
from real_node_fixtures import (
    REAL_NODE,
    RELEASE,
    RELEASE_NAMESPACE,
    Images,
    helm,
    helm_install,
    output_volume,
    progress_records,
    real_cluster,
    tiny_job,
)

__all__ = ["real_cluster"]  # registered as a fixture

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
JOB = "tiny-cpu"
# Long enough (about a minute of training) to delete a worker between two checkpoints.
MAX_STEPS = 200
CLAIM = "finetune-output"


@pytest.fixture(scope="module")
def cluster(real_cluster: tuple[Cluster, Images]) -> Cluster:
    return real_cluster[0]


@pytest.fixture(scope="module")
def images(real_cluster: tuple[Cluster, Images]) -> Images:
    return real_cluster[1]


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[Any]:
    client = cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def core(api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def custom(api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, core: Any) -> str:
    name = unique_name("real-node")
    cluster.kubectl("create", "namespace", name, check=True)
    wait_for(
        lambda: (
            core.list_namespaced_service_account(name, field_selector="metadata.name=default").items
        ),
        timeout=60,
        description=f"serviceaccount {name}/default",
    )
    return name


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-node") / "volume"


def operator_pods(core: Any) -> list[Any]:
    return list(
        core.list_namespaced_pod(
            RELEASE_NAMESPACE, label_selector="app.kubernetes.io/name=finetune-operator"
        ).items
    )


def worker_pods(core: Any, namespace: str) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector="finetune.dev/role=worker").items
    return sorted(pods, key=lambda pod: pod.metadata.name)


def ftj_status(custom: Any, namespace: str) -> dict[str, Any]:
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)
    status: dict[str, Any] = job.get("status") or {}
    return status


def describe(cluster: Cluster, namespace: str) -> str:
    return "\n".join(
        cluster.kubectl(*args).stdout + cluster.kubectl(*args).stderr
        for args in (
            ("describe", "ftj", "-n", namespace),
            ("get", "pods", "-A", "-o", "wide"),
            ("logs", "-n", RELEASE_NAMESPACE, "deploy/finetune-operator", "--tail=60"),
        )
    )


def test_chart_runs_the_operator_in_a_pod_on_the_real_node(
    cluster: Cluster, images: Images, core: Any
) -> None:
    installed = helm_install(cluster, images)
    assert installed.returncode == 0, installed.stderr + describe(cluster, "default")
    (pod,) = [p for p in operator_pods(core) if p.metadata.deletion_timestamp is None]
    assert pod.spec.node_name == REAL_NODE
    assert pod.status.phase == "Running"
    assert all(c.ready for c in pod.status.container_statuses)
    # The chart's ServiceAccount; the container is the image built here, run as the chart says.
    assert pod.spec.service_account_name == RELEASE
    (container,) = pod.status.container_statuses
    assert container.image_id == images.operator_id, container.image_id
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    # In-cluster config: the operator's requests are its ServiceAccount's, and RBAC allowed them.
    events = audited_requests(cluster, service_account_username(RELEASE_NAMESPACE, RELEASE))
    assert events, "the operator made no request as its ServiceAccount"


def test_tiny_job_trains_in_real_containers_and_survives_a_deleted_worker(
    cluster: Cluster, images: Images, core: Any, custom: Any, namespace: str, output: Path
) -> None:
    applied = cluster.kubectl(
        "apply", "-f", "-", input=yaml.safe_dump_all(output_volume(namespace, CLAIM, output))
    )
    assert applied.returncode == 0, applied.stderr
    manifest = tiny_job(namespace, CLAIM, MAX_STEPS)
    applied = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    assert applied.returncode == 0, applied.stderr

    # `kubectl get ftj` while it trains: STEP and LOSS filled in by the workers' reports.
    seen: list[tuple[str, str]] = []
    placements: dict[str, tuple[str, str]] = {}
    victim = ""
    checkpoint_at_delete = 0
    phase = ""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        rows = cluster.kubectl("get", "ftj", JOB, "-n", namespace, "--no-headers").stdout.split()
        phase = rows[1] if len(rows) > 1 else ""
        row = (rows[3], rows[4]) if len(rows) >= 6 and "/" in rows[3] else None
        if phase == "Running" and row and (not seen or seen[-1] != row):
            seen.append(row)
        for pod in worker_pods(core, namespace):
            for status in pod.status.container_statuses or []:
                if status.image_id:
                    placements[pod.metadata.name] = (pod.spec.node_name, status.image_id)
        status = ftj_status(custom, namespace)
        checkpoint = (status.get("checkpoint") or {}).get("step", 0)
        if not victim and phase == "Running" and checkpoint >= 10:
            # Mid-run, after a checkpoint: the whole group restarts from it.
            running = [p for p in worker_pods(core, namespace) if p.status.phase == "Running"]
            if len(running) == 2 and checkpoint < MAX_STEPS:
                victim = running[1].metadata.name
                checkpoint_at_delete = checkpoint
                core.delete_namespaced_pod(victim, namespace)
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(2)
    assert phase == "Succeeded", describe(cluster, namespace)
    assert victim, "no worker was deleted mid-run (the run ended before its first checkpoint)"

    status = ftj_status(custom, namespace)
    assert status["progress"]["step"] == status["progress"]["maxSteps"] == MAX_STEPS
    assert status["checkpoint"]["step"] == MAX_STEPS
    assert status["restarts"] == 1 and status["lastFailure"]["pod"] == victim
    steps = [int(step.split("/")[0]) for step, _ in seen]
    assert len(set(steps)) >= 2, seen
    assert all(loss not in ("", "<none>") for _, loss in seen[1:]), seen

    # Every worker of both groups ran on the real node from the trainer image built here.
    assert len(placements) >= 3, placements  # two workers, and the deleted one's successor
    assert {node for node, _ in placements.values()} == {REAL_NODE}, placements
    assert {image_id for _, image_id in placements.values()} == {images.trainer_id}, placements
    pods = worker_pods(core, namespace)
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"]
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 0 for p in pods)
    for pod in pods:
        assert pod.spec.security_context.run_as_user == 1000
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
        # Rank 0 is reached by its DNS name under the headless Service, not an address.
        master = [a for a in pod.spec.containers[0].command if a.startswith("--master-addr=")]
        assert master and master[0].endswith(f".{JOB}-workers"), master

    # The restarted group resumed from the checkpoint there was when the worker was deleted.
    records = progress_records(output)
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] >= checkpoint_at_delete, resumed
    # Checkpoints and the adapter are on the volume, written by uid 1000.
    adapters = [p for p in output.rglob("adapter_config.json") if "checkpoint" not in str(p)]
    assert adapters, sorted(str(p) for p in output.rglob("*"))[:50]
    assert adapters[0].stat().st_uid == 1000
    assert list(output.rglob("checkpoint-*"))

    # The workers patched their own FinetuneJob's status with their ServiceAccount's token.
    account = pods[0].spec.service_account_name
    events = audited_requests(cluster, service_account_username(namespace, account))
    patches = [
        e
        for e in events
        if e.get("verb") == "patch"
        and (e.get("objectRef") or {}).get("subresource") == "status"
        and (e.get("objectRef") or {}).get("name") == JOB
    ]
    assert patches and all(e["responseStatus"]["code"] == 200 for e in patches)


def test_uninstall_keeps_crd_and_jobs_and_a_new_install_takes_over(
    cluster: Cluster, images: Images, core: Any, custom: Any, namespace: str
) -> None:
    uninstalled = helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait")
    assert uninstalled.returncode == 0, uninstalled.stderr
    wait_for(lambda: not operator_pods(core), timeout=120, description="operator pods gone")
    crd = cluster.kubectl("get", "crd", f"{PLURAL}.{GROUP}", "-o", "name")
    assert crd.returncode == 0, crd.stderr
    assert ftj_status(custom, namespace)["phase"] == "Succeeded"

    installed = helm_install(cluster, images)
    assert installed.returncode == 0, installed.stderr + describe(cluster, namespace)
    (pod,) = [p for p in operator_pods(core) if p.metadata.deletion_timestamp is None]
    assert pod.spec.node_name == REAL_NODE and pod.status.phase == "Running"
    # The new operator reconciles the finished job and leaves it as it was.
    time.sleep(5)
    status = ftj_status(custom, namespace)
    assert status["phase"] == "Succeeded" and status["restarts"] == 1
