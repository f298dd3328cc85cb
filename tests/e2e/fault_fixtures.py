"""Helpers shared by the fault runs and the spec fuzzing (tests/e2e/test_faults.py,
tests/e2e/test_spec_fuzz*.py):

- server-side dry run of arbitrary objects (the kinds a FinetuneJob renders into);
- a census of what a namespace holds (children per FinetuneJob, duplicates, orphans);
- restarting kube-apiserver (and keeping the control plane up, as a kubelet would);
- a supervisor that restarts an operator process that exits, as a Deployment would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_cluster import Cluster

from finetune_operator.api import GROUP, PLURAL, VERSION

FTJ = {"group": GROUP, "version": VERSION, "plural": PLURAL}


def api_error_message(error: Exception) -> str:
    """The API server's message out of an ApiException (its Status body), else str(error)."""
    import json

    body = getattr(error, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return str(body)
    return str(error)


# Plural resource per kind, for the kinds a FinetuneJob renders into (and itself).
PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Secret": "secrets",
    "Pod": "pods",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "FinetuneJob": PLURAL,
}


def resource_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


def dry_run_create(
    kube_api: Any, namespace: str, obj: dict[str, Any], *, dry_run: bool = True
) -> dict[str, Any]:
    """POSTs ``obj`` into ``namespace`` with dryRun=All and fieldValidation=Strict: what
    ``kubectl apply --dry-run=server`` checks (schema, CEL, admission, unknown fields), and
    returns the object the API server would store. Raises ApiException on a rejection.

    Raw REST on purpose: the typed clients of kubernetes>=35 validate bodies with pydantic
    on the client side (e.g. refuse ``cpu: 2``), which would hide what the server says.
    ``dry_run=False`` creates it for real.
    """
    request = kube_api.param_serialize(
        method="POST",
        resource_path=resource_path(obj["apiVersion"], obj["kind"], namespace),
        query_params=[("fieldValidation", "Strict")] + ([("dryRun", "All")] if dry_run else []),
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=obj,
        auth_settings=["BearerToken"],
    )
    return kube_api._call_with_legacy_options(  # type: ignore[no-any-return]
        request, {"200": "object", "201": "object"}, None, True, None, True
    )


# --------------------------------------------------------------------------------------------
# What a namespace holds


CHILD_KINDS = ("Job", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding")


@dataclass
class Census:
    """Children in a namespace, grouped by the FinetuneJob (uid) that controls them."""

    jobs: dict[str, dict[str, Any]]  # FinetuneJob name -> object
    children: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # owner uid -> (kind, name)
    orphans: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, owner uid)
    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # owner job name -> pods

    def duplicates(self) -> dict[str, list[tuple[str, str]]]:
        """Per FinetuneJob, child kinds present more than once (there must be one of each)."""
        result = {}
        for uid, items in self.children.items():
            counts = Counter(kind for kind, _ in items)
            extra = [(kind, name) for kind, name in items if counts[kind] > 1]
            if extra:
                result[uid] = extra
        return result


def take_census(kube_api: Any, namespace: str) -> Census:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api)
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    batch = client.BatchV1Api(kube_api)
    jobs = {
        item["metadata"]["name"]: item
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    }
    uids = {job["metadata"]["uid"] for job in jobs.values()}
    census = Census(jobs=jobs)
    listings = {
        "Job": batch.list_namespaced_job,
        "Service": core.list_namespaced_service,
        "ConfigMap": core.list_namespaced_config_map,
        "ServiceAccount": core.list_namespaced_service_account,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
    }
    for kind, listing in listings.items():
        for item in listing(namespace).items:
            owners = [
                ref
                for ref in (item.metadata.owner_references or [])
                if ref.kind == "FinetuneJob" and ref.controller
            ]
            if not owners:
                continue
            uid = owners[0].uid
            if uid in uids:
                census.children.setdefault(uid, []).append((kind, item.metadata.name))
            elif item.metadata.deletion_timestamp is None:
                census.orphans.append((kind, item.metadata.name, uid))
    for pod in core.list_namespaced_pod(namespace).items:
        labels = pod.metadata.labels or {}
        job_name = labels.get("finetune.dev/job-name")
        if job_name:
            census.pods.setdefault(job_name, []).append(
                {
                    "name": pod.metadata.name,
                    "phase": pod.status.phase,
                    "node": pod.spec.node_name,
                    "deleting": pod.metadata.deletion_timestamp is not None,
                    "owner": (pod.metadata.owner_references or [None])[0],
                }
            )
    return census


# --------------------------------------------------------------------------------------------
# Restarting kube-apiserver


def cluster_dir(cluster: Cluster) -> Path:
    """kwokctl's folder of this cluster (the kubeconfig lives in it)."""
    return cluster.kubeconfig.parent


@dataclass
class Component:
    """A control-plane process of the cluster, as kwokctl started it."""

    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str]

    @classmethod
    def read(cls, directory: Path, name: str) -> Component:
        pid = int((directory / "pids" / f"{name}.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert str(directory) in argv[0].decode(), f"pid {pid} is not this cluster's {name}"
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return cls(
            name=name,
            argv=[a.decode() for a in argv],
            cwd=os.readlink(f"/proc/{pid}/cwd"),
            env=dict(item.decode().split("=", 1) for item in environ if b"=" in item),
        )

    def pid(self, directory: Path) -> int:
        return int((directory / "pids" / f"{self.name}.pid").read_text().strip())

    def alive(self, directory: Path) -> bool:
        try:
            stat = Path(f"/proc/{self.pid(directory)}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def start(self, directory: Path) -> None:
        """Starts it again as kwokctl did, appending to its log; the pid file follows, so that
        ``hack/dev-cluster down`` still finds it."""
        with (directory / "logs" / f"{self.name}.log").open("ab") as log:
            process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (directory / "pids" / f"{self.name}.pid").write_text(str(process.pid))


CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ControlPlaneKeeper:
    """What a kubelet does for static pods, which kwokctl's binary runtime does not: restarts
    a control-plane component that exits. Needed once the API server goes away, because
    kube-controller-manager and kube-scheduler exit when they cannot renew their leader Lease
    (``leaderelection lost``) and nothing else starts them again."""

    def __init__(self, cluster: Cluster) -> None:
        import threading

        self.directory = cluster_dir(cluster)
        self.components = {name: Component.read(self.directory, name) for name in CONTROL_PLANE}
        self.restarted: list[str] = []
        self.hold: set[str] = set()  # components a test keeps down on purpose
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="control-plane")

    def check(self) -> None:
        for name, component in self.components.items():
            if name not in self.hold and not component.alive(self.directory):
                component.start(self.directory)
                self.restarted.append(name)

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            self.check()

    def __enter__(self) -> ControlPlaneKeeper:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.check()


def restart_apiserver(
    cluster: Cluster, keeper: ControlPlaneKeeper, down_seconds: float = 3.0
) -> float:
    """SIGKILLs kube-apiserver (a crash, not a graceful stop), keeps it down for
    ``down_seconds``, and starts it again with the same command line, working directory and
    environment; returns how long the API was unreachable.

    kwokctl's binary runtime has no per-component restart (only ``kwokctl stop|start cluster``,
    which restarts every component, etcd included), so this kills the one process; ``keeper``
    restarts it, and any other component that exits meanwhile, as a kubelet would.
    """
    directory = cluster_dir(cluster)
    apiserver = keeper.components["kube-apiserver"]
    pid = apiserver.pid(directory)
    keeper.hold.add("kube-apiserver")
    went_down = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while apiserver.alive(directory):
        time.sleep(0.05)
    time.sleep(down_seconds)
    keeper.hold.discard("kube-apiserver")
    keeper.check()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "--raw", "/readyz", timeout=10).returncode == 0:
            return time.monotonic() - went_down
        time.sleep(0.5)
    raise TimeoutError("kube-apiserver did not come back within 120 s")


# --------------------------------------------------------------------------------------------
# A supervisor: restarts an operator process that exits, as a Deployment's kubelet would


class Supervisor:
    """Restarts ``process`` (anything with start/alive-by-``process.poll()``) when it exits on
    its own, and counts those exits; ``paused`` while a test kills it on purpose."""

    def __init__(self, process: Any, interval: float = 0.5) -> None:
        import threading

        self.process = process
        self.interval = interval
        self.exits: list[int | None] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            with self.lock:
                child = self.process.process
                if child is not None and child.poll() is not None:
                    self.exits.append(child.returncode)
                    self.process.start()

    def __enter__(self) -> Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# The end state every fault run must reach


def assert_nothing_lost(
    kube_api: Any,
    namespace: str,
    expected_phases: dict[str, str],
    deleted: set[str] = frozenset(),  # type: ignore[assignment]
    restarts: dict[str, int] | None = None,
) -> Census:
    """Every FinetuneJob in ``expected_phases`` exists in that phase with exactly one of each
    child; the ``deleted`` ones are gone with their children (no orphans); restarts match."""
    census = take_census(kube_api, namespace)
    problems = []
    for name, phase in expected_phases.items():
        job = census.jobs.get(name)
        if job is None:
            problems.append(f"{name}: missing")
            continue
        status = job.get("status") or {}
        if status.get("phase") != phase:
            problems.append(f"{name}: phase {status.get('phase')}, expected {phase}")
        if restarts is not None and status.get("restarts", 0) != restarts.get(name, 0):
            problems.append(
                f"{name}: restarts {status.get('restarts')}, expected {restarts.get(name, 0)}"
            )
        kinds = Counter(kind for kind, _ in census.children.get(job["metadata"]["uid"], []))
        for kind in CHILD_KINDS:
            if kind in ("Job", "Service") and phase in ("Succeeded", "Failed"):
                # ttlSecondsAfterFinished may have removed them; never more than one.
                if kinds[kind] > 1:
                    problems.append(f"{name}: {kinds[kind]} {kind}s")
                continue
            if kinds[kind] != 1:
                problems.append(f"{name}: {kinds[kind]} {kind}s")
    for name in deleted:
        if name in census.jobs:
            problems.append(f"{name}: deleted but still there")
    if census.orphans:
        problems.append(f"orphans: {census.orphans}")
    unexpected = set(census.jobs) - set(expected_phases) - set(deleted)
    if unexpected:
        problems.append(f"unexpected FinetuneJobs: {sorted(unexpected)}")
    assert not problems, "\n".join(problems)
    return census
