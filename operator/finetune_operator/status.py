"""Status of a FinetuneJob from what is observed: pure functions, no cluster, no kopf.

- `WorkerJob` / `WorkerPod`: the facts the operator needs from the worker Job and its pods,
  read from the raw API objects (`job_view`, `pod_view`).
- `Reason`: every condition reason the operator writes, in one enum.
- `set_condition`: Kubernetes-style conditions; lastTransitionTime is kept while the
  condition's status does not change.
- `workers_status`: `{desired, ready, summary}` ("ready/desired" is the printer column).
- `transition_events`: the Events a person should see, from the change of conditions.
- `status_patch`: the merge patch that brings status to the computed one (empty: no write).

The operator owns every status field except `progress` and `checkpoint`, which rank 0 of the
trainer reports; `status_patch` never touches those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from finetune_operator.api import ConditionType, Phase
from finetune_operator.objects import (
    COMPLETION_INDEX_ANNOTATION,
    CONFIG_HASH_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    WORLD_SIZE_ANNOTATION,
)

Obj = dict[str, Any]

# Status fields the trainer writes: the operator never patches them.
TRAINER_FIELDS = frozenset({"progress", "checkpoint", "ranks"})


class Reason(str, Enum):
    """Every reason the operator puts on a condition or an Event."""

    # Valid
    SPEC_VALID = "SpecValid"
    # the workers counted their devices and the batch rule holds at the world size they started
    DEVICES_COUNTED = "DevicesCounted"
    INVALID_SPEC = "InvalidSpec"
    BATCH_RULE = "BatchRule"
    # the hub refused the model or data set (gated, not found, no such revision)
    HUB_REFUSED = "HubRefused"
    # Created
    OBJECTS_CREATED = "ObjectsCreated"
    NOT_CREATED = "NotCreated"
    OBJECT_REJECTED = "ObjectRejected"
    CLEANED_UP = "CleanedUp"
    # Running
    ALL_WORKERS_RUNNING = "AllWorkersRunning"
    WAITING_FOR_WORKERS = "WaitingForWorkers"
    RESTARTING = "Restarting"
    SCALING = "Scaling"
    SPEC_CHANGED = "SpecChanged"
    FINISHED = "Finished"
    # Succeeded
    TRAINING_COMPLETE = "TrainingComplete"
    NOT_FINISHED = "NotFinished"
    # Failed
    NO_FAILURE = "NoFailure"
    WORKER_FAILED = "WorkerFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    # Suspended
    SUSPENDED = "Suspended"
    NOT_SUSPENDED = "NotSuspended"
    RESUMED = "Resumed"
    # Queued (and Running, while Kueue holds the worker Job)
    QUEUED = "Queued"
    PREEMPTED = "Preempted"
    ADMITTED = "Admitted"

    @classmethod
    def for_spec_error(cls, reason: str) -> Reason:
        try:
            return cls(reason)
        except ValueError:
            return cls.INVALID_SPEC


# Condition (type, status, reason) that deserve a Warning Event rather than a Normal one.
_WARNINGS = {
    (ConditionType.VALID, "False"),
    (ConditionType.FAILED, "True"),
}
_WARNING_REASONS = {Reason.RESTARTING, Reason.WORKER_FAILED, Reason.BACKOFF_LIMIT_EXCEEDED}


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class WorkerPod:
    name: str
    index: int | None
    phase: str
    ready: bool
    deleting: bool
    node: str | None = None
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    # The scheduler's word on a pod it could not place (PodScheduled=False).
    unschedulable: str | None = None
    created: str | None = None  # metadata.creationTimestamp (RFC 3339, seconds)
    # When its deletion was asked (deletionTimestamp less the grace period).
    deletion_asked: str | None = None
    # Every container terminated with exit code 0: done, though the phase may still say
    # Running for a moment (the kubelet writes Succeeded after).
    finished: bool = False

    @property
    def running(self) -> bool:
        return self.phase == "Running" and self.ready and not self.deleting

    @property
    def broken(self) -> bool:
        """Failed, or going away while it should run (deleted, node lost)."""
        return self.phase == "Failed" or (self.deleting and self.phase not in ("Succeeded",))

    def describe(self) -> str:
        """A person-readable line: what went wrong with this pod."""
        if self.phase == "Failed":
            what = f"pod {self.name} failed"
            details = [d for d in (self.reason, self.message) if d]
            if self.exit_code is not None:
                details.append(f"exit code {self.exit_code}")
            return what + (f" ({'; '.join(details)})" if details else "")
        return f"pod {self.name} was deleted" + (f" from node {self.node}" if self.node else "")


@dataclass(frozen=True)
class WorkerJob:
    uid: str
    world_size: int | None
    config_hash: str | None
    template_hash: str | None
    suspended: bool
    complete: bool
    failed: bool
    deleting: bool
    failure_reason: str | None = None
    failure_message: str | None = None
    completion_time: str | None = None
    deletion_time: str | None = None
    # When the Job controller last saw it resumed (Suspended condition turned False): pods
    # deleted before then were stopped by the suspension, not lost.
    resumed_at: str | None = None


def job_view(job: Mapping[str, Any]) -> WorkerJob:
    metadata = job.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}

    def true(kind: str) -> bool:
        return (conditions.get(kind) or {}).get("status") == "True"

    failed = conditions.get("Failed") or {}
    completions = spec.get("completions")
    world = annotations.get(WORLD_SIZE_ANNOTATION)
    return WorkerJob(
        uid=metadata.get("uid", ""),
        world_size=int(world) if world and str(world).isdigit() else None,
        config_hash=annotations.get(CONFIG_HASH_ANNOTATION),
        template_hash=annotations.get(TEMPLATE_HASH_ANNOTATION),
        # Also while the Job controller still says Suspended: resumed a moment ago (by us,
        # after a hand-made suspend), the pods that suspend stopped are still going and are
        # no worker failure.
        suspended=bool(spec.get("suspend")) or true("Suspended"),
        # Every index succeeded is the end of training even before the Job controller writes
        # Complete (it first waits for the pods' tracking finalizers to go, and may itself be
        # restarting): a pod lost after that moment must not restart a finished group.
        complete=true("Complete")
        or true("SuccessCriteriaMet")
        or (completions is not None and int(status.get("succeeded") or 0) >= int(completions)),
        failed=true("Failed"),
        deleting=bool(metadata.get("deletionTimestamp")),
        failure_reason=failed.get("reason") if true("Failed") else None,
        failure_message=failed.get("message") if true("Failed") else None,
        completion_time=status.get("completionTime"),
        deletion_time=metadata.get("deletionTimestamp"),
        resumed_at=(conditions.get("Suspended") or {}).get("lastTransitionTime")
        if (conditions.get("Suspended") or {}).get("status") == "False"
        else None,
    )


def pod_view(pod: Mapping[str, Any]) -> WorkerPod:
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    scheduled: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
    )
    unschedulable = (
        scheduled.get("message") or scheduled.get("reason") or "not scheduled"
        if scheduled.get("status") == "False"
        else None
    )
    reason, message, exit_code = status.get("reason"), status.get("message"), None
    containers = status.get("containerStatuses") or []
    finished = bool(containers) and all(
        ((c.get("state") or {}).get("terminated") or {}).get("exitCode", 1) == 0 for c in containers
    )
    for container in containers:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and (terminated.get("exitCode") or 0) != 0:
            exit_code = terminated.get("exitCode")
            reason = terminated.get("reason") or reason
            message = terminated.get("message") or message
            break
    index = annotations.get(COMPLETION_INDEX_ANNOTATION)
    deleting_at = parse_time(metadata.get("deletionTimestamp"))
    asked = (
        timestamp(
            deleting_at - timedelta(seconds=int(metadata.get("deletionGracePeriodSeconds") or 0))
        )
        if deleting_at is not None
        else None
    )
    return WorkerPod(
        name=metadata.get("name", ""),
        index=int(index) if index is not None and str(index).isdigit() else None,
        phase=status.get("phase") or "Pending",
        ready=conditions.get("Ready") == "True",
        deleting=bool(metadata.get("deletionTimestamp")),
        node=(pod.get("spec") or {}).get("nodeName"),
        reason=reason,
        message=message,
        exit_code=exit_code,
        unschedulable=unschedulable,
        created=metadata.get("creationTimestamp"),
        deletion_asked=asked,
        finished=finished,
    )


def _surplus(pod: WorkerPod, pods: Sequence[WorkerPod]) -> bool:
    """A pod being deleted while an older pod of its index lives on: a duplicate the Job
    controller made and is taking back (after it restarted, its cache behind, it may create a
    second pod for an index that has one), not a lost worker. A lost worker is the older one:
    its replacement is newer."""
    if not pod.deleting or pod.phase == "Failed" or pod.index is None:
        return False
    born = parse_time(pod.created)
    return born is not None and any(
        other.index == pod.index
        and not other.deleting
        and other.phase != "Failed"
        and (older := parse_time(other.created)) is not None
        and older < born
        for other in pods
    )


def first_broken(pods: Iterable[WorkerPod]) -> WorkerPod | None:
    """The failing pod to report: a Failed one before a deleted one, lowest index first. A
    surplus duplicate being taken back (`_surplus`) is no failure."""
    pods = list(pods)
    broken = [p for p in pods if p.broken and not _surplus(p, pods)]
    broken.sort(key=lambda p: (p.phase != "Failed", p.index if p.index is not None else 1 << 30))
    return broken[0] if broken else None


def workers_status(desired: int, pods: Iterable[WorkerPod]) -> Obj:
    ready = sum(1 for p in pods if p.running)
    return {"desired": desired, "ready": ready, "summary": f"{ready}/{desired}"}


def condition(
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    generation: int,
    now: datetime,
) -> Obj:
    return {
        "type": type_.value,
        "status": "True" if status else "False",
        "reason": reason.value,
        "message": message,
        "lastTransitionTime": timestamp(now),
        "observedGeneration": generation,
    }


def set_condition(conditions: Sequence[Mapping[str, Any]], new: Obj) -> list[Obj]:
    """`conditions` with `new` in place of the one of its type; lastTransitionTime kept when the
    status is unchanged. Order: existing ones stay where they are, a new type goes last."""
    result: list[Obj] = []
    placed = False
    for existing in conditions:
        if existing.get("type") == new["type"]:
            merged = dict(new)
            if existing.get("status") == new["status"] and existing.get("lastTransitionTime"):
                merged["lastTransitionTime"] = existing["lastTransitionTime"]
            result.append(merged)
            placed = True
        else:
            result.append(dict(existing))
    if not placed:
        result.append(dict(new))
    return result


def merge_conditions(conditions: Sequence[Mapping[str, Any]], new: Iterable[Obj]) -> list[Obj]:
    result = [dict(c) for c in conditions]
    for item in new:
        result = set_condition(result, item)
    order = {t.value: i for i, t in enumerate(ConditionType)}
    return sorted(result, key=lambda c: order.get(c.get("type", ""), len(order)))


def get_condition(conditions: Iterable[Mapping[str, Any]], type_: ConditionType) -> Obj | None:
    for item in conditions:
        if item.get("type") == type_.value:
            return dict(item)
    return None


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def transition_events(
    old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[Event]:
    """An Event per condition whose (status, reason) changed. A condition that first appears
    as False says nothing new (Succeeded=False/NotFinished on a fresh job), except Valid."""
    events: list[Event] = []
    for item in new:
        type_ = ConditionType(item["type"])
        before = get_condition(old, type_)
        key = (item.get("status"), item.get("reason"))
        if before is not None and (before.get("status"), before.get("reason")) == key:
            continue
        if before is None and item.get("status") == "False" and type_ is not ConditionType.VALID:
            continue
        if type_ is ConditionType.SUSPENDED and item.get("reason") == Reason.NOT_SUSPENDED.value:
            continue
        if any(e.reason == item.get("reason") for e in events):
            continue  # Suspended on two conditions: one Event
        warning = (type_, item.get("status")) in _WARNINGS or item.get("reason") in {
            r.value for r in _WARNING_REASONS
        }
        events.append(
            Event(
                type="Warning" if warning else "Normal",
                reason=str(item.get("reason")),
                message=str(item.get("message", "")),
            )
        )
    return events


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> Obj:
    """The merge patch from `current` to `desired` for the fields the operator owns: only what
    differs, so an unchanged status is no write at all. A None value deletes the field."""
    patch: Obj = {}
    for key, value in desired.items():
        if key in TRAINER_FIELDS:
            continue
        if value is None:
            if current.get(key) is not None:
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch


def phase_of(status: Mapping[str, Any]) -> Phase | None:
    try:
        return Phase(status.get("phase"))
    except ValueError:
        return None


@dataclass(frozen=True)
class RanksReport:
    """Rank 0's report (`status.ranks`) of the world torchrun started: each worker starts a rank
    per device it sees (a 2-stack Max card is two devices), so the world size is known only
    once the workers have counted. `reason`/`message` are set when the trainer refused that
    world size (the batch rule)."""

    world_size: int
    summary: str
    accumulation: int | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def refused(self) -> bool:
        return self.reason is not None


def ranks_report(status: Mapping[str, Any], config_hash: str) -> RanksReport | None:
    """The trainer's report if it is about the config the operator wants now (`config_hash`):
    one left by a group of another spec (before a scale, before a fix) is ignored."""
    ranks = status.get("ranks") or {}
    world = ranks.get("worldSize")
    if ranks.get("configHash") != config_hash or not isinstance(world, int) or world < 1:
        return None
    accumulation = ranks.get("gradientAccumulationSteps")
    return RanksReport(
        world_size=world,
        summary=str(ranks.get("summary") or f"{world} ranks"),
        accumulation=accumulation if isinstance(accumulation, int) else None,
        reason=ranks.get("reason") or None,
        message=ranks.get("message") or None,
    )


def counted_message(report: RanksReport, planned_world: int, global_batch: int, micro: Any) -> str:
    """The Valid condition once the workers have counted their devices."""
    world = report.world_size
    split = (
        f"micro-batch {micro} x gradient accumulation {report.accumulation} x {world}"
        if report.accumulation is not None
        else "the micro-batch and accumulation the trainer chose (microBatchSize auto)"
    )
    message = f"The workers started {report.summary}: global batch {global_batch} = {split}."
    if world != planned_world:
        message += (
            f" The spec's workers x devicesPerWorker is {planned_world}: each worker starts a "
            "rank per device it sees (each stack of a multi-stack GPU is one)."
        )
    return message


def refused_message(report: RanksReport) -> str:
    """The Valid=False condition (and its Event) when the trainer refused the world started,
    or the hub refused what the spec names."""
    if report.reason == Reason.HUB_REFUSED.value:
        return (
            f"The hub refused what the spec names: {report.message} Nothing is restarted: after "
            "fixing the id, the revision or the token's access, edit the spec (kubectl edit) and "
            "the group restarts with it."
        )
    return (
        f"The workers started {report.summary}, and the trainer refused to train: "
        f"{report.message} Nothing trains until the spec is changed (kubectl edit): the group "
        "then restarts with it."
    )
