"""The local Kubernetes cluster that the e2e tests run against, and helpers to talk to it.

The cluster itself is hack/dev-cluster (kwokctl's binary runtime: real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler on 127.0.0.1, with kwok simulating nodes and pods).
This module starts and stops it the same way a developer does, so the tests exercise the same
code path as `hack/dev-cluster up`.

Pods on simulated nodes have no containers. kwok moves them through a lifecycle chosen by the
label (or annotation) ``finetune.dev/simulate`` on the pod or its Job's pod template:

- absent:  Running once scheduled; a Job-owned pod then Succeeds (kwok's default).
- running: Running once scheduled, and stays so until the test ends it with :func:`set_pod_phase`.
- fail:    Running once scheduled; a Job-owned pod then Fails with exit code 1.
- manual:  kwok never touches the pod's status: the test drives every phase with
           :func:`set_pod_phase` (e.g. a runner that executes the container as a local process).

Whatever the mode, deleting a pod removes it (kwok stands in for the kubelet's final delete).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO_ROOT / "hack" / "dev-cluster"
BUILD_TOOLS = REPO_ROOT / "hack" / "build-tools.sh"
CRDS_DIR = REPO_ROOT / "crds"

SIMULATE_LABEL = "finetune.dev/simulate"
SIMULATE_AUTO = None  # no label: kwok's default lifecycle
SIMULATE_RUNNING = "running"
SIMULATE_FAIL = "fail"
SIMULATE_MANUAL = "manual"

GPU_RESOURCE = "gpu.intel.com/i915"
ACCELERATOR_LABEL = "finetune.dev/accelerator"

# The e2e session gets its own cluster name, so it never tears down a developer's
# `hack/dev-cluster up` cluster (named finetune-dev by default).
# Overridable so that two test runs on one machine (say CI beside a developer's run) do not collide.
E2E_CLUSTER_NAME = os.environ.get("FTO_E2E_CLUSTER_NAME", "finetune-e2e")

T = TypeVar("T")


class ClusterStartError(RuntimeError):
    """hack/dev-cluster could not bring the cluster up (its output holds the component logs)."""


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@cache
def tools_path() -> str:
    """The PATH fragment holding the cached kubectl, helm, kwokctl... (see hack/build-tools.sh)."""
    result = subprocess.run(
        [str(BUILD_TOOLS), "--path"], check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def missing_tools() -> str:
    """What hack/build-tools.sh would still have to build; empty when everything is there."""
    result = subprocess.run([str(BUILD_TOOLS), "--check"], capture_output=True, text=True)
    return "" if result.returncode == 0 else result.stderr.strip()


@dataclass
class Cluster:
    kubeconfig: Path
    # True when this session started the cluster and so must take it down again.
    owned: bool
    name: str = E2E_CLUSTER_NAME

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{tools_path()}:{env.get('PATH', '')}"
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cached kubectl against this cluster; text output captured, never raises on a
        non-zero exit unless ``check`` (tests often assert on a rejection)."""
        return subprocess.run(
            ["kubectl", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            check=check,
            timeout=timeout,
        )

    def api_client(self) -> Any:
        """A `kubernetes` ApiClient for this cluster (the caller closes it)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (hack/kwok/audit-policy.yaml: requests made as
        ServiceAccounts), in kwokctl's folder of this cluster, beside the kubeconfig."""
        return self.kubeconfig.parent / "logs" / "audit.log"


def audited_requests(cluster: Cluster, username: str) -> list[dict[str, Any]]:
    """The audit events (audit.k8s.io/v1 Event, one per finished request) of ``username``,
    e.g. ``system:serviceaccount:NS:NAME``."""
    if not cluster.audit_log.exists():
        raise AssertionError(
            f"no audit log at {cluster.audit_log}: the cluster was not made by this checkout's "
            "hack/dev-cluster up (hack/dev-cluster down, then up, recreates it with one)"
        )
    events = []
    for line in cluster.audit_log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the line the API server is writing right now
        if (event.get("user") or {}).get("username") == username:
            events.append(event)
    return events


def unauthorized_requests(events: list[dict[str, Any]]) -> list[str]:
    """The requests the authorizer (RBAC) refused, as `verb URI: message` lines.

    The audit event's `authorization.k8s.io/decision` annotation says what RBAC decided. A 403
    that RBAC allowed is an admission refusal, such as a write into a namespace being deleted
    (NamespaceLifecycle), which no rule could have prevented."""
    return [
        f"{event.get('verb')} {event.get('requestURI')}: "
        f"{(event.get('responseStatus') or {}).get('message', '')}"
        for event in events
        if (event.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid"
    ]


def service_account_username(namespace: str, account: str) -> str:
    return f"system:serviceaccount:{namespace}:{account}"


def token_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig for this cluster that authenticates as ServiceAccount ``namespace/account``
    (a token from the TokenRequest API), so its requests carry no permission but its RBAC."""
    token = cluster.kubectl(
        "create", "token", account, "-n", namespace, "--duration=2h", check=True
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    server = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [server],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {
                "name": account,
                "context": {"cluster": server["name"], "user": account, "namespace": namespace},
            }
        ],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_cluster() -> Cluster:
    """Reuses the cluster named by KUBECONFIG when FTO_REUSE_CLUSTER=1, else starts one."""
    if os.environ.get("FTO_REUSE_CLUSTER") == "1":
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            raise ClusterStartError("FTO_REUSE_CLUSTER=1 needs KUBECONFIG to name the cluster")
        return Cluster(kubeconfig=Path(kubeconfig), owned=False, name="(reused)")

    # CI must have run hack/build-tools.sh: building here would hide that it didn't (and could
    # run past CI's time limit). Locally, `hack/dev-cluster up` builds what is missing, once.
    if running_under_ci() and (missing := missing_tools()):
        raise ClusterStartError(
            "cluster tools are not built and CI=true: run hack/build-tools.sh first\n" + missing
        )

    env = dict(os.environ, FTO_CLUSTER_NAME=E2E_CLUSTER_NAME)
    result = subprocess.run(
        [str(DEV_CLUSTER), "up"], capture_output=True, text=True, env=env, timeout=3600
    )
    if result.returncode != 0:
        raise ClusterStartError(
            f"hack/dev-cluster up failed (exit {result.returncode}):\n"
            f"{result.stderr}\n{result.stdout}"
        )
    match = re.search(r"^export KUBECONFIG=(.+)$", result.stdout, re.MULTILINE)
    if not match:
        raise ClusterStartError(f"hack/dev-cluster up printed no KUBECONFIG:\n{result.stdout}")
    return Cluster(kubeconfig=Path(match.group(1).strip()), owned=True)


def stop_cluster(cluster: Cluster) -> None:
    if not cluster.owned:
        return
    env = dict(os.environ, FTO_CLUSTER_NAME=cluster.name)
    subprocess.run([str(DEV_CLUSTER), "down"], env=env, check=True, timeout=300)


def install_crds(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    """`kubectl apply -f crds/`, then waits until the API server serves them."""
    applied = cluster.kubectl("apply", "-f", str(CRDS_DIR))
    if applied.returncode == 0:
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=True
        )
    return applied


def unique_name(prefix: str) -> str:
    """A DNS-1123 name: the prefix cut down, plus a random suffix."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40].rstrip("-")
    return f"{cleaned}-{uuid.uuid4().hex[:6]}"


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 60,
    interval: float = 0.5,
    description: str = "condition",
) -> T:
    """Polls ``condition`` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {description}")
        time.sleep(interval)


def set_pod_phase(
    core_api: Any,
    namespace: str,
    pod_name: str,
    phase: str,
    *,
    exit_code: int | None = None,
    message: str | None = None,
) -> Any:
    """Drives a pod's phase through the pods/status subresource, as a kubelet would.

    For pods labelled ``finetune.dev/simulate: manual`` (phase Running, then Succeeded or
    Failed) or ``running`` (Succeeded or Failed). ``exit_code`` defaults to 0 for Succeeded and
    1 for Failed; the Job controller reads it for podFailurePolicy rules.
    """
    pod = core_api.read_namespaced_pod(pod_name, namespace)
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    if phase == "Running":
        container_state: dict[str, Any] = {"running": {"startedAt": now}}
        ready = "True"
    elif phase in ("Succeeded", "Failed"):
        if exit_code is None:
            exit_code = 0 if phase == "Succeeded" else 1
        container_state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": now,
                "finishedAt": now,
            }
        }
        ready = "False"
    else:
        raise ValueError(f"cannot drive a pod to phase {phase!r}")
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": condition, "status": ready, "lastTransitionTime": now}
            for condition in ("Ready", "ContainersReady")
        ]
        + [{"type": "Initialized", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [
            {
                "name": container.name,
                "image": container.image,
                "imageID": "",
                "ready": phase == "Running",
                "restartCount": 0,
                "started": phase == "Running",
                "state": container_state,
            }
            for container in pod.spec.containers
        ],
    }
    if message:
        status["message"] = message
    if pod.status.start_time is None:
        status["startTime"] = now
    return core_api.patch_namespaced_pod_status(pod_name, namespace, {"status": status})
