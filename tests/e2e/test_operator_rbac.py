"""The operator with exactly its RBAC rules (rbac.py, the chart's files/operator-rules.yaml), as
a ServiceAccount: the whole lifecycle works and the API server never says Forbidden. And two
replicas at once: the Lease lets one act, the other takes over when it stops."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from local_cluster import (
    Cluster,
    audited_requests,
    service_account_username,
    set_pod_phase,
    unauthorized_requests,
    wait_for,
)
from operator_fixtures import (
    Ftj,
    OperatorProcess,
    eventually,
    scrape_metrics,
    service_account_kubeconfig,
    xpu_job,
)

from finetune_operator.controller.leader import LEASE_NAME
from finetune_operator.rbac import LEADER_ELECTION_RULES, RULES

pytestmark = pytest.mark.e2e

StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(
    cluster: Cluster,
    namespace: str,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[StartOperator]:
    """Starts `finetune-operator run` for the test's namespace (env added to operator_env, its
    log in tmp_path/NAME); every one started is stopped, and its log printed, afterwards."""
    started: list[OperatorProcess] = []

    def start(
        name: str = "operator", env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> OperatorProcess:
        log_dir = tmp_path / name
        log_dir.mkdir()
        process = OperatorProcess(
            cluster, namespace, log_dir, env={**operator_env, **(env or {})}, args=list(args)
        )
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(process.logs()[-10000:])


def lease_holder(ftj: Ftj) -> str | None:
    """Who holds the operator's leader Lease (in the namespace it watches)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        lease = client.CoordinationV1Api(ftj.core_api.api_client).read_namespaced_lease(
            LEASE_NAME, ftj.namespace
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    holder: str | None = lease.spec.holder_identity if lease.spec else None
    return holder


def test_operator_needs_no_more_than_its_rules(
    cluster: Cluster, namespace: str, ftj: Ftj, tmp_path: Path, start_operator: StartOperator
) -> None:
    kubeconfig = service_account_kubeconfig(
        cluster, namespace, "finetune-operator", RULES + LEADER_ELECTION_RULES, tmp_path / "sa.yaml"
    )
    operator = start_operator(env={"KUBECONFIG": str(kubeconfig)})
    assert ftj.apply(xpu_job("rbac", ttlSecondsAfterFinished=1, backoffLimit=1)).returncode == 0
    ftj.wait_phase("rbac", "Running")
    set_pod_phase(ftj.core_api, namespace, ftj.pods("rbac")[0].metadata.name, "Failed")
    ftj.wait_phase("rbac", "Running", restarts=1)
    for pod in ftj.pods("rbac"):
        set_pod_phase(ftj.core_api, namespace, pod.metadata.name, "Succeeded")
    ftj.wait_phase("rbac", "Succeeded")
    eventually(lambda: ftj.jobs("rbac") == [], timeout=30, what="TTL clean-up")
    eventually(lambda: "TrainingComplete" in ftj.event_reasons("rbac"))
    operator.stop()
    # What the API server decided for the operator, from its audit log: it wrote (the check is
    # not vacuous) and RBAC refused none of its requests.
    requests = audited_requests(cluster, service_account_username(namespace, "finetune-operator"))
    written = {
        (r.get("objectRef") or {}).get("resource")
        for r in requests
        if r["verb"] in ("create", "patch") and r["responseStatus"]["code"] < 300
    }
    assert {"jobs", "finetunejobs"} <= written, written
    assert unauthorized_requests(requests) == []


def test_two_replicas_one_leader(ftj: Ftj, start_operator: StartOperator) -> None:
    first = start_operator("replica-a", args=["--identity", "replica-a"])
    wait_for(lambda: lease_holder(ftj) == "replica-a", timeout=30, description="replica-a leads")
    second = start_operator("replica-b", args=["--identity", "replica-b"])
    wait_for(lambda: "waiting for lease" in second.logs(), timeout=30, description="b waits")
    assert ftj.apply(xpu_job("ha")).returncode == 0
    ftj.wait_phase("ha", "Running")
    assert lease_holder(ftj) == "replica-a"
    assert "ha status" not in second.logs() and "ha status" in first.logs()

    first.stop()  # hands the Lease back: the other takes over without waiting it out
    wait_for(lambda: lease_holder(ftj) == "replica-b", timeout=30, description="b takes over")
    set_pod_phase(ftj.core_api, ftj.namespace, ftj.pods("ha")[0].metadata.name, "Failed")
    ftj.wait_phase("ha", "Running", restarts=1)
    assert len(ftj.jobs("ha")) == 1


def test_metrics_endpoint_and_json_logs(ftj: Ftj, start_operator: StartOperator) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    operator = start_operator(
        env={"FTO_LOG_FORMAT": "json", "FTO_METRICS_PORT": str(port)},
        args=["--metrics-port", str(port)],
    )
    assert ftj.apply(xpu_job("metered")).returncode == 0
    ftj.wait_phase("metered", "Running")

    def scraped() -> dict[Any, float] | None:
        samples = scrape_metrics(port)
        running = (samples or {}).get(("finetune_jobs", (("phase", "Running"),)))
        return samples if running == 1 else None

    samples = wait_for(scraped, timeout=30, description="metrics with the running job")
    assert samples[("finetune_reconcile_seconds_count", ())] >= 1
    assert samples[("finetune_reconcile_errors_total", ())] == 0
    operator.stop()
    lines = [line for line in operator.logs().splitlines() if line.startswith("{")]
    assert lines and all("message" in json.loads(line) for line in lines)
    assert any("metered status" in json.loads(line)["message"] for line in lines)
