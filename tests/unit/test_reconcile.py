"""The reconcile decisions (`plan`), table by table: what is created, replaced, cleaned up,
and what status and Events result. No cluster: the observed Job and pods are values."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from reconcile_helpers import NOW, cond, inputs, job, pod, reasons, spec

from finetune_operator.objects import template_hash
from finetune_operator.reconcile import plan
from finetune_operator.status import WorkerPod, status_patch


def running_status(**extra: Any) -> dict[str, Any]:
    """The status of a job whose 2 workers run, as the operator wrote it."""
    result = plan(inputs(worker_job=job(), pods=(pod(0), pod(1))))
    return {**result.status, **extra}


def test_fresh_job_creates_everything() -> None:
    result = plan(inputs())
    assert (result.apply_objects, result.apply_job, result.delete_job) == (True, True, None)
    assert result.status["phase"] == "Pending"
    assert cond(result, "Valid")["status"] == "True"
    assert cond(result, "Created")["reason"] == "ObjectsCreated"
    assert result.status["resolved"]["gradientAccumulationSteps"] == 32
    assert result.status["workers"] == {"desired": 2, "ready": 0, "summary": "0/2"}
    assert reasons(result) == ["SpecValid", "ObjectsCreated"]


def test_invalid_spec_creates_nothing() -> None:
    result = plan(inputs(spec(workers=3)))
    assert not (result.apply_objects or result.apply_job or result.delete_job or result.cleanup)
    valid = cond(result, "Valid")
    assert valid["status"] == "False" and valid["reason"] == "BatchRule"
    assert "1, 2, 4" in valid["message"] and "Nothing was created" in valid["message"]
    assert cond(result, "Created")["status"] == "False"
    assert result.status["phase"] == "Pending"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "BatchRule")]


def test_rejected_edit_leaves_the_running_group_alone() -> None:
    result = plan(inputs(spec(workers=3), running_status(), job(), (pod(0), pod(1)), generation=2))
    assert not (result.apply_objects or result.apply_job or result.delete_job)
    assert result.status["phase"] == "Running"
    assert "left as it is" in cond(result, "Valid")["message"]
    assert cond(result, "Running")["status"] == "True"  # untouched


@pytest.mark.parametrize(
    ("pods", "previous_phase", "phase"),
    [
        ((pod(0), pod(1)), "Pending", "Running"),
        ((pod(0), pod(1, phase="Pending", ready=False)), "Pending", "Pending"),
        ((pod(0),), "Pending", "Pending"),
        ((pod(0), pod(1, ready=False)), "Running", "Pending"),
        # One worker finished first: still Running until the Job completes.
        ((pod(0), pod(1, phase="Succeeded", ready=False)), "Running", "Running"),
        ((pod(0), pod(1, phase="Succeeded", ready=False)), "Pending", "Pending"),
    ],
)
def test_running_only_when_every_worker_runs(
    pods: tuple[WorkerPod, ...], previous_phase: str, phase: str
) -> None:
    result = plan(inputs(status={"phase": previous_phase}, worker_job=job(), pods=pods))
    assert result.status["phase"] == phase
    assert (cond(result, "Running")["status"] == "True") == (phase == "Running")
    if phase == "Running":
        assert result.status["startTime"] == "2026-01-01T12:00:00Z"


def test_unschedulable_workers_say_why_and_what_to_do() -> None:
    stuck = WorkerPod(
        name="p1",
        index=1,
        phase="Pending",
        ready=False,
        deleting=False,
        unschedulable="0/5 nodes are available: 5 Insufficient gpu.intel.com/i915.",
    )
    result = plan(inputs(spec(device="xpu"), {"phase": "Pending"}, job(), (pod(0), stuck)))
    running = cond(result, "Running")
    assert result.status["phase"] == "Pending" and running["reason"] == "WaitingForWorkers"
    assert "Insufficient gpu.intel.com/i915" in running["message"]
    assert "1 free gpu.intel.com/i915" in running["message"]


def test_failed_pod_restarts_the_group_once() -> None:
    failed = pod(1, phase="Failed", ready=False, exit_code=1, reason="Error")
    result = plan(inputs(status=running_status(), worker_job=job(), pods=(pod(0), failed)))
    assert result.delete_job == "job-1" and not result.apply_job
    assert result.status["phase"] == "Restarting" and result.status["restarts"] == 1
    assert result.status["lastFailure"]["jobUid"] == "job-1"
    assert result.status["lastFailure"]["pod"] == failed.name
    running = cond(result, "Running")
    assert running["reason"] == "Restarting" and "restart 1 of backoffLimit 3" in running["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Restarting")]

    # Killed before the Job was deleted: the next reconcile finishes it without recounting.
    again = plan(
        inputs(
            status={**running_status(), **result.status}, worker_job=job(), pods=(pod(0), failed)
        )
    )
    assert again.delete_job == "job-1" and again.status["restarts"] == 1
    assert again.events == []


def test_deleted_pod_restarts_the_group_and_mentions_it() -> None:
    gone = WorkerPod(
        name="j-worker-0-x", index=0, phase="Running", ready=True, deleting=True, node="n1"
    )
    result = plan(inputs(status=running_status(), worker_job=job(), pods=(gone, pod(1))))
    assert result.delete_job == "job-1"
    assert "was deleted from node n1" in cond(result, "Running")["message"]


def test_past_backoff_limit_fails_with_the_pod_reason() -> None:
    failed = pod(0, phase="Failed", ready=False, exit_code=3, reason="Error", message="boom")
    status = running_status(restarts=2)
    result = plan(inputs(spec(backoffLimit=2), status, job(uid="job-3"), (failed, pod(1))))
    assert result.delete_job is None
    assert result.status["phase"] == "Failed" and result.status["restarts"] == 2
    assert result.status["completionTime"] == "2026-01-01T12:00:00Z"
    failed_condition = cond(result, "Failed")
    assert failed_condition["reason"] == "BackoffLimitExceeded"
    assert "boom" in failed_condition["message"] and "exit code 3" in failed_condition["message"]
    assert ("Warning", "BackoffLimitExceeded") in [(e.type, e.reason) for e in result.events]


def test_raising_backoff_limit_retries_a_failed_job() -> None:
    failed_pod = pod(0, phase="Failed", ready=False)
    failed = plan(inputs(spec(backoffLimit=0), running_status(), job(failed=True), (failed_pod,)))
    assert failed.status["phase"] == "Failed"
    status = {**running_status(), **failed.status}
    # Nothing happens while the limit stays...
    still = plan(inputs(spec(backoffLimit=0), status, job(failed=True), (failed_pod,)))
    assert still.status["phase"] == "Failed" and still.delete_job is None
    # ...raising it restarts the group, counted.
    retry = plan(
        inputs(spec(backoffLimit=1), status, job(failed=True), (failed_pod,), generation=2)
    )
    assert retry.delete_job == "job-1" and retry.status["phase"] == "Restarting"
    assert retry.status["restarts"] == 1 and retry.status["completionTime"] is None
    assert cond(retry, "Failed")["status"] == "False"
    assert "backoffLimit was raised to 1" in cond(retry, "Running")["message"]
    # The next look (the old Job going away) does not count it again.
    after = plan(
        inputs(spec(backoffLimit=1), {**status, **retry.status}, job(failed=True, deleting=True))
    )
    assert after.status["restarts"] == 1 and after.status["phase"] == "Restarting"


def test_backoff_limit_zero_fails_at_the_first_failure() -> None:
    failed = pod(0, phase="Failed", ready=False)
    result = plan(inputs(spec(backoffLimit=0), running_status(), job(), (failed,)))
    assert result.status["phase"] == "Failed" and result.delete_job is None


def test_completed_job_succeeds() -> None:
    done = (pod(0, phase="Succeeded", ready=False), pod(1, phase="Succeeded", ready=False))
    status = running_status(checkpoint={"latest": "/output/checkpoint-20", "step": 20})
    result = plan(inputs(status=status, worker_job=job(complete=True), pods=done))
    assert result.status["phase"] == "Succeeded"
    assert result.status["completionTime"] == "2026-01-01T11:59:00Z"
    assert "checkpoint-20" in cond(result, "Succeeded")["message"]
    assert reasons(result) == ["Finished", "TrainingComplete"]


def test_a_pod_lost_after_every_worker_succeeded_restarts_nothing() -> None:
    # Training is over (every index succeeded) when a pod goes: e.g. the API server came back
    # and the Job controller has not written Complete yet. Restarting would redo the run.
    gone = WorkerPod(
        name="j-worker-0-x", index=0, phase="Running", ready=False, deleting=True, node="n1"
    )
    done = pod(1, phase="Succeeded", ready=False)
    result = plan(inputs(status=running_status(), worker_job=job(complete=True), pods=(gone, done)))
    assert result.delete_job is None and result.status["restarts"] == 0
    assert result.status["phase"] == "Succeeded"


def test_every_index_succeeded_is_success_before_the_job_says_so() -> None:
    # The Job controller was down when the last worker finished; then a finished pod goes.
    gone = WorkerPod(
        name="j-worker-0-y", index=0, phase="Running", ready=False, deleting=True, node="n1"
    )
    done = (pod(0, phase="Succeeded", ready=False), pod(1, phase="Succeeded", ready=False))
    result = plan(inputs(status=running_status(), worker_job=job(), pods=(gone, *done)))
    assert result.delete_job is None and result.status["restarts"] == 0
    assert result.status["phase"] == "Succeeded"
    # One index short is no success: the lost pod restarts the group.
    short = plan(inputs(status=running_status(), worker_job=job(), pods=(gone, done[1])))
    assert short.delete_job == "job-1"


@pytest.mark.parametrize(
    ("after", "job_left", "cleanup", "requeue"),
    [
        (timedelta(seconds=30), True, False, 30.0),
        (timedelta(seconds=60), True, True, None),
        (timedelta(seconds=600), False, False, None),  # cleaned already: nothing to do
    ],
)
def test_ttl_after_finished(
    after: timedelta, job_left: bool, cleanup: bool, requeue: float | None
) -> None:
    finished = {"phase": "Succeeded", "completionTime": "2026-01-01T12:00:00Z"}
    result = plan(
        inputs(
            spec(ttlSecondsAfterFinished=60),
            finished,
            job(complete=True) if job_left else None,
            service=job_left,
            now=NOW + after,
        )
    )
    assert not (result.apply_objects or result.apply_job)  # never recreated
    assert result.status["phase"] == "Succeeded"
    assert result.cleanup is cleanup and result.requeue_after == requeue
    if after >= timedelta(seconds=60):
        assert cond(result, "Created")["reason"] == "CleanedUp"


def test_scaling_replaces_the_group_without_counting_a_restart() -> None:
    result = plan(
        inputs(spec(workers=4), running_status(), job(world=2, template="old"), (pod(0), pod(1)))
    )
    assert result.delete_job == "job-1" and result.apply_objects  # ConfigMap updated first
    assert result.status["phase"] == "Restarting" and result.status["restarts"] == 0
    running = cond(result, "Running")
    assert running["reason"] == "Scaling"
    assert (
        "world size 2 to 4" in running["message"] and "accumulation is now 16" in running["message"]
    )
    assert result.status["resolved"]["gradientAccumulationSteps"] == 16


def test_replaced_group_is_restarting_until_all_run_again() -> None:
    scaling = plan(
        inputs(spec(workers=4), running_status(), job(world=2, template="old"), (pod(0), pod(1)))
    ).status
    gone = plan(inputs(spec(workers=4), scaling, job(world=2, template="old", deleting=True)))
    assert gone.delete_job is None and not gone.apply_job and gone.status["phase"] == "Restarting"
    fresh = plan(inputs(spec(workers=4), {**scaling, **gone.status}, None))
    assert fresh.apply_job and fresh.status["phase"] == "Restarting"
    four = tuple(pod(i) for i in range(4))
    up = plan(inputs(spec(workers=4), {**scaling, **fresh.status}, job(world=4), four))
    assert up.status["phase"] == "Running" and up.status["worldSize"] == 4


def test_a_group_that_does_not_go_is_let_go_after_the_grace() -> None:
    status = {**running_status(), "phase": "Restarting"}
    going = replace(job("old", failed=True, deleting=True), deletion_time="2026-01-01T11:59:00Z")
    waiting = plan(inputs(status=status, worker_job=going))
    assert waiting.orphan_job is None and not waiting.apply_job
    stuck = plan(inputs(status=status, worker_job=going, now=NOW + timedelta(minutes=2)))
    assert stuck.orphan_job == "old" and not stuck.apply_job


def test_suspend_and_resume() -> None:
    suspended = plan(inputs(spec(suspend=True), running_status(), job(suspended=True)))
    assert suspended.apply_job and suspended.status["phase"] == "Suspended"
    assert cond(suspended, "Suspended")["status"] == "True"
    assert reasons(suspended) == ["Suspended"]
    # Pods going away because of the suspension are not failures.
    leaving = WorkerPod(name="p", index=0, phase="Running", ready=True, deleting=True)
    quiet = plan(inputs(spec(suspend=True), suspended.status, job(suspended=True), (leaving,)))
    assert quiet.delete_job is None and quiet.status["restarts"] == 0

    resumed = plan(inputs(spec(), suspended.status, job(), (pod(0), pod(1))))
    assert resumed.status["phase"] == "Running"
    assert cond(resumed, "Suspended")["reason"] == "Resumed"


def test_steady_state_writes_nothing_and_says_nothing() -> None:
    first = plan(inputs(worker_job=job(), pods=(pod(0), pod(1))))
    later = plan(
        inputs(
            status=first.status,
            worker_job=job(),
            pods=(pod(0), pod(1)),
            now=NOW + timedelta(hours=1),
        )
    )
    assert status_patch(first.status, later.status) == {}
    assert later.events == []


def test_template_hash_ignores_suspend() -> None:
    a = {"spec": {"suspend": False, "completions": 2, "template": {"x": 1}}}
    b = {"spec": {"suspend": True, "completions": 2, "template": {"x": 1}}}
    c = {"spec": {"suspend": False, "completions": 4, "template": {"x": 1}}}
    assert template_hash(a) == template_hash(b) != template_hash(c)
