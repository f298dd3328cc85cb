"""A FinetuneJob in a Kueue queue (label kueue.x-k8s.io/queue-name): its worker Job is created
suspended and only Kueue unsuspends (admits) or suspends (preempts) it afterwards; the status
says Queued / Preempted; a preemption is no failure; the user's suspend takes the Job out of
the queue."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from reconcile_helpers import NOW, cond, inputs, job, pod, spec

from finetune_operator.objects import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    JobRef,
    build_desired_objects,
)
from finetune_operator.reconcile import (
    PREEMPTION_SETTLE_SECONDS,
    Inputs,
    Plan,
    job_update,
    plan,
)
from finetune_operator.resolve import parse_spec, resolve
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import job_view, pod_view, timestamp

QUEUE = "team-a"


def queued(i: Inputs) -> Inputs:
    return dataclasses.replace(i, queue=QUEUE)


def running_status(**extra: Any) -> dict[str, Any]:
    return {"phase": "Running", "restarts": 0, **extra}


def desired_job(labels: dict[str, str] | None, **fields: Any) -> dict[str, Any]:
    parsed = parse_spec(spec(**fields))
    ref = JobRef(name="j", namespace="ns", uid="u", labels=labels)
    return build_desired_objects(ref, parsed, resolve(parsed), OperatorSettings()).job


# -- the desired worker Job ----------------------------------------------------------------


def test_a_queued_job_is_created_suspended_with_the_kueue_labels() -> None:
    labels = {KUEUE_QUEUE_LABEL: QUEUE, KUEUE_PRIORITY_LABEL: "research", "team": "x"}
    worker_job = desired_job(labels)
    assert worker_job["spec"]["suspend"] is True
    job_labels = worker_job["metadata"]["labels"]
    assert job_labels[KUEUE_QUEUE_LABEL] == QUEUE
    assert job_labels[KUEUE_PRIORITY_LABEL] == "research"
    assert "team" not in job_labels


def test_the_queue_does_not_change_the_template_hash() -> None:
    plain = desired_job(None)
    in_queue = desired_job({KUEUE_QUEUE_LABEL: QUEUE})
    assert plain["spec"]["suspend"] is False
    key = "finetune.dev/template-hash"
    assert plain["metadata"]["annotations"][key] == in_queue["metadata"]["annotations"][key]


def test_a_queued_jobs_update_leaves_suspend_and_template_to_kueue() -> None:
    worker_job = desired_job({KUEUE_QUEUE_LABEL: QUEUE})
    update = job_update(worker_job, QUEUE)
    assert "suspend" not in update["spec"] and "template" not in update["spec"]
    assert update["spec"]["completions"] == worker_job["spec"]["completions"]
    assert update["metadata"] == worker_job["metadata"]
    # The desired object itself is left whole (it is what a create sends).
    assert worker_job["spec"]["suspend"] is True and "template" in worker_job["spec"]
    plain = desired_job(None)
    assert job_update(plain, None) is plain


# -- what the status says while Kueue holds the Job -----------------------------------------


def test_waiting_for_quota_is_queued_naming_the_queue() -> None:
    result = plan(queued(inputs(status={"phase": "Pending"}, worker_job=job(suspended=True))))
    assert result.status["phase"] == "Queued"
    queued_condition = cond(result, "Queued")
    assert (queued_condition["status"], queued_condition["reason"]) == ("True", "Queued")
    assert QUEUE in queued_condition["message"]
    assert cond(result, "Running")["reason"] == "Queued"
    assert result.delete_job is None and result.apply_job
    assert result.status["restarts"] == 0
    assert "Queued" in [e.reason for e in result.events]


def test_a_fresh_queued_job_creates_its_worker_job() -> None:
    result = plan(queued(inputs()))
    assert result.apply_job and result.status["phase"] == "Pending"


def test_admitted_then_running() -> None:
    result = plan(
        queued(inputs(status={"phase": "Queued"}, worker_job=job(), pods=(pod(0), pod(1))))
    )
    assert result.status["phase"] == "Running"
    admitted = cond(result, "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")


def preempting_pods() -> tuple[Any, ...]:
    # The Job controller deletes the pods of a Job that was suspended.
    return tuple(
        dataclasses.replace(
            pod(index), deleting=True, deletion_asked=timestamp(NOW - timedelta(seconds=20))
        )
        for index in range(2)
    )


def test_a_preemption_is_no_failure() -> None:
    result = plan(
        queued(
            inputs(
                status=running_status(checkpoint={"step": 40}),
                worker_job=job(suspended=True),
                pods=preempting_pods(),
            )
        )
    )
    assert result.status["phase"] == "Preempted"
    held = cond(result, "Queued")
    assert (held["status"], held["reason"]) == ("True", "Preempted")
    assert "checkpoint step 40" in held["message"]
    assert result.status["restarts"] == 0 and "lastFailure" not in result.status
    assert cond(result, "Failed")["status"] == "False"
    assert result.delete_job is None
    assert result.status["workers"]["ready"] == 0


def test_preempted_stays_preempted_until_admitted_again() -> None:
    waiting = plan(queued(inputs(status={"phase": "Preempted"}, worker_job=job(suspended=True))))
    assert waiting.status["phase"] == "Preempted"
    again = plan(
        queued(inputs(status={"phase": "Preempted"}, worker_job=job(), pods=(pod(0), pod(1))))
    )
    assert again.status["phase"] == "Running" and again.status["restarts"] == 0


@pytest.mark.parametrize(
    ("asked_ago", "restarts"),
    [(1.0, 0), (PREEMPTION_SETTLE_SECONDS + 5, 1)],
    ids=["suspend-not-seen-yet", "really-lost"],
)
def test_a_pod_going_just_before_the_suspend_is_seen(asked_ago: float, restarts: int) -> None:
    """Kueue's suspend may reach the cache after the pod deletions it causes: a queued Job's
    pod that went moments ago is not yet a lost worker; later it is."""
    gone = dataclasses.replace(
        pod(0), deleting=True, deletion_asked=timestamp(NOW - timedelta(seconds=asked_ago))
    )
    result = plan(queued(inputs(status=running_status(), worker_job=job(), pods=(gone, pod(1)))))
    assert result.status["restarts"] == restarts
    if restarts == 0:
        assert result.delete_job is None
        assert result.requeue_after is not None and result.requeue_after <= 1.0
    else:
        assert result.delete_job == "job-1"


def test_an_unqueued_job_counts_a_deleted_pod_at_once() -> None:
    gone = dataclasses.replace(
        pod(0), deleting=True, deletion_asked=timestamp(NOW - timedelta(seconds=1))
    )
    result = plan(inputs(status=running_status(), worker_job=job(), pods=(gone, pod(1))))
    assert result.status["restarts"] == 1


# -- the user's own suspend -------------------------------------------------------------------


def test_suspending_a_queued_job_takes_it_out_of_the_queue() -> None:
    result: Plan = plan(
        queued(inputs(spec(suspend=True), status=running_status(), worker_job=job()))
    )
    assert result.delete_job == "job-1"
    assert result.status["phase"] == "Suspended"
    out = cond(result, "Queued")
    assert (out["status"], out["reason"]) == ("False", "Suspended")
    assert result.status["restarts"] == 0


def test_a_suspended_queued_job_gets_no_worker_job_until_resumed() -> None:
    suspended = plan(queued(inputs(spec(suspend=True), status={"phase": "Suspended"})))
    assert not suspended.apply_job and suspended.status["phase"] == "Suspended"
    resumed = plan(queued(inputs(spec(suspend=False), status={"phase": "Suspended"})))
    assert resumed.apply_job


# -- the facts read from the Job and pods ----------------------------------------------------


def test_job_view_reads_when_the_job_was_resumed() -> None:
    raw = {
        "metadata": {"uid": "u"},
        "spec": {"suspend": False},
        "status": {
            "conditions": [
                {
                    "type": "Suspended",
                    "status": "False",
                    "reason": "JobResumed",
                    "lastTransitionTime": "2026-01-01T12:00:00Z",
                }
            ]
        },
    }
    view = job_view(raw)
    assert view.resumed_at == "2026-01-01T12:00:00Z" and not view.suspended
    raw["status"]["conditions"][0]["status"] = "True"
    assert job_view(raw).resumed_at is None


def test_pod_view_reads_when_its_deletion_was_asked() -> None:
    raw = {
        "metadata": {
            "name": "p",
            "deletionTimestamp": "2026-01-01T12:00:30Z",
            "deletionGracePeriodSeconds": 30,
        },
        "status": {"phase": "Running"},
    }
    assert pod_view(raw).deletion_asked == "2026-01-01T12:00:00Z"
    assert pod_view({"metadata": {"name": "p"}}).deletion_asked is None
