"""Desired objects: (FinetuneJob, resolved config, operator settings) -> Kubernetes objects.

Pure functions returning plain dicts, ready for server-side apply. A job owns:

- ServiceAccount, Role and RoleBinding: the trainer may patch the status of its own
  FinetuneJob and nothing else;
- ConfigMap `<name>-config`: the resolved config the trainer reads;
- headless Service `<name>-workers`: stable DNS names for the workers (the rendezvous);
- Indexed Job `<name>-worker`: one pod per worker, index = node rank. The Job controller
  replaces pods and Kueue understands it; the operator restarts the whole group on a
  failure by replacing the Job (see docs/architecture.md).

All names are derived from the FinetuneJob's name and every object is owner-referenced to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, Device, FinetuneJobSpec
from finetune_operator.resolve import ResolvedConfig
from finetune_operator.settings import OperatorSettings

Obj = dict[str, Any]

CONFIG_FILE = "config.json"
CONFIG_MOUNT = "/etc/finetune"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "finetune.dev/job-name"
ROLE_LABEL = "finetune.dev/role"
WORLD_SIZE_ANNOTATION = "finetune.dev/world-size"
CONFIG_HASH_ANNOTATION = "finetune.dev/config-hash"
# On the worker Job: the hash of what a running group cannot change in place (template_hash).
TEMPLATE_HASH_ANNOTATION = "finetune.dev/template-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Copied from the FinetuneJob onto the worker Job, which Kueue admits as one workload.
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)

# Env a multi-node Intel GPU job needs under oneCCL: torchrun launches the processes (not
# mpiexec), IPC handles are exchanged over sockets because containers lack pidfd access to
# each other, and the TCP provider works on any pod network (RDMA clusters override it).
XPU_ENV = {
    "CCL_PROCESS_LAUNCHER": "none",
    "CCL_ATL_TRANSPORT": "ofi",
    "CCL_ZE_IPC_EXCHANGE": "sockets",
    "FI_PROVIDER": "tcp",
    "ZE_FLAT_DEVICE_HIERARCHY": "FLAT",
    "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
    "SYCL_CACHE_PERSISTENT": "1",
}
CUDA_ENV = {"NCCL_DEBUG": "WARN"}


@dataclass(frozen=True)
class JobRef:
    """The FinetuneJob that owns the objects."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str] | None = None


def queue_name(job: JobRef) -> str | None:
    """The Kueue LocalQueue a FinetuneJob's workers wait in (None: not queued)."""
    return (job.labels or {}).get(KUEUE_QUEUE_LABEL) or None


@dataclass(frozen=True)
class Names:
    job: str

    @property
    def config_map(self) -> str:
        return f"{self.job}-config"

    @property
    def service(self) -> str:
        return f"{self.job}-workers"

    @property
    def workers(self) -> str:
        return f"{self.job}-worker"

    @property
    def trainer_account(self) -> str:
        return f"{self.job}-trainer"

    @property
    def rendezvous_host(self) -> str:
        # Indexed Job pods are named and hostnamed "<job>-<index>"; the headless Service is
        # their subdomain, so rank 0 resolves as "<job>-0.<service>".
        return f"{self.workers}-0.{self.service}"


def selector_labels(job: JobRef) -> dict[str, str]:
    """Labels that find every pod of a job: `kubectl get pods -l finetune.dev/job-name=NAME`."""
    return {JOB_NAME_LABEL: job.name}


def common_labels(job: JobRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": "finetune-operator",
        **selector_labels(job),
    }


def owner_reference(job: JobRef) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, extra_labels: dict[str, str] | None = None) -> Obj:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**common_labels(job), **(extra_labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def build_service_account(job: JobRef) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, Names(job.name).trainer_account),
    }


def build_role(job: JobRef) -> Obj:
    """Read and patch the status of this one FinetuneJob: progress reports from rank 0."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, Names(job.name).trainer_account),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [job.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_role_binding(job: JobRef, spec: FinetuneJobSpec) -> Obj:
    names = Names(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, names.trainer_account),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.trainer_account,
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": spec.service_account_name or names.trainer_account,
                "namespace": job.namespace,
            }
        ],
    }


def build_config_map(job: JobRef, resolved: ResolvedConfig) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, Names(job.name).config_map),
        "data": {CONFIG_FILE: resolved.to_json()},
    }


def build_service(job: JobRef, settings: OperatorSettings) -> Obj:
    """Headless, and publishing not-ready pods: rank 0 must resolve before it is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, Names(job.name).service),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(job),
            "ports": [{"name": "rendezvous", "port": settings.rendezvous_port}],
        },
    }


def trainer_command(job: JobRef, resolved: ResolvedConfig, settings: OperatorSettings) -> list[str]:
    """The trainer's launcher: it counts the devices the pod sees and runs torchrun with a rank
    per device (a 2-stack Max card is two), a static rendezvous on rank 0's worker and the
    pod's completion index as node rank (see docs/architecture.md, "Counting devices")."""
    return [
        "python",
        "-m",
        "finetune_trainer.launch",
        f"--nnodes={resolved.workers}",
        "--node-rank=$(NODE_RANK)",
        f"--master-addr={Names(job.name).rendezvous_host}",
        f"--master-port={settings.rendezvous_port}",
        "--config",
        f"{CONFIG_MOUNT}/{CONFIG_FILE}",
    ]


def _env(job: JobRef, spec: FinetuneJobSpec, resolved: ResolvedConfig) -> list[Obj]:
    env: list[Obj] = [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "FINETUNE_JOB_NAME", "value": job.name},
        {
            "name": "FINETUNE_JOB_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        {"name": "FINETUNE_DEVICE", "value": resolved.device.value},
        {"name": "FINETUNE_DIST_BACKEND", "value": resolved.distributed_backend},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The root filesystem is read-only: caches go to /tmp, downloads to the volume so
        # that a restarted group does not fetch the model again.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{resolved.output_path}/.cache/huggingface"},
    ]
    device_env = {Device.XPU: XPU_ENV, Device.CUDA: CUDA_ENV}.get(resolved.device, {})
    env += [{"name": key, "value": value} for key, value in device_env.items()]
    if spec.hf_token_secret is not None:
        # the Secret's name (not its value): a hub refusal names where the token came from
        env.append({"name": "FINETUNE_HF_TOKEN_SECRET", "value": spec.hf_token_secret.name})
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": spec.hf_token_secret.name,
                        "key": spec.hf_token_secret.key,
                    }
                },
            }
        )
    return env


def _resources(spec: FinetuneJobSpec, resolved: ResolvedConfig) -> Obj:
    resources: Obj = (
        spec.resources.model_dump(exclude_none=True) if spec.resources is not None else {}
    )
    if resolved.device_resource is not None:
        # Extended resources must be requested in limits; requests equal limits for them.
        count = str(resolved.devices_per_worker)
        resources.setdefault("limits", {})[resolved.device_resource] = count
        resources.setdefault("requests", {})[resolved.device_resource] = count
    return resources


def _volumes(spec: FinetuneJobSpec, names: Names) -> list[Obj]:
    output: Obj = (
        {"persistentVolumeClaim": {"claimName": spec.output.volume_claim}}
        if spec.output.volume_claim
        else {"emptyDir": {}}
    )
    return [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "output", **output},
        {"name": "tmp", "emptyDir": {}},
        # DataLoader workers and the collective libraries need more than the default 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def build_pod_template(
    job: JobRef, spec: FinetuneJobSpec, resolved: ResolvedConfig, settings: OperatorSettings
) -> Obj:
    names = Names(job.name)
    container: Obj = {
        "name": "trainer",
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command(job, resolved, settings),
        "env": _env(job, spec, resolved),
        "resources": _resources(spec, resolved),
        "ports": [{"name": "rendezvous", "containerPort": settings.rendezvous_port}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "output", "mountPath": resolved.output_path},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "subdomain": names.service,
        "serviceAccountName": spec.service_account_name or names.trainer_account,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": _volumes(spec, names),
    }
    passthrough = {
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
        "affinity": spec.affinity,
        "priorityClassName": spec.priority_class_name,
    }
    pod_spec.update({key: value for key, value in passthrough.items() if value})
    return {
        "metadata": {
            "labels": {**settings.extra_pod_labels, **common_labels(job), ROLE_LABEL: "worker"}
        },
        "spec": pod_spec,
    }


def build_worker_job(
    job: JobRef,
    spec: FinetuneJobSpec,
    resolved: ResolvedConfig,
    settings: OperatorSettings,
    config_hash: str,
) -> Obj:
    """One Indexed Job for the group. backoffLimit 0: any failed pod fails the Job, and the
    operator restarts the whole group from the last checkpoint (gang semantics)."""
    names = Names(job.name)
    extra_labels = {k: v for k, v in (job.labels or {}).items() if k in KUEUE_LABELS and v}
    metadata = _metadata(job, names.workers, extra_labels)
    metadata["annotations"] = {
        WORLD_SIZE_ANNOTATION: str(resolved.world_size),
        CONFIG_HASH_ANNOTATION: config_hash,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": resolved.workers,
            "parallelism": resolved.workers,
            "backoffLimit": 0,
            # A queued Job is created suspended and Kueue unsuspends it on admission; after
            # creation the operator leaves suspend to Kueue (see reconcile.job_update).
            "suspend": spec.suspend or queue_name(job) is not None,
            "template": build_pod_template(job, spec, resolved, settings),
        },
    }


def config_hash(resolved: ResolvedConfig) -> str:
    """Changes whenever the trainer would train differently: the Job is replaced then."""
    return hashlib.sha256(resolved.to_json().encode()).hexdigest()[:16]


def template_hash(job: Mapping[str, Any]) -> str:
    """Hash of what a running group cannot change in place: the worker Job's spec without
    `suspend` (which the Job controller applies live)."""
    spec = {k: v for k, v in (job.get("spec") or {}).items() if k != "suspend"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DesiredObjects:
    """Every object a FinetuneJob needs, exactly as the operator applies them (and as
    `finetune-operator render` prints them)."""

    children: tuple[Obj, ...]  # applied first, in this order
    job: Obj  # the worker Job, last: its template hash stamped in its annotations

    @property
    def template_hash(self) -> str:
        return str(self.job["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION])

    def all(self) -> list[Obj]:
        """Every object, in the order to create them."""
        return [*self.children, self.job]


def build_desired_objects(
    job: JobRef, spec: FinetuneJobSpec, resolved: ResolvedConfig, settings: OperatorSettings
) -> DesiredObjects:
    """Every object a FinetuneJob needs, the worker Job's template hash stamped in."""
    children = []
    if spec.service_account_name is None:
        children.append(build_service_account(job))
    children += [
        build_role(job),
        build_role_binding(job, spec),
        build_config_map(job, resolved),
        build_service(job, settings),
    ]
    worker_job = build_worker_job(job, spec, resolved, settings, config_hash(resolved))
    worker_job["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] = template_hash(worker_job)
    return DesiredObjects(children=tuple(children), job=worker_job)
