"""The operator on the real local control plane: `finetune-operator run` as a subprocess, worker
pods simulated by kwok (Running until the test sets their phase, as a kubelet would)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from local_cluster import GPU_RESOURCE, set_pod_phase, wait_for
from operator_fixtures import (
    Ftj,
    OperatorProcess,
    eventually,
    xpu_job,
)

pytestmark = pytest.mark.e2e


def finish_pods(ftj: Ftj, name: str, phase: str = "Succeeded", **kwargs: Any) -> None:
    for pod in ftj.pods(name):
        set_pod_phase(ftj.core_api, ftj.namespace, pod.metadata.name, phase, **kwargs)


def test_apply_creates_objects_runs_and_succeeds(ftj: Ftj, operator: OperatorProcess) -> None:
    assert ftj.apply(xpu_job("llama", workers=2, devices=2)).returncode == 0
    status = ftj.wait_phase("llama", "Running")
    assert status["workers"] == {"desired": 2, "ready": 2, "summary": "2/2"}
    assert status["resolved"]["gradientAccumulationSteps"] == 16
    assert status["worldSize"] == 4 and status["restarts"] == 0 and status["startTime"]

    uid = ftj.get("llama")["metadata"]["uid"]
    for kind, name in [
        ("serviceaccount", "llama-trainer"),
        ("role", "llama-trainer"),
        ("rolebinding", "llama-trainer"),
        ("configmap", "llama-config"),
        ("service", "llama-workers"),
        ("job", "llama-worker"),
    ]:
        obj = json.loads(ftj.kubectl("get", kind, name, "-o", "json").stdout)
        assert [ref["uid"] for ref in obj["metadata"]["ownerReferences"]] == [uid], kind
    config = json.loads(
        json.loads(ftj.kubectl("get", "configmap", "llama-config", "-o", "json").stdout)["data"][
            "config.json"
        ]
    )
    assert config["worldSize"] == 4

    pods = ftj.pods("llama")
    assert len(pods) == 2
    for pod in pods:
        node = ftj.core_api.read_node(pod.spec.node_name)
        assert int(node.status.allocatable[GPU_RESOURCE]) >= 2
        assert pod.spec.containers[0].resources.limits[GPU_RESOURCE] == "2"

    row = ftj.table_row("llama")
    assert list(row) == ["NAME", "PHASE", "WORKERS", "STEP", "LOSS", "AGE"]
    assert [row["NAME"], row["PHASE"], row["WORKERS"]] == ["llama", "Running", "2/2"]

    # The trainer's report (as rank 0 patches it) shows in the step and loss columns.
    ftj.custom_api.patch_namespaced_custom_object_status(
        "finetune.dev",
        "v1alpha1",
        ftj.namespace,
        "finetunejobs",
        "llama",
        {"status": {"progress": {"step": 7, "maxSteps": 100, "summary": "7/100", "loss": 1.25}}},
    )
    eventually(lambda: ftj.table_row("llama")["STEP"] == "7/100")
    assert ftj.table_row("llama")["LOSS"] == "1.25"

    finish_pods(ftj, "llama")
    status = ftj.wait_phase("llama", "Succeeded")
    assert status["completionTime"]
    assert status["progress"]["step"] == 7  # the trainer's fields are left alone
    described = ftj.kubectl("describe", "ftj", "llama").stdout
    for text in ["Valid", "SpecValid", "ObjectsCreated", "AllWorkersRunning", "TrainingComplete"]:
        assert text in described, text
    expected = {"SpecValid", "ObjectsCreated", "AllWorkersRunning", "TrainingComplete"}
    eventually(lambda: expected <= set(ftj.event_reasons("llama")))
    # Status carries no kopf bookkeeping, and the object no kopf finalizer.
    body = ftj.get("llama")
    assert not [k for k in body["status"] if "kopf" in k]
    assert not body["metadata"].get("finalizers")


def test_bad_specs_rejected_at_apply(ftj: Ftj, operator: OperatorProcess) -> None:
    three = ftj.apply(xpu_job("three", workers=3, devices=1))
    assert three.returncode != 0 and "batch rule" in three.stderr
    bad_method = ftj.apply(xpu_job("bad-method", method="sft"))
    assert bad_method.returncode != 0 and "method" in bad_method.stderr
    cpu_gpu = ftj.apply(xpu_job("cpu", device="cpu", deviceResource=GPU_RESOURCE))
    assert cpu_gpu.returncode != 0
    assert ftj.kubectl("get", "ftj", "-o", "name").stdout.strip() == ""


def test_bad_spec_reported_valid_false_and_nothing_created(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    manifest = xpu_job("badval", dataset={"name": "yahma/alpaca-cleaned", "validationSize": 1.5})
    assert ftj.apply(manifest).returncode == 0  # the schema allows it; the operator does not
    valid = eventually(
        lambda: (
            ftj.condition("badval", "Valid").get("status") == "False"
            and ftj.condition("badval", "Valid")
        )
    )
    assert valid["reason"] == "InvalidSpec"
    assert "validationSize" in valid["message"] and "Nothing was created" in valid["message"]
    assert ftj.status("badval")["phase"] == "Pending"
    assert eventually(lambda: "InvalidSpec" in ftj.event_reasons("badval"))
    assert ftj.jobs("badval") == []
    assert "badval-config" not in ftj.kubectl("get", "configmaps", "-o", "name").stdout


def test_failed_and_deleted_pods_restart_the_group_then_fail(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    assert ftj.apply(xpu_job("gang", backoffLimit=2)).returncode == 0
    ftj.wait_phase("gang", "Running")
    first_job = ftj.jobs("gang")[0].metadata.uid

    # A worker fails: the whole group restarts (phase Restarting, restarts 1), then runs again.
    pod = ftj.pods("gang")[1].metadata.name
    set_pod_phase(ftj.core_api, ftj.namespace, pod, "Failed", exit_code=137)
    eventually(lambda: ftj.status("gang").get("restarts") == 1, what="restart counted")
    status = ftj.wait_phase("gang", "Running", restarts=1)
    assert status["lastFailure"]["pod"] == pod and status["lastFailure"]["exitCode"] == 137
    eventually(lambda: "Restarting" in ftj.event_reasons("gang"))
    assert ftj.jobs("gang")[0].metadata.uid != first_job
    assert len(ftj.pods("gang")) == 2

    # A deleted pod (a lost node does the same) restarts the group too.
    ftj.core_api.delete_namespaced_pod(ftj.pods("gang")[0].metadata.name, ftj.namespace)
    ftj.wait_phase("gang", "Running", restarts=2)

    # Past backoffLimit: Failed, with the pod's reason.
    pod = ftj.pods("gang")[0].metadata.name
    set_pod_phase(
        ftj.core_api, ftj.namespace, pod, "Failed", exit_code=3, message="CUDA out of sync"
    )
    status = ftj.wait_phase("gang", "Failed")
    assert status["restarts"] == 2 and status["completionTime"]
    failed = ftj.condition("gang", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert pod in failed["message"] and "exit code 3" in failed["message"]
    eventually(lambda: "BackoffLimitExceeded" in ftj.event_reasons("gang"))
    assert "BackoffLimitExceeded" in ftj.kubectl("describe", "ftj", "gang").stdout

    # Raising backoffLimit, as the message suggests, retries: one more counted restart.
    ftj.patch_spec("gang", {"backoffLimit": 3})
    status = ftj.wait_phase("gang", "Running", restarts=3)
    assert "completionTime" not in status
    assert ftj.condition("gang", "Failed")["status"] == "False"


def test_scale_two_to_four_workers(ftj: Ftj, operator: OperatorProcess) -> None:
    assert ftj.apply(xpu_job("scale", workers=2, devices=1)).returncode == 0
    status = ftj.wait_phase("scale", "Running")
    assert status["resolved"]["gradientAccumulationSteps"] == 32

    # A world size that breaks the batch rule is refused, and the running group stays.
    rejected = ftj.apply(xpu_job("scale", workers=3, devices=1))
    assert rejected.returncode != 0 and "batch rule" in rejected.stderr
    assert ftj.status("scale")["phase"] == "Running"

    ftj.patch_spec("scale", {"workers": 4})
    status = ftj.wait_phase("scale", "Running", worldSize=4, timeout=90)
    assert status["workers"] == {"desired": 4, "ready": 4, "summary": "4/4"}
    assert status["resolved"]["gradientAccumulationSteps"] == 16
    assert status["resolved"]["globalBatchSize"] == 128
    assert status["restarts"] == 0  # a scale is not a failure
    config = json.loads(
        json.loads(ftj.kubectl("get", "configmap", "scale-config", "-o", "json").stdout)["data"][
            "config.json"
        ]
    )
    assert config["workers"] == 4 and config["gradientAccumulationSteps"] == 16
    assert len(ftj.jobs("scale")) == 1 and len(ftj.pods("scale")) == 4
    scaling = eventually(lambda: [e for e in ftj.events("scale") if e.reason == "Scaling"])
    assert scaling and "world size 2 to 4" in scaling[0].message


def test_suspend_and_resume(ftj: Ftj, operator: OperatorProcess) -> None:
    assert ftj.apply(xpu_job("pause")).returncode == 0
    ftj.wait_phase("pause", "Running")
    ftj.patch_spec("pause", {"suspend": True})
    ftj.wait_phase("pause", "Suspended")
    eventually(lambda: ftj.pods("pause") == [], what="pods stopped")
    assert ftj.jobs("pause")[0].spec.suspend is True
    assert ftj.condition("pause", "Suspended")["status"] == "True"

    ftj.patch_spec("pause", {"suspend": False})
    ftj.wait_phase("pause", "Running")
    assert ftj.condition("pause", "Suspended")["reason"] == "Resumed"
    assert ftj.status("pause")["restarts"] == 0
    eventually(lambda: {"Suspended", "Resumed"} <= set(ftj.event_reasons("pause")))


def test_delete_removes_everything(ftj: Ftj, operator: OperatorProcess) -> None:
    assert ftj.apply(xpu_job("gone")).returncode == 0
    ftj.wait_phase("gone", "Running")
    assert ftj.kubectl("delete", "ftj", "gone", "--timeout=60s").returncode == 0

    def all_gone() -> bool:
        out = ftj.kubectl(
            "get",
            "jobs,pods,services,configmaps,serviceaccounts,roles,rolebindings",
            "-l",
            "finetune.dev/job-name=gone",
            "-o",
            "name",
        ).stdout
        return out.strip() == ""

    wait_for(all_gone, timeout=60, description="owned objects garbage-collected")


def test_ttl_after_finished_cleans_up_and_keeps_the_job(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    assert ftj.apply(xpu_job("ttl", ttlSecondsAfterFinished=3)).returncode == 0
    ftj.wait_phase("ttl", "Running")
    finish_pods(ftj, "ttl")
    ftj.wait_phase("ttl", "Succeeded")
    eventually(lambda: ftj.jobs("ttl") == [] and ftj.pods("ttl", live_only=False) == [], timeout=30)
    assert "ttl-workers" not in ftj.kubectl("get", "services", "-o", "name").stdout
    assert ftj.status("ttl")["phase"] == "Succeeded"
    assert ftj.condition("ttl", "Created")["reason"] == "CleanedUp"
    # Nothing comes back on later resyncs.
    wait_for(lambda: "CleanedUp" in ftj.event_reasons("ttl"), timeout=20)
    assert ftj.jobs("ttl") == []


def test_operator_killed_midway_converges_without_duplicates(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    names = [f"kill-{i}" for i in range(3)]
    for name in names:
        assert ftj.apply(xpu_job(name, backoffLimit=3)).returncode == 0
    # Kill as soon as the first object shows up: mid-reconcile.
    wait_for(
        lambda: ftj.kubectl("get", "configmaps", "-o", "name").stdout.count("kill-") >= 1,
        timeout=60,
        interval=0.05,
    )
    operator.kill()
    operator.start()
    for name in names:
        ftj.wait_phase(name, "Running", timeout=90)

    # Kill between counting a restart and replacing the group: counted once.
    set_pod_phase(ftj.core_api, ftj.namespace, ftj.pods("kill-0")[0].metadata.name, "Failed")
    wait_for(lambda: ftj.status("kill-0").get("restarts") == 1, timeout=60, interval=0.05)
    operator.kill()
    operator.start()
    status = ftj.wait_phase("kill-0", "Running", restarts=1, timeout=90)
    assert status["restarts"] == 1

    for name in names:
        assert len(ftj.jobs(name)) == 1, name
        assert len(ftj.pods(name)) == 2, name
    services = ftj.kubectl("get", "services", "-o", "name").stdout.split()
    assert sorted(services) == sorted(f"service/{n}-workers" for n in names)


def test_steady_state_writes_nothing_and_drift_is_repaired(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    assert ftj.apply(xpu_job("steady")).returncode == 0
    ftj.wait_phase("steady", "Running")
    kinds = [
        "finetunejob/steady",
        "job/steady-worker",
        "configmap/steady-config",
        "service/steady-workers",
        "role/steady-trainer",
        "serviceaccount/steady-trainer",
    ]

    def versions() -> dict[str, str]:
        return {
            kind: json.loads(ftj.kubectl("get", kind, "-o", "json").stdout)["metadata"][
                "resourceVersion"
            ]
            for kind in kinds
        }

    time.sleep(2)  # let the last status write and Events settle
    before = versions()
    time.sleep(7)  # more than a resync period (5s in these tests)
    assert versions() == before, "a steady job must cost no writes"

    # Drift: a hand-edited ConfigMap, a deleted Service, a Job suspended by hand.
    ftj.kubectl(
        "patch",
        "configmap",
        "steady-config",
        "--type=merge",
        "-p",
        '{"data": {"config.json": "{}"}}',
    )
    ftj.kubectl("delete", "service", "steady-workers", "--wait=false")
    ftj.kubectl(
        "patch", "job", "steady-worker", "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )

    def repaired() -> bool:
        data = json.loads(ftj.kubectl("get", "configmap", "steady-config", "-o", "json").stdout)
        service = ftj.kubectl("get", "service", "steady-workers").returncode == 0
        return (
            json.loads(data["data"]["config.json"]).get("worldSize") == 4
            and service
            and ftj.jobs("steady")[0].spec.suspend is False
        )

    wait_for(repaired, timeout=30, description="drift repaired")
    assert len(ftj.jobs("steady")) == 1


def test_lost_node_restarts_the_group(ftj: Ftj, operator: OperatorProcess) -> None:
    """A node that goes away (deleted: the pod garbage collector removes its pods) restarts
    the group. The node is the test's own, tainted so that no other test's pods land there."""
    node = f"lost-{ftj.namespace[-6:]}"
    taint = {"key": "finetune.dev/e2e-lost-node", "value": node, "effect": "NoSchedule"}
    manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": node, "type": "kwok"},
        },
        "spec": {"taints": [taint]},
        "status": {
            "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: "8"},
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: "8"},
        },
    }
    applied = ftj.cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    assert applied.returncode == 0, applied.stderr
    try:
        pinned = xpu_job(
            "lost",
            workers=2,
            devices=1,
            nodeSelector={"kubernetes.io/hostname": node},
            tolerations=[{**taint, "operator": "Equal"}],
        )
        assert ftj.apply(pinned).returncode == 0
        ftj.wait_phase("lost", "Running", timeout=60)
        assert {p.spec.node_name for p in ftj.pods("lost")} == {node}

        ftj.cluster.kubectl("delete", "node", node, "--wait=false")
        status = ftj.wait_phase("lost", "Restarting", timeout=150, restarts=1)
        assert status["lastFailure"]["jobUid"]
        running = ftj.condition("lost", "Running")
        assert (
            running["reason"] == "Restarting" and "restarting the whole group" in running["message"]
        )
    finally:
        ftj.cluster.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false")


def test_workers_that_cannot_be_scheduled_are_explained(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    # 8 workers x 8 GPUs: more than the simulated GPU nodes hold.
    assert ftj.apply(xpu_job("big", workers=8, devices=8)).returncode == 0

    def explained() -> dict[str, Any] | None:
        running = ftj.condition("big", "Running")
        return running if "cannot be scheduled" in running.get("message", "") else None

    running = wait_for(explained, timeout=60, description="the scheduler's reason in status")
    assert ftj.status("big")["phase"] == "Pending"
    assert running["reason"] == "WaitingForWorkers"
    assert GPU_RESOURCE in running["message"] and "add nodes" in running["message"]
    assert GPU_RESOURCE in ftj.kubectl("describe", "ftj", "big").stdout


def test_a_group_stuck_terminating_is_let_go_after_the_grace(
    ftj: Ftj, operator: OperatorProcess
) -> None:
    """Pods Terminating forever (their node unreachable; here a finalizer holds one) would block
    the foreground delete of the old group: after --replace-grace-seconds it is let go."""
    operator.stop()
    operator.args += ["--replace-grace-seconds", "3"]
    operator.start()
    assert ftj.apply(xpu_job("stuck", workers=2, devices=1)).returncode == 0
    ftj.wait_phase("stuck", "Running")
    held, other = (p.metadata.name for p in ftj.pods("stuck"))
    hold = {"metadata": {"finalizers": ["finetune.dev/e2e-hold"]}}
    ftj.core_api.patch_namespaced_pod(held, ftj.namespace, hold)
    try:
        set_pod_phase(ftj.core_api, ftj.namespace, other, "Failed")
        status = ftj.wait_phase("stuck", "Running", restarts=1, timeout=60)
        assert status["lastFailure"]["pod"] == other
        stuck_pod = ftj.core_api.read_namespaced_pod(held, ftj.namespace)
        assert stuck_pod.metadata.deletion_timestamp is not None  # still there, let go
        assert len(ftj.jobs("stuck")) == 1 and len(ftj.pods("stuck")) == 2
    finally:
        ftj.core_api.patch_namespaced_pod(held, ftj.namespace, {"metadata": {"finalizers": None}})
