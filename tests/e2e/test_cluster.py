"""The local control plane behaves like a real cluster for what the operator relies on: GPU nodes
as the Intel device plugin advertises them, CRD schema validation in the API server, the
scheduler placing pods by extended resources, the Job controller, garbage collection, and
tests taking over a pod's phase."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest
from kubernetes import client
from local_cluster import (
    ACCELERATOR_LABEL,
    CRDS_DIR,
    GPU_RESOURCE,
    SIMULATE_FAIL,
    SIMULATE_LABEL,
    SIMULATE_MANUAL,
    SIMULATE_RUNNING,
    set_pod_phase,
    wait_for,
)

pytestmark = pytest.mark.e2e

EXPECTED_GPU_NODES = int(os.environ.get("FTO_GPU_NODES", "4"))
EXPECTED_GPUS_PER_NODE = os.environ.get("FTO_GPUS_PER_NODE", "8")


def gpu_job(
    name: str,
    *,
    pods: int = 2,
    gpus_per_pod: int = 8,
    simulate: str | None = None,
    backoff_limit: int = 0,
) -> client.V1Job:
    """An Indexed Job whose pods each ask for Intel GPUs, as the operator's workers do."""
    labels = {"app": name}
    if simulate:
        labels[SIMULATE_LABEL] = simulate
    gpus = {GPU_RESOURCE: str(gpus_per_pod)}
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=pods,
            parallelism=pods,
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[
                        client.V1Container(
                            name="worker",
                            image="example.invalid/trainer:latest",
                            # Extended resources must be limits (requests default to them).
                            resources=client.V1ResourceRequirements(limits=gpus),
                        )
                    ],
                ),
            ),
        ),
    )


def job_pods(core_api: Any, namespace: str, job_name: str) -> list[Any]:
    return core_api.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items


def job_condition(batch_api: Any, namespace: str, job_name: str, condition: str) -> bool:
    job = batch_api.read_namespaced_job(job_name, namespace)
    return any(c.type == condition and c.status == "True" for c in (job.status.conditions or []))


def pods_in_phase(
    core_api: Any, namespace: str, job_name: str, phase: str, count: int
) -> list[Any]:
    pods = job_pods(core_api, namespace, job_name)
    matching = [p for p in pods if p.status.phase == phase]
    return matching if len(matching) >= count else []


def test_server_reports_pinned_kubernetes_version(kubectl):
    version = json.loads(kubectl("version", "-o", "json", check=True).stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.35.")
    assert version["clientVersion"]["gitVersion"].startswith("v1.35.")


def test_gpu_nodes_advertise_intel_gpus(core_api):
    gpu_nodes = core_api.list_node(label_selector=f"{ACCELERATOR_LABEL}=xpu").items
    assert len(gpu_nodes) == EXPECTED_GPU_NODES
    for node in gpu_nodes:
        assert node.status.allocatable[GPU_RESOURCE] == EXPECTED_GPUS_PER_NODE
        assert node.metadata.labels["intel.feature.node.kubernetes.io/gpu"] == "true"
        assert node.metadata.labels["gpu.intel.com/device-id.0380-0bd5.present"] == "true"
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True", node.metadata.name

    cpu_nodes = core_api.list_node(label_selector=f"{ACCELERATOR_LABEL}=cpu").items
    assert cpu_nodes, "expected a CPU-only node"
    assert all(GPU_RESOURCE not in node.status.allocatable for node in cpu_nodes)


def test_kubectl_get_nodes_shows_gpu_allocatable(kubectl):
    shown = kubectl(
        "get",
        "nodes",
        "-l",
        f"{ACCELERATOR_LABEL}=xpu",
        "-o",
        r"jsonpath={range .items[*]}{.status.allocatable.gpu\.intel\.com/i915}{'\n'}{end}",
        check=True,
    ).stdout.split()
    assert shown == [EXPECTED_GPUS_PER_NODE] * EXPECTED_GPU_NODES


def test_crds_apply(kubectl, finetunejob_crd):
    applied = kubectl("apply", "-f", str(CRDS_DIR))
    assert applied.returncode == 0, applied.stderr
    established = kubectl(
        "get",
        "crd",
        "finetunejobs.finetune.dev",
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Established')].status}",
    )
    assert established.stdout == "True"


FINETUNEJOB_WITH_ZERO_WORKERS = """
apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata:
  name: {name}
spec:
  model: {{name: m}}
  dataset: {{name: d}}
  workers: {workers}
"""


def test_finetunejob_with_zero_workers_is_rejected_by_the_api_server(
    kubectl, namespace, finetunejob_crd
):
    rejected = kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=FINETUNEJOB_WITH_ZERO_WORKERS.format(name="zero", workers=0),
    )
    assert rejected.returncode != 0
    assert "spec.workers" in rejected.stderr
    assert "should be greater than or equal to 1" in rejected.stderr

    # The same object with one worker is accepted: the rejection was the schema's minimum.
    accepted = kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=FINETUNEJOB_WITH_ZERO_WORKERS.format(name="one", workers=1),
    )
    assert accepted.returncode == 0, accepted.stderr


def test_indexed_gpu_job_is_scheduled_on_gpu_nodes_and_completes(core_api, batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("train"))

    wait_for(
        lambda: job_condition(batch_api, namespace, "train", "Complete"),
        timeout=60,
        description="job train to complete",
    )
    pods = job_pods(core_api, namespace, "train")
    assert sorted(
        p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods
    ) == ["0", "1"]
    assert all(p.status.phase == "Succeeded" for p in pods)
    # Eight GPUs each: one whole node per pod.
    node_names = {p.spec.node_name for p in pods}
    assert len(node_names) == 2
    for node_name in node_names:
        node = core_api.read_node(node_name)
        assert node.metadata.labels[ACCELERATOR_LABEL] == "xpu"


def test_pod_that_fits_no_node_stays_pending(core_api, batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("too-big", pods=1, gpus_per_pod=16))

    def unschedulable() -> bool:
        pods = job_pods(core_api, namespace, "too-big")
        return bool(pods) and any(
            c.type == "PodScheduled" and c.reason == "Unschedulable"
            for c in (pods[0].status.conditions or [])
        )

    wait_for(unschedulable, timeout=60, description="the scheduler to report Unschedulable")


def test_deleting_the_owner_garbage_collects_its_pods(core_api, batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("owner", simulate=SIMULATE_RUNNING))
    wait_for(
        lambda: pods_in_phase(core_api, namespace, "owner", "Running", 2),
        timeout=60,
        description="both pods Running",
    )

    # Background propagation: the Job goes at once and the garbage collector deletes the pods.
    batch_api.delete_namespaced_job(
        "owner", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )
    wait_for(
        lambda: not job_pods(core_api, namespace, "owner"),
        timeout=60,
        description="the garbage collector to delete the job's pods",
    )


def test_a_test_drives_a_manual_pod_through_its_phases(core_api, batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("manual", pods=1, simulate=SIMULATE_MANUAL))
    pod = wait_for(
        lambda: next(
            iter(p for p in job_pods(core_api, namespace, "manual") if p.spec.node_name), None
        ),
        timeout=60,
        description="the manual pod to be scheduled",
    )
    # kwok leaves it alone: scheduled, but Pending until the test says otherwise.
    assert core_api.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Pending"

    set_pod_phase(core_api, namespace, pod.metadata.name, "Running")
    assert core_api.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Running"

    set_pod_phase(core_api, namespace, pod.metadata.name, "Failed", exit_code=3)
    wait_for(
        lambda: job_condition(batch_api, namespace, "manual", "Failed"),
        timeout=60,
        description="job manual to fail",
    )
    terminated = core_api.read_namespaced_pod(pod.metadata.name, namespace).status
    assert terminated.container_statuses[0].state.terminated.exit_code == 3


def test_running_pods_stay_running_until_the_test_ends_them(core_api, batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("held", pods=1, simulate=SIMULATE_RUNNING))
    (pod,) = wait_for(
        lambda: pods_in_phase(core_api, namespace, "held", "Running", 1),
        timeout=60,
        description="the pod to run",
    )
    # Long enough for kwok's pod-complete stage to have fired, were it going to.
    time.sleep(2)
    assert core_api.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Running"
    assert not job_condition(batch_api, namespace, "held", "Complete")

    set_pod_phase(core_api, namespace, pod.metadata.name, "Succeeded")
    wait_for(
        lambda: job_condition(batch_api, namespace, "held", "Complete"),
        timeout=60,
        description="job held to complete",
    )


def test_fail_mode_fails_job_pods(batch_api, namespace):
    batch_api.create_namespaced_job(namespace, gpu_job("doomed", pods=1, simulate=SIMULATE_FAIL))
    wait_for(
        lambda: job_condition(batch_api, namespace, "doomed", "Failed"),
        timeout=60,
        description="job doomed to fail",
    )


def test_helm_is_built_at_the_pinned_version(cluster):
    shown = subprocess.run(
        ["helm", "version", "--short"], capture_output=True, text=True, env=cluster.env()
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("v3.")
