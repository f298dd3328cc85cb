"""The Helm chart on the real local control plane.

- The rendered chart (both RBAC modes) is accepted by the API server: `kubectl apply
  --dry-run=server`, which runs validation and admission for every object.
- `helm install`, then the operator runs as a local process exactly as the chart's Deployment
  would run it (the container's command, args and env from the installed release) and
  authenticated as the chart's ServiceAccount (a token from the TokenRequest API): a
  FinetuneJob gets its child objects and its status. This proves that the chart's RBAC
  suffices, in the cluster-wide and the namespaced mode. Both namespaces enforce the
  `restricted` Pod Security Standard, so the operator's pod and the trainer's pods are
  admitted only if they are locked down. (Pods on the simulated nodes have no
  containers, so the operator's own pod cannot run there.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import (
    REPO_ROOT,
    Cluster,
    audited_requests,
    service_account_username,
    token_kubeconfig,
    unauthorized_requests,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "finetune-operator"
EXAMPLE = REPO_ROOT / "examples" / "tiny-cpu.yaml"
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm from the project's tool cache, against the test cluster."""
    env = cluster.env()
    env.update(
        HELM_CACHE_HOME="/tmp/fto-helm-cache",
        HELM_CONFIG_HOME="/tmp/fto-helm-config",
        HELM_DATA_HOME="/tmp/fto-helm-data",
    )
    result = subprocess.run(["helm", *args], capture_output=True, text=True, env=env, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}\n{result.stdout}")
    return result


def create_namespace(kubectl: Kubectl, prefix: str) -> str:
    """A namespace that enforces the `restricted` Pod Security Standard: the API server then
    refuses any pod (the operator's, the trainer's) that is not locked down."""
    name = unique_name(prefix)
    kubectl("create", "namespace", name, check=True)
    kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted", check=True)
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def namespaces(kubectl: Kubectl) -> Iterator[list[str]]:
    """Namespaces made by the test (release and watched ones), deleted afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        kubectl("delete", "namespace", name, "--wait=false")


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_rendered_chart_is_accepted_by_the_api_server(
    cluster: Cluster, kubectl: Kubectl, namespaces: list[str], mode: str
) -> None:
    release_ns = create_namespace(kubectl, "chart-dry-run")
    namespaces.append(release_ns)
    values = ["--set", f"operator.watchNamespaces={{{release_ns}}}"] if mode == "namespaced" else []
    rendered = helm(cluster, "template", "fto", str(CHART), "--namespace", release_ns, *values)
    applied = kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout)
    assert applied.returncode == 0, applied.stderr
    kinds = {line.split("/")[0] for line in applied.stdout.splitlines()}
    expected = {
        "deployment.apps",
        "serviceaccount",
        "customresourcedefinition.apiextensions.k8s.io",
    }
    expected |= {"role.rbac.authorization.k8s.io", "rolebinding.rbac.authorization.k8s.io"}
    if mode == "clusterwide":
        expected |= {"clusterrole.rbac.authorization.k8s.io"}
    assert expected <= kinds, applied.stdout


def deployment_container(manifest: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all(manifest):
        if doc and doc["kind"] == "Deployment":
            return dict(doc["spec"]["template"]["spec"]["containers"][0])
    raise AssertionError("the release has no Deployment")


def start_operator_as_in_the_pod(
    container: dict[str, Any], kubeconfig: Path, release_ns: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """The Deployment's container as a local process: its command, args and env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTO_")}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    metrics_port = free_port()
    env.update(
        KUBECONFIG=str(kubeconfig),
        POD_NAME=f"operator-{os.getpid()}",
        POD_NAMESPACE=release_ns,
        FTO_METRICS_PORT=str(metrics_port),  # the pod's port may be taken on this machine
        HOME=str(log.parent),
    )
    command = [container["command"][0], *container["args"]]
    executable = Path(sys.executable).parent / command[0]
    assert executable.exists(), f"{command[0]} is not installed in {executable.parent}"
    process = subprocess.Popen(
        [str(executable), *command[1:]],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=log.parent,
    )
    return process, metrics_port


def get_json(kubectl: Kubectl, *args: str) -> Any:
    result = kubectl("get", *args, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    for entry in (job.get("status") or {}).get("conditions") or []:
        if entry["type"] == kind:
            return dict(entry)
    return {}


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_helm_install_then_the_operator_reconciles_with_the_charts_rbac(
    cluster: Cluster,
    kubectl: Kubectl,
    namespaces: list[str],
    tmp_path: Path,
    mode: str,
) -> None:
    release_ns = create_namespace(kubectl, f"chart-{mode}")
    jobs_ns = create_namespace(kubectl, f"chart-jobs-{mode}")
    namespaces += [release_ns, jobs_ns]
    release = unique_name("fto")[:20]
    values = ["--set", f"operator.watchNamespaces={{{jobs_ns}}}"] if mode == "namespaced" else []
    # --take-ownership: other e2e tests may have applied crds/ before (the same CRD); the
    # CRD is kept on uninstall (helm.sh/resource-policy: keep), so they keep working after.
    installed = helm(
        cluster,
        "install",
        release,
        str(CHART),
        "--namespace",
        release_ns,
        "--take-ownership",
        "--wait=false",
        *values,
    )
    assert "kubectl get ftj -w" in installed.stdout  # NOTES.txt
    try:
        kubectl(
            "wait",
            "--for=condition=Established",
            "crd/finetunejobs.finetune.dev",
            "--timeout=60s",
            check=True,
        )
        # The operator pod passes the restricted Pod Security admission (kwok runs it).
        kubectl(
            "-n",
            release_ns,
            "rollout",
            "status",
            f"deployment/{release}-finetune-operator",
            "--timeout=90s",
            check=True,
        )
        manifest = helm(cluster, "get", "manifest", release, "--namespace", release_ns).stdout
        container = deployment_container(manifest)
        account = f"{release}-finetune-operator"
        kubeconfig = token_kubeconfig(
            cluster, release_ns, account, tmp_path / "operator.kubeconfig"
        )
        # The ServiceAccount sees FinetuneJobs where it should, and nothing it should not.
        can = kubectl(
            "auth",
            "can-i",
            "list",
            "finetunejobs.finetune.dev",
            "-n",
            jobs_ns,
            f"--as=system:serviceaccount:{release_ns}:{account}",
        )
        assert can.stdout.strip() == "yes"
        cannot = kubectl(
            "auth",
            "can-i",
            "list",
            "secrets",
            "-n",
            jobs_ns,
            f"--as=system:serviceaccount:{release_ns}:{account}",
        )
        assert cannot.stdout.strip() == "no"
        if mode == "namespaced":
            elsewhere = kubectl(
                "auth",
                "can-i",
                "list",
                "finetunejobs.finetune.dev",
                "-n",
                "default",
                f"--as=system:serviceaccount:{release_ns}:{account}",
            )
            assert elsewhere.stdout.strip() == "no"

        log = tmp_path / "operator.log"
        process, metrics_port = start_operator_as_in_the_pod(container, kubeconfig, release_ns, log)
        try:
            run_a_finetunejob(kubectl, jobs_ns, metrics_port, process, log)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The API server's audit log: the chart's RBAC allowed every request. (Watching every
        # namespace, the operator may be refused a write into one being deleted: not RBAC.)
        requests = audited_requests(cluster, service_account_username(release_ns, account))
        assert requests, "the audit log holds no request of the operator"
        assert unauthorized_requests(requests) == [], log.read_text(errors="replace")[-4000:]
    finally:
        helm(cluster, "uninstall", release, "--namespace", release_ns, check=False)
    # Kept on uninstall: deleting the CRD would delete every FinetuneJob.
    assert kubectl("get", "crd", "finetunejobs.finetune.dev").returncode == 0


def run_a_finetunejob(
    kubectl: Kubectl,
    namespace: str,
    metrics_port: int,
    process: subprocess.Popen[bytes],
    log: Path,
) -> None:
    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(
                f"the operator exited ({process.returncode}):\n"
                + log.read_text(errors="replace")[-4000:]
            )

    # The probes' endpoint answers (the chart's liveness and readiness probes GET /metrics).
    def metrics_up() -> str | None:
        alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return None

    metrics = wait_for(metrics_up, timeout=60, description="the operator's /metrics")
    assert "finetune_reconcile" in metrics

    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = namespace
    name = manifest["metadata"]["name"]
    kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=True)

    def children() -> bool:
        alive()
        found = [
            get_json(kubectl, kind, f"{name}{suffix}", "-n", namespace)
            for kind, suffix in [
                ("serviceaccount", "-trainer"),
                ("role", "-trainer"),
                ("rolebinding", "-trainer"),
                ("configmap", "-config"),
                ("service", "-workers"),
                ("job", "-worker"),
            ]
        ]
        return all(found)

    wait_for(children, timeout=90, description=f"the child objects of {namespace}/{name}")

    # The Job controller could create the worker pods: they pass restricted Pod Security.
    def pods_created() -> bool:
        alive()
        job = get_json(kubectl, "job", f"{name}-worker", "-n", namespace) or {}
        status = job.get("status") or {}
        if any(c.get("reason") == "FailedCreate" for c in status.get("conditions") or []):
            raise AssertionError(f"worker pods refused: {status}")
        return bool(status.get("active") or status.get("succeeded") or status.get("ready"))

    wait_for(pods_created, timeout=90, description="the worker pods")

    def reconciled() -> dict[str, Any] | None:
        alive()
        job = get_json(kubectl, "finetunejob", name, "-n", namespace)
        status = (job or {}).get("status") or {}
        if status.get("phase") in ("Running", "Succeeded") and status.get("resolved"):
            return dict(job)
        return None

    job = wait_for(reconciled, timeout=120, description=f"{namespace}/{name} Running or Succeeded")
    assert condition(job, "Valid")["status"] == "True"
    assert condition(job, "Created")["status"] == "True"
    resolved = job["status"]["resolved"]
    accumulation = resolved.get(
        "gradientAccumulationSteps", resolved.get("gradient_accumulation_steps")
    )
    assert accumulation == 2  # 8 / (2 per device x 1 worker x 2 devices)
    assert job["status"]["workers"]["desired"] == 1
    printed = kubectl("get", "ftj", name, "-n", namespace, check=True).stdout
    assert name in printed
    # Events are posted as the operator (events create is in its rules).
    events = kubectl(
        "get",
        "events",
        "-n",
        namespace,
        f"--field-selector=involvedObject.name={name}",
        "-o",
        "name",
        check=True,
    )
    assert events.stdout.strip(), "the operator posted no Event for the FinetuneJob"


EXAMPLES = sorted(
    path
    for path in (REPO_ROOT / "examples").glob("*.yaml")
    if "kind: FinetuneJob" in path.read_text()
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_by_the_api_server(
    kubectl: Kubectl, finetunejob_crd: None, namespace: str, path: Path
) -> None:
    """Every example passes the CRD's schema and CEL rules (server-side dry run)."""
    applied = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "created (server dry run)" in applied.stdout
