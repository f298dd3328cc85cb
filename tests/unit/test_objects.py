"""Desired objects: names, ownership, the worker group, and each object's security settings."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.objects import (
    CONFIG_FILE,
    JobRef,
    build_desired_objects,
)
from finetune_operator.resolve import ResolvedConfig, parse_spec, resolve
from finetune_operator.settings import OperatorSettings

JOB = JobRef(name="llama", namespace="ml", uid="1234", labels={"kueue.x-k8s.io/queue-name": "gpus"})
MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "d"}}


def objects(**spec: Any) -> dict[str, dict[str, Any]]:
    parsed = parse_spec({**MINIMAL, **spec})
    built = build_desired_objects(JOB, parsed, resolve(parsed), OperatorSettings())
    return {obj["kind"]: obj for obj in built.all()}


def worker_pod(**spec: Any) -> dict[str, Any]:
    pod: dict[str, Any] = objects(**spec)["Job"]["spec"]["template"]
    return pod


def trainer(**spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = worker_pod(**spec)["spec"]["containers"][0]
    return container


def env(**spec: Any) -> dict[str, Any]:
    return {
        item["name"]: item.get("value", item.get("valueFrom")) for item in trainer(**spec)["env"]
    }


def test_every_object_is_owned_named_and_labelled() -> None:
    built = objects()
    assert set(built) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job"}
    for obj in built.values():
        meta = obj["metadata"]
        assert meta["name"].startswith("llama-")
        assert meta["namespace"] == "ml"
        assert meta["labels"]["finetune.dev/job-name"] == "llama"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FinetuneJob",
            "name": "llama",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_workers_are_an_indexed_job_that_fails_as_a_group() -> None:
    job = objects(workers=4, devicesPerWorker=2)["Job"]
    assert job["metadata"]["name"] == "llama-worker"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert job["metadata"]["annotations"]["finetune.dev/world-size"] == "8"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["template"]["spec"]["subdomain"] == "llama-workers"


def test_each_worker_asks_for_its_devices() -> None:
    resources = trainer(workers=4, devicesPerWorker=2, resources={"limits": {"memory": "64Gi"}})[
        "resources"
    ]
    assert resources["limits"] == {"memory": "64Gi", "gpu.intel.com/i915": "2"}
    assert resources["requests"] == {"gpu.intel.com/i915": "2"}
    assert "requests" not in trainer(device="cpu")["resources"]


def test_torchrun_rendezvous_on_rank_zero() -> None:
    command = trainer(workers=4, devicesPerWorker=2)["command"]
    # the launcher counts the pod's devices and picks --nproc-per-node itself
    assert command[:3] == ["python", "-m", "finetune_trainer.launch"]
    assert "--nnodes=4" in command and not [a for a in command if "nproc" in a]
    assert "--node-rank=$(NODE_RANK)" in command
    assert "--master-addr=llama-worker-0.llama-workers" in command
    assert command[-2:] == ["--config", f"/etc/finetune/{CONFIG_FILE}"]
    assert env()["NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }


@pytest.mark.parametrize(
    ("device", "backend", "device_env"),
    [("xpu", "xccl", "CCL_ZE_IPC_EXCHANGE"), ("cuda", "nccl", "NCCL_DEBUG"), ("cpu", "gloo", None)],
)
def test_backend_and_device_env(device: str, backend: str, device_env: str | None) -> None:
    values = env(device=device)
    assert values["FINETUNE_DIST_BACKEND"] == backend
    assert values["FINETUNE_DEVICE"] == device
    if device_env:
        assert device_env in values
    if device != "xpu":
        assert not any(name.startswith("CCL_") for name in values)


def test_hub_token_only_by_reference() -> None:
    values = env(hfTokenSecret={"name": "hf", "key": "token"})
    assert values["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_TOKEN" not in env()


def test_pod_security() -> None:
    pod = worker_pod()["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in container


def test_trainer_may_patch_only_its_own_status() -> None:
    built = objects()
    (rule,) = built["Role"]["rules"]
    assert rule == {
        "apiGroups": ["finetune.dev"],
        "resources": ["finetunejobs/status"],
        "resourceNames": ["llama"],
        "verbs": ["get", "patch"],
    }
    assert built["RoleBinding"]["subjects"][0]["name"] == "llama-trainer"
    assert worker_pod()["spec"]["serviceAccountName"] == "llama-trainer"


def test_own_service_account_is_bound_not_created() -> None:
    built = objects(serviceAccountName="team-sa")
    assert "ServiceAccount" not in built
    assert built["RoleBinding"]["subjects"][0]["name"] == "team-sa"


def test_output_volume_and_config() -> None:
    pod = worker_pod(output={"volumeClaim": "ckpts", "path": "/data"})["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "ckpts"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["output"] == "/data" and mounts["config"] == "/etc/finetune"
    config = ResolvedConfig.model_validate_json(objects()["ConfigMap"]["data"][CONFIG_FILE])
    assert config.gradient_accumulation_steps == 64


def test_passthrough_scheduling_fields() -> None:
    pod = worker_pod(
        nodeSelector={"pool": "gpu"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        priorityClassName="high",
    )["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"


def test_headless_service_publishes_not_ready_workers() -> None:
    service = objects()["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service["publishNotReadyAddresses"] is True
    assert service["selector"] == {"finetune.dev/job-name": "llama"}
