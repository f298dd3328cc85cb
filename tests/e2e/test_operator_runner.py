"""The whole path for real: the operator creates the workers, the local runner runs their
containers as processes (command, args and env exactly as in the pod spec; the rendezvous
host mapped to the loopback), two workers train the tiny model on the CPU to Succeeded, and
`kubectl get ftj` shows step and loss moving while it trains."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import REPO_ROOT, SIMULATE_LABEL, SIMULATE_MANUAL, Cluster, wait_for
from operator_fixtures import (
    Ftj,
    OperatorProcess,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = REPO_ROOT / "examples" / "tiny-cpu.yaml"


@pytest.fixture(name="operator_env")
def manual_pods_env() -> dict[str, str]:
    """The runner, not kwok, drives these pods: the test-only label hands them over."""
    return {"FTO_EXTRA_POD_LABELS": f"{SIMULATE_LABEL}={SIMULATE_MANUAL}"}


@pytest.fixture
def runner(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "runner.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("process_runner.py")),
                "--namespace",
                namespace,
                "--workdir",
                str(tmp_path / "runner"),
                "--keep",
            ],
            env=cluster.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print("--- runner ---\n" + log.read_text()[-20000:])
        for container_log in sorted((tmp_path / "runner" / "pods").glob("*/container.log")):
            print(f"--- {container_log} ---\n" + container_log.read_text()[-6000:])


def tiny_two_workers(max_steps: int = 60) -> dict[str, Any]:
    """Long enough that, on an idle machine too, status is reported several times (every
    5 s) and a worker can be deleted between the first checkpoint and the end."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"].update({"device": "cpu", "workers": 2, "devicesPerWorker": 1})
    manifest["spec"]["training"]["maxSteps"] = max_steps
    return manifest


def test_two_workers_train_the_tiny_model_to_succeeded(
    ftj: Ftj, operator: OperatorProcess, runner: Path
) -> None:
    manifest = tiny_two_workers()
    name = manifest["metadata"]["name"]
    assert ftj.apply(manifest).returncode == 0
    ftj.wait_phase(name, "Running", timeout=60)

    # Watch the printer columns while it trains: STEP and LOSS move.
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 400
    phase = "Running"
    while time.monotonic() < deadline:
        rows = ftj.kubectl("get", "ftj", name, "--no-headers").stdout.split()
        phase = rows[1] if len(rows) > 1 else ""
        if phase == "Running" and len(rows) >= 6 and "/" in rows[3]:
            step_loss = (rows[3], rows[4])
            if not seen or seen[-1] != step_loss:
                seen.append(step_loss)
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert phase == "Succeeded", ftj.kubectl("describe", "ftj", name).stdout
    steps = [int(step.split("/")[0]) for step, _ in seen]
    assert len(set(steps)) >= 2 and steps == sorted(steps), seen
    assert len({loss for _, loss in seen}) >= 2, seen

    status = ftj.status(name)
    assert status["progress"]["step"] == status["progress"]["maxSteps"] == 60
    assert status["checkpoint"]["step"] == 60
    assert status["restarts"] == 0 and status["completionTime"]
    assert ftj.condition(name, "Succeeded")["status"] == "True"

    # Both workers ran as torchrun node ranks 0 and 1, against the loopback rendezvous.
    pods = ftj.pods(name)
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"]
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 0 for p in pods)
    log = runner.read_text()
    assert "--node-rank=0" in log and "--node-rank=1" in log
    assert "--master-addr=127.0.0.1" in log


def test_deleted_worker_restarts_the_group_from_the_checkpoint(
    ftj: Ftj, operator: OperatorProcess, runner: Path, tmp_path: Path
) -> None:
    """The output on a ReadWriteMany claim (the runner maps it to one folder for every pod):
    a worker deleted mid-training restarts the whole group, which resumes from the checkpoint."""
    claim = "tiny-output"
    storage = {"storage": "1Gi"}
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{ftj.namespace}-out"},
        "spec": {
            "capacity": storage,
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "manual",
            "hostPath": {"path": str(tmp_path / "volume")},
            "claimRef": {"namespace": ftj.namespace, "name": claim},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": ftj.namespace},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "manual",
            "resources": {"requests": storage},
        },
    }
    applied = ftj.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([volume, pvc]))
    assert applied.returncode == 0, applied.stderr
    try:
        manifest = tiny_two_workers(max_steps=100)
        manifest["spec"]["output"] = {"volumeClaim": claim, "path": "/output"}
        name = manifest["metadata"]["name"]
        assert ftj.apply(manifest).returncode == 0

        def checkpointed() -> bool:
            return (ftj.status(name).get("checkpoint") or {}).get("step", 0) >= 10

        wait_for(checkpointed, timeout=300, interval=1, description="first checkpoint")
        victim = ftj.pods(name)[1].metadata.name
        ftj.core_api.delete_namespaced_pod(victim, ftj.namespace)

        status = ftj.wait_phase(name, "Succeeded", timeout=400)
        assert status["restarts"] == 1 and status["lastFailure"]["pod"] == victim
        assert status["progress"]["step"] == 100
        logs = "\n".join(
            p.read_text(errors="replace")
            for p in (tmp_path / "runner" / "pods").glob("*/container.log")
        )
        assert "resuming from" in logs, "the restarted group did not resume from the checkpoint"
    finally:
        ftj.cluster.kubectl("delete", "pv", f"{ftj.namespace}-out", "--wait=false")
