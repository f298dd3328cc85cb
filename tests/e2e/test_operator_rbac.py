"""The operator with exactly its RBAC rules (rbac.py, the chart's files/operator-rules.yaml), as
a ServiceAccount: the whole lifecycle works and the API server never says Forbidden. And two
replicas at once: the Lease lets one act, the other takes over when it stops."""

from __future__ import annotations

import json
import socket
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

from finetune_operator.rbac import LEADER_ELECTION_RULES, RULES

pytestmark = pytest.mark.e2e


def test_operator_needs_no_more_than_its_rules(
    cluster: Cluster,
    namespace: str,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    ftj: Ftj,
    tmp_path: Path,
) -> None:
    kubeconfig = service_account_kubeconfig(
        cluster, namespace, "finetune-operator", RULES + LEADER_ELECTION_RULES, tmp_path / "sa.yaml"
    )
    operator = OperatorProcess(
        cluster, namespace, tmp_path, env={**operator_env, "KUBECONFIG": str(kubeconfig)}
    )
    operator.start()
    try:
        assert ftj.apply(xpu_job("rbac", ttlSecondsAfterFinished=1, backoffLimit=1)).returncode == 0
        ftj.wait_phase("rbac", "Running")
        set_pod_phase(ftj.core_api, namespace, ftj.pods("rbac")[0].metadata.name, "Failed")
        ftj.wait_phase("rbac", "Running", restarts=1)
        for pod in ftj.pods("rbac"):
            set_pod_phase(ftj.core_api, namespace, pod.metadata.name, "Succeeded")
        ftj.wait_phase("rbac", "Succeeded")
        eventually(lambda: ftj.jobs("rbac") == [], timeout=30, what="TTL clean-up")
        eventually(lambda: "TrainingComplete" in ftj.event_reasons("rbac"))
    finally:
        operator.stop()
        print(operator.logs()[-20000:])
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


def test_two_replicas_one_leader(
    cluster: Cluster,
    namespace: str,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    ftj: Ftj,
    tmp_path: Path,
) -> None:
    def replica(name: str) -> OperatorProcess:
        process = OperatorProcess(
            cluster, namespace, tmp_path / name, env=operator_env, args=["--identity", name]
        )
        process.log_dir.mkdir()
        process.start()
        return process

    first = replica("replica-a")
    wait_for(lambda: "holds lease" in first.logs(), timeout=30, description="replica-a leads")
    second = replica("replica-b")
    replicas: list[Any] = [first, second]
    try:
        wait_for(lambda: "waiting for lease" in second.logs(), timeout=30, description="b waits")
        assert ftj.apply(xpu_job("ha")).returncode == 0
        ftj.wait_phase("ha", "Running")
        assert "holds lease" not in second.logs()
        assert "ha status" not in second.logs() and "ha status" in first.logs()

        first.stop()  # hands the Lease back: the other takes over without waiting it out
        wait_for(lambda: "holds lease" in second.logs(), timeout=30, description="b takes over")
        set_pod_phase(ftj.core_api, namespace, ftj.pods("ha")[0].metadata.name, "Failed")
        ftj.wait_phase("ha", "Running", restarts=1)
        assert len(ftj.jobs("ha")) == 1
    finally:
        for process in replicas:
            process.stop()
            print(process.logs()[-10000:])


def test_metrics_endpoint_and_json_logs(
    cluster: Cluster,
    namespace: str,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    ftj: Ftj,
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    operator = OperatorProcess(
        cluster,
        namespace,
        tmp_path,
        env={**operator_env, "FTO_LOG_FORMAT": "json", "FTO_METRICS_PORT": str(port)},
        args=["--metrics-port", str(port)],
    )
    operator.start()
    try:
        assert ftj.apply(xpu_job("metered")).returncode == 0
        ftj.wait_phase("metered", "Running")

        def scraped() -> dict[Any, float] | None:
            samples = scrape_metrics(port)
            running = (samples or {}).get(("finetune_jobs", (("phase", "Running"),)))
            return samples if running == 1 else None

        samples = wait_for(scraped, timeout=30, description="metrics with the running job")
        assert samples[("finetune_reconcile_seconds_count", ())] >= 1
        assert samples[("finetune_reconcile_errors_total", ())] == 0
    finally:
        operator.stop()
    lines = [line for line in operator.logs().splitlines() if line.startswith("{")]
    assert lines and all("message" in json.loads(line) for line in lines)
    assert any("metered status" in json.loads(line)["message"] for line in lines)
