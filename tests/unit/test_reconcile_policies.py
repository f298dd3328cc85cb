"""Each policy of `plan`, on its own, table by table: given what is observed, does it decide,
and what (phase, actions, the reason it gives). test_reconcile.py drives `plan` as a whole."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from reconcile_helpers import HASH, NOW, inputs, job, pod, spec

from finetune_operator.reconcile import (
    SHORT_REQUEUE,
    Plan,
    ValidDraft,
    backoff_raised,
    being_replaced,
    finished,
    spec_valid,
    steady,
    suspension,
    template_changed,
    training_complete,
    worker_failure,
)
from finetune_operator.status import WorkerJob, WorkerPod, timestamp

Row = dict[str, Any]


def draft(
    raw: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    worker_job: WorkerJob | None = None,
    pods: tuple[WorkerPod, ...] = (),
) -> ValidDraft:
    i = inputs(raw, status, worker_job, pods)
    assert i.spec is not None and i.resolved is not None
    d = ValidDraft(i, i.spec, i.resolved)
    spec_valid(d)
    return d


def running_reason(result: Plan) -> str | None:
    return next((c["reason"] for c in result.status["conditions"] if c["type"] == "Running"), None)


def outcome(result: Plan | None) -> Row | None:
    """What a test row compares: None when the policy leaves the decision to the next one."""
    if result is None:
        return None
    return {
        "phase": result.status.get("phase"),
        "restarts": result.status["restarts"],
        "apply_job": result.apply_job,
        "delete_job": result.delete_job,
        "orphan_job": result.orphan_job,
        "cleanup": result.cleanup,
        "requeue_after": result.requeue_after,
        "running": running_reason(result),
    }


def decided(**fields: Any) -> Row:
    row: Row = {
        "phase": None,
        "restarts": 0,
        "apply_job": False,
        "delete_job": None,
        "orphan_job": None,
        "cleanup": False,
        "requeue_after": None,
        "running": None,
    }
    row.update(fields)
    return row


def ago(seconds: float) -> str:
    return timestamp(NOW - timedelta(seconds=seconds))


@pytest.mark.parametrize(
    ("status", "raw", "worker_job", "expected"),
    [
        ({}, spec(), job(), None),
        ({"phase": "Running"}, spec(), job(), None),
        ({"phase": "Succeeded"}, spec(), job(), decided(phase="Succeeded")),
        (
            {"phase": "Succeeded", "completionTime": ago(30)},
            spec(ttlSecondsAfterFinished=60),
            job(),
            decided(phase="Succeeded", requeue_after=30.0),
        ),
        (
            {"phase": "Succeeded", "completionTime": ago(120)},
            spec(ttlSecondsAfterFinished=60),
            job(),
            decided(phase="Succeeded", cleanup=True),
        ),
        ({"phase": "Failed", "restarts": 3}, spec(), None, decided(phase="Failed", restarts=3)),
        # backoffLimit raised above the restarts made: not final (backoff_raised decides).
        ({"phase": "Failed", "restarts": 1}, spec(backoffLimit=3), None, None),
    ],
    ids=["new", "running", "succeeded", "ttl-pending", "ttl-passed", "failed", "retry"],
)
def test_finished(
    status: Row, raw: Row, worker_job: WorkerJob | None, expected: Row | None
) -> None:
    assert outcome(finished(draft(raw, status, worker_job))) == expected


@pytest.mark.parametrize(
    ("suspend", "previous", "expected"),
    [
        (True, None, ("True", "Suspended")),
        (False, None, ("False", "NotSuspended")),
        (False, {"status": "True", "reason": "Suspended"}, ("False", "Resumed")),
        (False, {"status": "False", "reason": "Resumed"}, None),  # kept as it is
        (False, {"status": "False", "reason": "NotSuspended"}, ("False", "NotSuspended")),
    ],
    ids=["suspended", "never", "resumed", "resumed-before", "not-suspended"],
)
def test_suspension(suspend: bool, previous: Row | None, expected: tuple[str, str] | None) -> None:
    status = {"conditions": [{"type": "Suspended", **previous}]} if previous else {}
    d = draft(spec(suspend=suspend), status)
    before = len(d.conditions)
    suspension(d)
    added = [(c["status"], c["reason"]) for c in d.conditions[before:]]
    assert added == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("status", "raw", "worker_job", "expected"),
    [
        ({"phase": "Running"}, spec(), job(), None),
        ({"phase": "Failed", "restarts": 3}, spec(backoffLimit=3), job(), None),
        (
            {"phase": "Failed", "restarts": 1},
            spec(backoffLimit=3),
            job(failed=True),
            decided(phase="Restarting", restarts=2, delete_job="job-1", running="Restarting"),
        ),
        (
            {"phase": "Failed", "restarts": 1},
            spec(backoffLimit=3),
            job(deleting=True),
            decided(phase="Restarting", restarts=2, running="Restarting"),
        ),
    ],
    ids=["running", "limit-not-raised", "raised", "raised-job-already-going"],
)
def test_backoff_raised(
    status: Row, raw: Row, worker_job: WorkerJob | None, expected: Row | None
) -> None:
    assert outcome(backoff_raised(draft(raw, status, worker_job))) == expected


@pytest.mark.parametrize(
    ("worker_job", "expected"),
    [
        (None, None),
        (job(), None),
        (
            replace(job(deleting=True), deletion_time=ago(10)),
            decided(phase="Pending", requeue_after=SHORT_REQUEUE, running="WaitingForWorkers"),
        ),
        (
            replace(job(deleting=True), deletion_time=ago(300)),
            decided(
                phase="Pending",
                orphan_job="job-1",
                requeue_after=SHORT_REQUEUE,
                running="WaitingForWorkers",
            ),
        ),
    ],
    ids=["no-job", "job-stays", "job-going", "job-stuck-past-grace"],
)
def test_being_replaced(worker_job: WorkerJob | None, expected: Row | None) -> None:
    assert outcome(being_replaced(draft(worker_job=worker_job))) == expected


FAILED_POD = pod(0, "Failed", ready=False)


@pytest.mark.parametrize(
    ("status", "worker_job", "pods", "expected"),
    [
        ({}, None, (), None),
        ({}, job(), (pod(0), pod(1)), None),
        (
            {},
            job(),
            (FAILED_POD, pod(1)),
            decided(phase="Restarting", restarts=1, delete_job="job-1", running="Restarting"),
        ),
        (
            {},
            job(failed=True),
            (),
            decided(phase="Restarting", restarts=1, delete_job="job-1", running="Restarting"),
        ),
        (
            {"restarts": 3},
            job(),
            (FAILED_POD, pod(1)),
            decided(phase="Failed", restarts=3, running="WorkerFailed"),
        ),
        # Counted already (lastFailure names this Job): finish the restart, count nothing.
        (
            {"restarts": 1, "lastFailure": {"jobUid": "job-1"}},
            job(),
            (FAILED_POD, pod(1)),
            decided(phase="Restarting", restarts=1, delete_job="job-1", running="Restarting"),
        ),
        # A suspended Job's pods go away on purpose.
        ({}, job(suspended=True), (replace(pod(0), deleting=True),), None),
        # Training is over: a pod lost now restarts nothing.
        ({}, job(complete=True), (FAILED_POD,), None),
    ],
    ids=[
        "no-job",
        "all-running",
        "pod-failed",
        "job-failed",
        "backoff-exceeded",
        "counted-already",
        "suspended",
        "done",
    ],
)
def test_worker_failure(
    status: Row, worker_job: WorkerJob | None, pods: tuple[WorkerPod, ...], expected: Row | None
) -> None:
    assert outcome(worker_failure(draft(None, status, worker_job, pods))) == expected


SUCCEEDED = decided(phase="Succeeded", running="Finished")


@pytest.mark.parametrize(
    ("worker_job", "pods", "expected"),
    [
        (None, (), None),
        (job(), (pod(0), pod(1)), None),
        (job(complete=True), (), SUCCEEDED),
        (job(), (pod(0, "Succeeded", ready=False), pod(1, "Succeeded", ready=False)), SUCCEEDED),
        # Every index succeeded, but under another template: not this spec's training.
        (
            job(template="h-old"),
            (pod(0, "Succeeded", ready=False), pod(1, "Succeeded", ready=False)),
            None,
        ),
    ],
    ids=["no-job", "running", "job-complete", "every-index-succeeded", "old-template"],
)
def test_training_complete(
    worker_job: WorkerJob | None, pods: tuple[WorkerPod, ...], expected: Row | None
) -> None:
    assert outcome(training_complete(draft(None, {}, worker_job, pods))) == expected


@pytest.mark.parametrize(
    ("raw", "worker_job", "expected"),
    [
        (spec(), None, None),
        (spec(), job(template=HASH), None),
        (
            spec(),
            job(template="h-old"),
            decided(phase="Restarting", delete_job="job-1", running="SpecChanged"),
        ),
        (
            spec(),
            job(world=4, template="h-old"),
            decided(phase="Restarting", delete_job="job-1", running="Scaling"),
        ),
        (
            spec(suspend=True),
            job(template="h-old"),
            decided(phase="Suspended", delete_job="job-1", running="SpecChanged"),
        ),
    ],
    ids=["no-job", "same-template", "changed", "new-world-size", "changed-while-suspended"],
)
def test_template_changed(raw: Row, worker_job: WorkerJob | None, expected: Row | None) -> None:
    assert outcome(template_changed(draft(raw, {}, worker_job))) == expected


@pytest.mark.parametrize(
    ("raw", "status", "worker_job", "pods", "expected"),
    [
        (
            spec(),
            {},
            None,
            (),
            decided(
                phase="Pending",
                apply_job=True,
                requeue_after=SHORT_REQUEUE,
                running="WaitingForWorkers",
            ),
        ),
        (
            spec(),
            {},
            job(),
            (pod(0),),
            decided(phase="Pending", apply_job=True, running="WaitingForWorkers"),
        ),
        (
            spec(),
            {},
            job(),
            (pod(0), pod(1)),
            decided(phase="Running", apply_job=True, running="AllWorkersRunning"),
        ),
        # One worker finished while the other still runs: still Running.
        (
            spec(),
            {"phase": "Running"},
            job(),
            (pod(0, "Succeeded", ready=False), pod(1)),
            decided(phase="Running", apply_job=True, running="AllWorkersRunning"),
        ),
        # Containers that exited 0 while their pods' phases still say Running (the kubelet
        # has not written Succeeded yet): the group is finishing, not waiting for workers.
        (
            spec(),
            {"phase": "Running"},
            job(),
            (pod(0, "Succeeded", ready=False), pod(1, ready=False, finished=True)),
            decided(phase="Running", apply_job=True, running="AllWorkersRunning"),
        ),
        (
            spec(),
            {"phase": "Running"},
            job(),
            (pod(0, ready=False, finished=True), pod(1, ready=False, finished=True)),
            decided(phase="Running", apply_job=True, running="AllWorkersRunning"),
        ),
        # ... but a worker that stopped being ready without finishing is waited for
        (
            spec(),
            {"phase": "Running"},
            job(),
            (pod(0), pod(1, ready=False)),
            decided(phase="Pending", apply_job=True, running="WaitingForWorkers"),
        ),
        (
            spec(suspend=True),
            {},
            job(suspended=True),
            (),
            decided(phase="Suspended", apply_job=True, running="Suspended"),
        ),
        (
            spec(),
            {"phase": "Restarting", "conditions": [{"type": "Running", "reason": "Scaling"}]},
            job(),
            (pod(0),),
            decided(phase="Restarting", apply_job=True, running="Scaling"),
        ),
    ],
    ids=[
        "no-job",
        "one-of-two",
        "all-running",
        "finishing",
        "finishing-phases-lag",
        "finishing-none-succeeded-yet",
        "not-ready-not-finished",
        "suspended",
        "restart-in-progress",
    ],
)
def test_steady(
    raw: Row,
    status: Row,
    worker_job: WorkerJob | None,
    pods: tuple[WorkerPod, ...],
    expected: Row,
) -> None:
    assert outcome(steady(draft(raw, status, worker_job, pods))) == expected
