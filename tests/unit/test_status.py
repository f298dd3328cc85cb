"""Status from observed objects: pod and Job views, conditions, workers, events, patches."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from finetune_operator.api import ConditionType
from finetune_operator.status import (
    Reason,
    condition,
    first_broken,
    job_view,
    merge_conditions,
    pod_view,
    set_condition,
    status_patch,
    transition_events,
    workers_status,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 1, 1, 12, 5, 0, tzinfo=timezone.utc)


def pod(
    name: str = "j-worker-0-abc",
    phase: str = "Running",
    ready: bool = True,
    deleting: bool = False,
    index: int = 0,
    terminated: dict[str, Any] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
    }
    if created is not None:
        metadata["creationTimestamp"] = created
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": metadata, "spec": {"nodeName": "gpu-node-0"}, "status": status}


@pytest.mark.parametrize(
    ("raw", "running", "broken"),
    [
        (pod(), True, False),
        (pod(phase="Pending", ready=False), False, False),
        (pod(phase="Running", ready=False), False, False),
        (pod(deleting=True), False, True),
        (pod(phase="Failed", ready=False), False, True),
        (pod(phase="Succeeded", ready=False), False, False),
        (pod(phase="Succeeded", ready=False, deleting=True), False, False),
    ],
)
def test_pod_view_running_and_broken(raw: dict[str, Any], running: bool, broken: bool) -> None:
    view = pod_view(raw)
    assert (view.running, view.broken) == (running, broken)


def test_pod_view_reads_the_failing_container() -> None:
    view = pod_view(
        pod(
            phase="Failed",
            ready=False,
            index=1,
            terminated={"exitCode": 137, "reason": "OOMKilled", "message": "out of memory"},
        )
    )
    assert (view.index, view.exit_code, view.reason, view.message) == (
        1,
        137,
        "OOMKilled",
        "out of memory",
    )
    assert view.describe() == "pod j-worker-0-abc failed (OOMKilled; out of memory; exit code 137)"
    assert pod_view(pod(deleting=True)).describe() == (
        "pod j-worker-0-abc was deleted from node gpu-node-0"
    )


def test_pod_view_finished_when_every_container_exited_zero() -> None:
    assert pod_view(pod(ready=False, terminated={"exitCode": 0})).finished
    assert not pod_view(pod(ready=False, terminated={"exitCode": 137})).finished
    assert not pod_view(pod()).finished


def test_pod_view_reads_the_schedulers_message() -> None:
    raw = pod(phase="Pending", ready=False)
    raw["status"]["conditions"].append(
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/5 nodes are available: 5 Insufficient gpu.intel.com/i915.",
        }
    )
    assert "Insufficient" in (pod_view(raw).unschedulable or "")
    assert pod_view(pod()).unschedulable is None


def test_first_broken_prefers_failed_then_lowest_index() -> None:
    pods = [
        pod_view(pod("p2", deleting=True, index=0)),
        pod_view(pod("p3", phase="Failed", index=3)),
        pod_view(pod("p1", phase="Failed", index=1)),
        pod_view(pod("ok", index=2)),
    ]
    broken = first_broken(pods)
    assert broken is not None and broken.name == "p1"
    assert first_broken([pod_view(pod())]) is None


def test_a_duplicate_taken_back_is_no_failure_but_a_lost_worker_is() -> None:
    """After a restart the Job controller may create a second pod for an index that has one and
    then delete it: the newer pod going away while the older runs is no worker failure. A
    worker lost (the older pod deleted, its replacement newer) still is; so is a tie."""
    old, new = "2026-01-01T12:00:00Z", "2026-01-01T12:00:09Z"
    surplus = [
        pod_view(pod("first", index=1, created=old)),
        pod_view(pod("second", index=1, created=new, deleting=True, ready=False)),
        pod_view(pod("other", index=0, created=old)),
    ]
    assert first_broken(surplus) is None
    lost = [
        pod_view(pod("first", index=1, created=old, deleting=True)),
        pod_view(pod("replacement", index=1, created=new, phase="Pending", ready=False)),
    ]
    broken = first_broken(lost)
    assert broken is not None and broken.name == "first"
    tie = [
        pod_view(pod("a", index=1, created=old)),
        pod_view(pod("b", index=1, created=old, deleting=True)),
    ]
    broken = first_broken(tie)
    assert broken is not None and broken.name == "b"
    # a deleted pod with no sibling, or only a failed one, is a failure as before
    alone = [pod_view(pod("gone", index=2, created=new, deleting=True))]
    assert first_broken(alone) is not None
    failed_sibling = [
        pod_view(pod("f", index=2, created=old, phase="Failed", ready=False)),
        pod_view(pod("gone", index=2, created=new, deleting=True)),
    ]
    broken = first_broken(failed_sibling)
    assert broken is not None and broken.name == "f"


def test_job_view() -> None:
    job = job_view(
        {
            "metadata": {
                "uid": "u1",
                "annotations": {
                    "finetune.dev/world-size": "4",
                    "finetune.dev/config-hash": "abc",
                    "finetune.dev/template-hash": "def",
                },
            },
            "spec": {"suspend": True},
            "status": {
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
                ]
            },
        }
    )
    assert (job.uid, job.world_size, job.template_hash, job.suspended) == ("u1", 4, "def", True)
    assert job.failed and not job.complete and job.failure_reason == "BackoffLimitExceeded"
    assert not job_view({"metadata": {"uid": "u"}}).failed
    # resumed, but the Job controller has not caught up: still suspended (its pods still go)
    resumed = job_view(
        {
            "metadata": {"uid": "u"},
            "spec": {"suspend": False},
            "status": {"conditions": [{"type": "Suspended", "status": "True"}]},
        }
    )
    assert resumed.suspended


@pytest.mark.parametrize(
    "status",
    [
        {"conditions": [{"type": "Complete", "status": "True"}]},
        # Every index succeeded, before the Job controller writes Complete:
        {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]},
        {"succeeded": 2},
    ],
)
def test_job_view_counts_every_index_succeeded_as_complete(status: dict[str, object]) -> None:
    view = job_view({"metadata": {"uid": "u"}, "spec": {"completions": 2}, "status": status})
    assert view.complete


def test_job_view_some_indexes_succeeded_is_not_complete() -> None:
    view = job_view(
        {"metadata": {"uid": "u"}, "spec": {"completions": 2}, "status": {"succeeded": 1}}
    )
    assert not view.complete


@pytest.mark.parametrize(
    ("ready_flags", "summary"),
    [([], "0/2"), ([True], "1/2"), ([True, False], "1/2"), ([True, True], "2/2")],
)
def test_workers_status(ready_flags: list[bool], summary: str) -> None:
    pods = [pod_view(pod(f"p{i}", ready=r)) for i, r in enumerate(ready_flags)]
    status = workers_status(2, pods)
    assert status["summary"] == summary and status["desired"] == 2
    assert status["ready"] == int(summary.split("/")[0])


def test_last_transition_time_kept_while_status_unchanged() -> None:
    first = condition(ConditionType.RUNNING, False, Reason.WAITING_FOR_WORKERS, "0/2", 1, T0)
    same = condition(ConditionType.RUNNING, False, Reason.RESTARTING, "restarting", 2, T1)
    flipped = condition(ConditionType.RUNNING, True, Reason.ALL_WORKERS_RUNNING, "2/2", 2, T1)
    kept = set_condition([first], same)[0]
    assert kept["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert kept["reason"] == "Restarting" and kept["observedGeneration"] == 2
    moved = set_condition([first], flipped)[0]
    assert moved["lastTransitionTime"] == "2026-01-01T12:05:00Z"


def test_merge_conditions_orders_by_type() -> None:
    merged = merge_conditions(
        [],
        [
            condition(ConditionType.SUSPENDED, False, Reason.NOT_SUSPENDED, "", 1, T0),
            condition(ConditionType.VALID, True, Reason.SPEC_VALID, "", 1, T0),
        ],
    )
    assert [c["type"] for c in merged] == ["Valid", "Suspended"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # A fresh job: Valid=True and Created=True say something; False conditions do not.
        (
            [],
            [
                (ConditionType.VALID, True, Reason.SPEC_VALID),
                (ConditionType.SUCCEEDED, False, Reason.NOT_FINISHED),
            ],
            [("Normal", "SpecValid")],
        ),
        # An invalid spec is always worth a Warning.
        ([], [(ConditionType.VALID, False, Reason.BATCH_RULE)], [("Warning", "BatchRule")]),
        # Unchanged (status, reason): no event, whatever the message.
        (
            [(ConditionType.RUNNING, True, Reason.ALL_WORKERS_RUNNING)],
            [(ConditionType.RUNNING, True, Reason.ALL_WORKERS_RUNNING)],
            [],
        ),
        # Running -> Restarting is a Warning; back to Running is Normal.
        (
            [(ConditionType.RUNNING, True, Reason.ALL_WORKERS_RUNNING)],
            [(ConditionType.RUNNING, False, Reason.RESTARTING)],
            [("Warning", "Restarting")],
        ),
        (
            [(ConditionType.RUNNING, False, Reason.RESTARTING)],
            [(ConditionType.RUNNING, True, Reason.ALL_WORKERS_RUNNING)],
            [("Normal", "AllWorkersRunning")],
        ),
        (
            [(ConditionType.FAILED, False, Reason.NO_FAILURE)],
            [(ConditionType.FAILED, True, Reason.BACKOFF_LIMIT_EXCEEDED)],
            [("Warning", "BackoffLimitExceeded")],
        ),
        (
            [(ConditionType.SUSPENDED, True, Reason.SUSPENDED)],
            [(ConditionType.SUSPENDED, False, Reason.RESUMED)],
            [("Normal", "Resumed")],
        ),
    ],
)
def test_transition_events(
    old: list[tuple[ConditionType, bool, Reason]],
    new: list[tuple[ConditionType, bool, Reason]],
    expected: list[tuple[str, str]],
) -> None:
    before = [condition(t, s, r, "before", 1, T0) for t, s, r in old]
    after = merge_conditions(before, [condition(t, s, r, "after", 1, T1) for t, s, r in new])
    events = transition_events(before, after)
    assert [(e.type, e.reason) for e in events] == expected


def test_status_patch_only_what_changed_and_never_trainer_fields() -> None:
    current = {"phase": "Running", "restarts": 0, "progress": {"step": 5}, "startTime": "x"}
    assert status_patch(current, {"phase": "Running", "restarts": 0}) == {}
    assert status_patch(current, {"phase": "Restarting", "restarts": 1}) == {
        "phase": "Restarting",
        "restarts": 1,
    }
    assert status_patch(current, {"progress": {"step": 0}, "checkpoint": {}}) == {}
    assert status_patch(current, {"startTime": None}) == {"startTime": None}
    assert status_patch({}, {"startTime": None}) == {}
