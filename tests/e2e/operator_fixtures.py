"""Fixtures and helpers for the operator's e2e tests: the operator runs as a real subprocess
(`finetune-operator run --namespace NS`) against the session's local cluster.

The fixtures `ftj`, `operator_env` and `operator` are registered for every e2e test by
conftest.py; a module overrides `operator_env` by defining its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import (
    REPO_ROOT,
    SIMULATE_LABEL,
    SIMULATE_RUNNING,
    Cluster,
    token_kubeconfig,
    wait_for,
)

OPERATOR = REPO_ROOT / ".venv" / "bin" / "finetune-operator"


@dataclass
class OperatorProcess:
    """`finetune-operator run` for one namespace; logs go to a file the test prints on failure."""

    cluster: Cluster
    namespace: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        env = self.cluster.env()
        env.update(self.env)
        command = [
            str(
                OPERATOR if OPERATOR.exists() else Path(sys.executable).parent / "finetune-operator"
            ),
            "run",
            "--namespace",
            self.namespace,
            "--metrics-port",
            "0",
            "--lease-duration",
            "4",
            "--resync-seconds",
            "5",
            *self.args,
        ]
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; then wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no clean-up, no lease hand-back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- operator run {i} ---\n" + (self.log_dir / f"operator-{i}.log").read_text()
            for i in range(1, self.starts + 1)
            if (self.log_dir / f"operator-{i}.log").exists()
        )


@dataclass
class Ftj:
    """kubectl and API helpers for FinetuneJobs in one namespace."""

    cluster: Cluster
    namespace: str
    core_api: Any
    batch_api: Any
    custom_api: Any

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input)

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        manifest = json.loads(json.dumps(manifest))
        manifest.setdefault("metadata", {})["namespace"] = self.namespace
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom_api.get_namespaced_custom_object(
            "finetune.dev", "v1alpha1", self.namespace, "finetunejobs", name
        )
        return result

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom_api.patch_namespaced_custom_object(
            "finetune.dev", "v1alpha1", self.namespace, "finetunejobs", name, {"spec": spec}
        )

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for item in self.status(name).get("conditions") or []:
            if item["type"] == type_:
                return dict(item)
        return {}

    def wait_condition(
        self, name: str, type_: str, timeout: float = 60, **match: Any
    ) -> dict[str, Any]:
        """Waits until condition `type_` has every field in `match` (status="False",
        reason=...), and returns it."""

        def reached() -> dict[str, Any] | None:
            found = self.condition(name, type_)
            return found if found and all(found.get(k) == v for k, v in match.items()) else None

        return wait_for(reached, timeout=timeout, description=f"{name} {type_} {match}")

    def wait_phase(
        self, name: str, phase: str, timeout: float = 60, **match: Any
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") != phase:
                return None
            if any(status.get(k) != v for k, v in match.items()):
                return None
            return status

        return wait_for(reached, timeout=timeout, description=f"{name} phase {phase} {match}")

    def pods(self, name: str, *, live_only: bool = True) -> list[Any]:
        pods = self.core_api.list_namespaced_pod(
            self.namespace, label_selector=f"finetune.dev/job-name={name}"
        ).items
        if live_only:
            pods = [p for p in pods if p.metadata.deletion_timestamp is None]
        return sorted(pods, key=lambda p: p.metadata.name)

    def running_pods(self, name: str, count: int, timeout: float = 60) -> list[Any]:
        def ready() -> list[Any] | None:
            pods = [p for p in self.pods(name) if p.status.phase == "Running"]
            return pods if len(pods) == count else None

        return wait_for(ready, timeout=timeout, description=f"{count} running pods of {name}")

    def table_row(self, name: str) -> dict[str, str]:
        """`kubectl get ftj NAME` as {column: value}: what the CRD's printer columns show."""
        header, row = self.kubectl("get", "ftj", name).stdout.splitlines()[:2]
        # Columns are aligned under their headers; an empty cell is blank, so cut by position.
        starts = [match.start() for match in re.finditer(r"\S+", header)]
        ends = [*starts[1:], None]
        return {
            header[start:end].strip(): row[start:end].strip()
            for start, end in zip(starts, ends, strict=True)
        }

    def events(self, name: str) -> list[Any]:
        events: list[Any] = self.core_api.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.kind=FinetuneJob,involvedObject.name={name}",
        ).items
        return events

    def event_reasons(self, name: str) -> list[str]:
        return [
            e.reason for e in sorted(self.events(name), key=lambda e: e.metadata.creation_timestamp)
        ]

    def jobs(self, name: str) -> list[Any]:
        jobs: list[Any] = self.batch_api.list_namespaced_job(
            self.namespace, label_selector=f"finetune.dev/job-name={name}"
        ).items
        return jobs


def xpu_job(name: str, workers: int = 2, devices: int = 2, **spec: Any) -> dict[str, Any]:
    """A FinetuneJob on simulated Intel GPUs (nothing pulls the model: pods are simulated)."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-2-7b-hf"},
            "dataset": {"name": "yahma/alpaca-cleaned"},
            "workers": workers,
            "devicesPerWorker": devices,
            **spec,
        },
    }


@pytest.fixture(name="operator_env")
def operator_env_fixture() -> dict[str, str]:
    """Env of the operator process; by default worker pods stay Running until the test ends
    them (kwok's `running` simulation)."""
    return {"FTO_EXTRA_POD_LABELS": f"{SIMULATE_LABEL}={SIMULATE_RUNNING}"}


@pytest.fixture(name="operator")
def operator_fixture(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    namespace: str,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        cluster=cluster, namespace=namespace, log_dir=tmp_path, env=operator_env
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed or os.environ.get("FTO_SHOW_OPERATOR_LOGS"):
            print(process.logs()[-20000:])


@pytest.fixture(name="ftj")
def ftj_fixture(
    cluster: Cluster, namespace: str, core_api: Any, batch_api: Any, custom_api: Any
) -> Ftj:
    return Ftj(cluster, namespace, core_api, batch_api, custom_api)


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """The operator's /metrics as {(sample name, sorted labels): value}; None while it does not
    answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def eventually(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """wait_for that also accepts a check raising AssertionError while not there yet."""
    last: list[str] = []

    def attempt() -> Any:
        try:
            return check() or None
        except AssertionError as error:
            last[:] = [str(error)]
            return None

    try:
        return wait_for(attempt, timeout=timeout, description=what)
    except TimeoutError as error:
        raise AssertionError(f"{error}: {last[0] if last else ''}") from None


def service_account_kubeconfig(
    cluster: Cluster, namespace: str, account: str, rules: list[dict[str, Any]], path: Path
) -> Path:
    """A kubeconfig that authenticates as ServiceAccount `account`, bound in `namespace` to a
    Role with exactly `rules`: the operator runs with no more than its chart would give it."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": account, "namespace": namespace},
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": account, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
    account_obj = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": account, "namespace": namespace},
    }
    cluster.kubectl(
        "apply", "-f", "-", input=yaml.safe_dump_all([account_obj, role, binding]), check=True
    )
    return token_kubeconfig(cluster, namespace, account, path)
