"""Fault runs: the operator under kills, an API server restart, a second replica and pod loss.

Each run ends with nothing lost: every FinetuneJob in the phase it must be in, exactly one of
each child (ServiceAccount, Role, RoleBinding, ConfigMap, Service, worker Job) per job, no
more live pods than workers, no orphans of deleted jobs, and no spurious group restarts.
Sizes are modest (a few jobs of 2-4 simulated workers) so that the file runs in minutes.

Worker pods are simulated by kwok (``finetune.dev/simulate=running``: Running once bound,
until the test sets their phase as a kubelet would).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fault_fixtures import (
    FTJ,
    ControlPlaneKeeper,
    Supervisor,
    assert_nothing_lost,
    restart_apiserver,
    take_census,
)
from local_cluster import Cluster, set_pod_phase
from operator_fixtures import (
    Ftj,
    OperatorProcess,
    eventually,
    xpu_job,
)

pytestmark = pytest.mark.e2e

SETTLE = 180  # seconds for the cluster and the operator to converge after a fault


def create(ftj: Ftj, name: str, workers: int = 2, **spec: Any) -> None:
    applied = ftj.apply(xpu_job(name, workers=workers, devices=1, **spec))
    assert applied.returncode == 0, applied.stderr


def delete(ftj: Ftj, name: str) -> None:
    ftj.custom_api.delete_namespaced_custom_object(
        FTJ["group"], FTJ["version"], ftj.namespace, FTJ["plural"], name
    )


def running_pods(ftj: Ftj, name: str) -> list[Any]:
    return [p for p in ftj.pods(name) if p.status.phase == "Running"]


def finish(ftj: Ftj, name: str, phase: str = "Succeeded") -> None:
    for pod in ftj.pods(name):
        if pod.status.phase == "Running":
            set_pod_phase(ftj.core_api, ftj.namespace, pod.metadata.name, phase)


def assert_pods_match_workers(ftj: Ftj, running: dict[str, int]) -> None:
    """No duplicate pods: a Running job has exactly `workers` live pods, one per index."""
    census = take_census(ftj.custom_api.api_client, ftj.namespace)
    for name, workers in running.items():
        live = [p for p in census.pods.get(name, []) if not p["deleting"]]
        assert len(live) == workers, f"{name}: {len(live)} live pods, expected {workers}: {live}"


def settle(
    ftj: Ftj,
    expected: dict[str, str],
    deleted: set[str],
    workers: dict[str, int],
    restarts: dict[str, int] | None = None,
    timeout: float = SETTLE,
) -> None:
    restarts = restarts if restarts is not None else dict.fromkeys(expected, 0)

    def converged() -> bool:
        assert_nothing_lost(ftj.custom_api.api_client, ftj.namespace, expected, deleted, restarts)
        assert_pods_match_workers(
            ftj, {n: workers[n] for n, phase in expected.items() if phase == "Running"}
        )
        return True

    eventually(converged, timeout=timeout, what="every FinetuneJob correct, nothing lost")


# ------------------------------------------------------------------------------------------


def test_operator_sigkilled_repeatedly_during_churn(ftj: Ftj, operator: OperatorProcess) -> None:
    """Six rounds: create three jobs, delete an old one, finish another's pods, then SIGKILL
    the operator at a random moment (mid-reconcile, more often than not) and start it again."""
    rng = random.Random(8)
    created: list[str] = []
    deleted: set[str] = set()
    finished: set[str] = set()
    for round_ in range(6):
        for index in range(3):
            name = f"churn-{round_}-{index}"
            create(ftj, name)
            created.append(name)
        if round_ >= 2:
            victim = created[(round_ - 2) * 3]
            delete(ftj, victim)
            deleted.add(victim)
        candidates = [
            n
            for n in created
            if n not in deleted and n not in finished and len(running_pods(ftj, n)) == 2
        ]
        if candidates:
            done = rng.choice(candidates)
            finish(ftj, done)
            finished.add(done)
        time.sleep(rng.uniform(0.2, 2.0))
        operator.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        operator.start()

    alive = [n for n in created if n not in deleted]
    expected = {n: ("Succeeded" if n in finished else "Running") for n in alive}
    settle(ftj, expected, deleted, dict.fromkeys(alive, 2))

    for name in alive:
        if name not in finished:
            finish(ftj, name)
    settle(ftj, dict.fromkeys(alive, "Succeeded"), deleted, dict.fromkeys(alive, 2))
    assert operator.starts == 7


def test_kube_apiserver_restarted_mid_run(
    cluster: Cluster, ftj: Ftj, operator: OperatorProcess
) -> None:
    """kube-apiserver SIGKILLed and started again 5 s later while jobs run and others are being
    created; the operator (restarted by a supervisor if it exits, as a kubelet would) and the
    rest of the control plane reconnect, and every job ends correct."""
    with ControlPlaneKeeper(cluster) as keeper, Supervisor(operator) as supervisor:
        first = [f"before-{i}" for i in range(4)]
        for name in first:
            create(ftj, name)
        settle(ftj, dict.fromkeys(first, "Running"), set(), dict.fromkeys(first, 2))

        during = [f"during-{i}" for i in range(2)]
        for name in during:
            create(ftj, name)  # the operator has not acted on these when the API goes
        finish(ftj, first[0])
        unreachable = restart_apiserver(cluster, keeper, down_seconds=5)
        print(f"kube-apiserver unreachable for {unreachable:.1f}s")

        after = [f"after-{i}" for i in range(2)]
        for name in after:
            create(ftj, name)
        finish(ftj, first[1])
        everyone = first + during + after
        expected = {n: "Running" for n in everyone} | {first[0]: "Succeeded", first[1]: "Succeeded"}
        settle(ftj, expected, set(), dict.fromkeys(everyone, 2))

        for name in everyone:
            finish(ftj, name)
        settle(ftj, dict.fromkeys(everyone, "Succeeded"), set(), dict.fromkeys(everyone, 2))
    # Not failures, but worth seeing: what had to be restarted after the outage.
    print(f"operator exits (restarted by the supervisor): {supervisor.exits}")
    print(f"control-plane components restarted: {keeper.restarted}")


def lease_holder(ftj: Ftj) -> str | None:
    from kubernetes import client

    leases = client.CoordinationV1Api(ftj.custom_api.api_client)
    try:
        return leases.read_namespaced_lease("finetune-operator", ftj.namespace).spec.holder_identity
    except client.exceptions.ApiException:
        return None


def acted(log: Path) -> list[str]:
    """The reconciler's write lines in an operator log."""
    if not log.exists():
        return []
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " applied " in line or " created " in line or " status: " in line
    ]


def test_two_operator_replicas_at_once(
    cluster: Cluster,
    namespace: str,
    ftj: Ftj,
    finetunejob_crd: None,
    operator_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Two replicas run together: exactly one acts (the Lease holder). SIGKILL the holder: the
    other takes over within the lease duration, and nothing is duplicated or lost."""
    replicas = []
    for label in ("a", "b"):
        log_dir = tmp_path / label
        log_dir.mkdir()
        replicas.append(OperatorProcess(cluster, namespace, log_dir, env=operator_env))
    for replica in replicas:
        replica.start()
    try:
        first = [f"pair-{i}" for i in range(4)]
        for name in first:
            create(ftj, name)
        settle(ftj, dict.fromkeys(first, "Running"), set(), dict.fromkeys(first, 2))

        holder = eventually(lambda: lease_holder(ftj), timeout=30, what="a Lease holder")
        leader = next(r for r in replicas if holder.endswith(f"-{r.process.pid}"))
        standby = next(r for r in replicas if r is not leader)
        assert acted(leader.log_file), "the Lease holder did nothing"
        assert not acted(standby.log_file), (
            "the standby acted while the leader held the Lease:\n"
            + "\n".join(acted(standby.log_file)[:10])
        )

        leader.process.send_signal(signal.SIGKILL)
        leader.process.wait()
        second = [f"pair-after-{i}" for i in range(3)]
        for name in second:
            create(ftj, name)
        finish(ftj, first[0])
        everyone = first + second
        expected = dict.fromkeys(everyone, "Running") | {first[0]: "Succeeded"}
        settle(ftj, expected, set(), dict.fromkeys(everyone, 2))
        assert acted(standby.log_file), "the standby never took over"

        for name in everyone:
            finish(ftj, name)
        settle(ftj, dict.fromkeys(everyone, "Succeeded"), set(), dict.fromkeys(everyone, 2))
    finally:
        for replica in replicas:
            replica.stop()
        for replica in replicas:
            print(replica.logs()[-4000:])


def delete_pods(ftj: Ftj, pods: list[Any]) -> None:
    for pod in pods:
        ftj.core_api.delete_namespaced_pod(pod.metadata.name, ftj.namespace, grace_period_seconds=0)


def test_pods_of_a_running_job_deleted_in_bursts(ftj: Ftj, operator: OperatorProcess) -> None:
    """Bursts of 2, 4 and 1 pods of a 4-worker job deleted at once: each burst is one group
    restart (not one per pod), the group comes back whole from one worker Job, and past
    backoffLimit the job fails saying why."""
    create(ftj, "burst", workers=4, backoffLimit=5)
    ftj.running_pods("burst", 4, timeout=90)
    ftj.wait_phase("burst", "Running", timeout=60)
    for restarts, size in enumerate([2, 4, 1], start=1):
        victims = running_pods(ftj, "burst")[:size]
        delete_pods(ftj, victims)
        gone = {p.metadata.name for p in victims}

        def back(restarts: int = restarts, gone: set[str] = gone) -> bool:
            status = ftj.status("burst")
            assert status.get("phase") == "Running", status.get("phase")
            assert status.get("restarts") == restarts, status.get("restarts")
            pods = running_pods(ftj, "burst")
            assert len(pods) == 4 and not gone & {p.metadata.name for p in pods}
            live_jobs = [j for j in ftj.jobs("burst") if j.metadata.deletion_timestamp is None]
            assert len(live_jobs) == 1, [j.metadata.name for j in live_jobs]
            return True

        eventually(
            back, timeout=SETTLE, what=f"burst {restarts}: Running again, restarts {restarts}"
        )
    finish(ftj, "burst")
    settle(ftj, {"burst": "Succeeded"}, set(), {"burst": 4}, restarts={"burst": 3})

    create(ftj, "fragile", workers=2, backoffLimit=1)
    ftj.running_pods("fragile", 2, timeout=90)
    ftj.wait_phase("fragile", "Running", timeout=60)
    delete_pods(ftj, running_pods(ftj, "fragile"))
    eventually(
        lambda: (
            ftj.status("fragile").get("restarts") == 1 and len(running_pods(ftj, "fragile")) == 2
        ),
        timeout=SETTLE,
        what="fragile restarted once",
    )
    delete_pods(ftj, running_pods(ftj, "fragile")[:1])
    status = ftj.wait_phase("fragile", "Failed", timeout=SETTLE)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed.get("message"), failed
    assert "backoffLimit" in failed["message"] or "restart" in failed["message"], failed
    assert status.get("restarts") in (1, 2), status.get("restarts")
    census = take_census(ftj.custom_api.api_client, ftj.namespace)
    assert not census.orphans and not census.duplicates()
