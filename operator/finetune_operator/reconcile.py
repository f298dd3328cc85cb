"""Reconcile one FinetuneJob: observe, decide (pure: `plan`), act (`Reconciler`).

`plan(Inputs) -> Plan` holds every decision; it asks one small policy function per concern,
in this order (each has its own table of tests), and the first that decides makes the plan:

- `invalid_spec`: Valid=False with the reason and an Event; nothing is created, and a running
  group is left as it is (a rejected edit changes nothing but the condition);
- `finished`: Succeeded / Failed are final: nothing is recreated; after
  ttlSecondsAfterFinished the worker Job (with its pods) and the Service are deleted, the
  FinetuneJob is kept;
- (`suspension` sets the Suspended condition from spec.suspend on every other path;)
- `backoff_raised`: a Failed job whose spec.backoffLimit was raised restarts once more;
- `being_replaced`: a worker Job that is going is waited for (let go after a grace period);
- `worker_failure`: a failed worker Job, or a worker pod that failed or went away (deleted,
  node lost) while it should run: the whole group restarts (the Job is deleted and
  recreated, the trainer resumes from its last checkpoint), `restarts` + 1, up to
  `backoffLimit`, then Failed with the pod's reason; `lastFailure.jobUid` makes the count
  exactly-once across operator restarts;
- `training_complete`: every worker finished: Succeeded;
- `leave_queue`: a queued job (label `kueue.x-k8s.io/queue-name`) that the user suspends:
  its worker Job is deleted, which takes its workload out of the queue and frees the quota;
  resuming creates it again, into the queue (Kueue owns the Job's suspend, so the user's
  suspend cannot be written there);
- `template_changed`: a changed pod template (world size, image, ...): the group restarts with
  it (Scaling when the world size changed: the ConfigMap carries the recomputed accumulation);
- `steady`: every object applied (created, drift repaired; suspend follows the spec) and the
  phase is Running only when every worker runs. A queued Job is created suspended and Kueue
  alone unsuspends (admits) and suspends (preempts) it: the operator never writes its suspend
  or pod template afterwards (`job_update`); while Kueue holds it the phase is Queued, or
  Preempted when it had been running, and a preemption is no worker failure.

The `Reconciler` reads the objects from the watch cache (`cache.Store`), calls `plan`, and
carries the plan out through `Kube`, feeding every write's answer back into the cache.
Every name is deterministic and every write is an idempotent apply or a uid-preconditioned
delete, so the operator may be killed at any point and simply run again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator import metrics
from finetune_operator.api import API_VERSION, KIND, ConditionType, FinetuneJobSpec, Phase
from finetune_operator.controller.cache import Store
from finetune_operator.controller.kube import Kube, KubeError
from finetune_operator.objects import (
    DesiredObjects,
    JobRef,
    Names,
    build_desired_objects,
    config_hash,
    queue_name,
)
from finetune_operator.resolve import ResolvedConfig, SpecError, parse_spec, resolve
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import (
    Event,
    Reason,
    WorkerJob,
    WorkerPod,
    condition,
    counted_message,
    first_broken,
    get_condition,
    job_view,
    merge_conditions,
    parse_time,
    phase_of,
    pod_view,
    ranks_report,
    refused_message,
    set_condition,
    status_patch,
    timestamp,
    transition_events,
    workers_status,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# Seconds between looks at a job that is waiting for something the watches may not report.
SHORT_REQUEUE = 2.0
# How long the reconciler remembers that it resumed a Job suspended by hand.
RESUMED_MEMORY_SECONDS = 600.0
# A queued Job's pod going away while the Job is not (yet) seen suspended: Kueue's suspend
# (a preemption) may reach the cache after the pod deletions it causes. Such a pod counts as
# lost only once this long has passed since its deletion was asked.
PREEMPTION_SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class Inputs:
    """Everything `plan` looks at."""

    name: str
    generation: int
    status: Mapping[str, Any]
    spec: FinetuneJobSpec | None
    error: SpecError | None
    resolved: ResolvedConfig | None
    template_hash: str | None
    job: WorkerJob | None
    pods: tuple[WorkerPod, ...]
    service_exists: bool
    now: datetime
    requested_workers: int = 0
    # The Kueue LocalQueue (label kueue.x-k8s.io/queue-name) the workers wait in, if any.
    queue: str | None = None
    # How long a replaced group may take to go (pods Terminating on an unreachable node never
    # do): then its Job is let go with its pods orphaned, so that the new group can start.
    replace_grace_seconds: float = 120.0


@dataclass
class Plan:
    status: Obj
    events: list[Event] = field(default_factory=list)
    apply_objects: bool = False  # SA, Role, RoleBinding, ConfigMap, Service
    apply_job: bool = False  # create the worker Job, or sync its suspend / metadata
    delete_job: str | None = None  # uid: replace the group (foreground delete)
    orphan_job: str | None = None  # uid: stop waiting for the old group's pods to go
    cleanup: bool = False  # TTL: delete the worker Job (and pods) and the Service
    requeue_after: float | None = None


def _restart_reason(previous: Mapping[str, Any] | None) -> tuple[Reason, str] | None:
    """The reason and message of a group restart in progress, as the Running condition says."""
    if previous and previous.get("reason") in (
        Reason.RESTARTING.value,
        Reason.SCALING.value,
        Reason.SPEC_CHANGED.value,
    ):
        return Reason(previous["reason"]), str(previous.get("message", ""))
    return None


class Draft:
    """A plan being written: the status and conditions so far, what was there before, and the
    actions decided. Each policy below adds to it; `finish` turns it into the Plan."""

    def __init__(self, i: Inputs) -> None:
        self.i = i
        self.prev: Obj = dict(i.status)
        self.old_conditions: list[Obj] = list(self.prev.get("conditions") or [])
        self.prev_phase = phase_of(self.prev)
        self.prev_running = get_condition(self.old_conditions, ConditionType.RUNNING)
        self.restarts = int(self.prev.get("restarts") or 0)
        self.status: Obj = {"observedGeneration": i.generation, "restarts": self.restarts}
        self.plan = Plan(status=self.status)
        self.conditions: list[Obj] = []
        # A queued Job's pod is going while the Job is not seen suspended yet (see
        # PREEMPTION_SETTLE_SECONDS): look again shortly.
        self.settling = False

    def cond(self, type_: ConditionType, status: bool, reason: Reason, message: str) -> None:
        self.conditions.append(
            condition(type_, status, reason, message, self.i.generation, self.i.now)
        )

    def finish(self) -> Plan:
        merged = merge_conditions(self.old_conditions, self.conditions)
        self.status["conditions"] = merged
        self.plan.events = transition_events(self.old_conditions, merged)
        return self.plan


class ValidDraft(Draft):
    """A Draft for a spec that parsed and resolved."""

    def __init__(self, i: Inputs, spec: FinetuneJobSpec, resolved: ResolvedConfig) -> None:
        super().__init__(i)
        self.spec, self.resolved = spec, resolved
        checkpoint = (self.prev.get("checkpoint") or {}).get("step")
        self.from_where = f"checkpoint step {checkpoint}" if checkpoint else "the last checkpoint"

    def created(self) -> None:
        """Created=True, unless the API server refused a child of this very generation: that
        stays the answer until the spec changes, so status does not flap every pass."""
        rejected = get_condition(self.old_conditions, ConditionType.CREATED)
        if (
            rejected is not None
            and rejected.get("reason") == Reason.OBJECT_REJECTED.value
            and rejected.get("observedGeneration") == self.i.generation
        ):
            self.conditions.append(dict(rejected))
            return
        self.cond(
            ConditionType.CREATED,
            True,
            Reason.OBJECTS_CREATED,
            f"Created the worker Job {Names(self.i.name).workers}, the Service, the ConfigMap "
            "and the trainer's RBAC.",
        )

    def no_failure(self) -> None:
        self.cond(
            ConditionType.FAILED,
            False,
            Reason.NO_FAILURE,
            "No worker has failed."
            if self.restarts == 0
            else (
                f"The group was restarted {self.restarts} time(s) after worker failures "
                f"(backoffLimit {self.spec.backoff_limit}); see status.lastFailure."
            ),
        )

    def restarting(self, message: str) -> None:
        """Phase Restarting, with `message` on the Running condition."""
        self.status["phase"] = Phase.RESTARTING.value
        self.cond(ConditionType.RUNNING, False, Reason.RESTARTING, message)

    def waiting(self, job_exists: bool) -> None:
        """Not every worker runs yet: Pending, or Restarting while a group restart is on."""
        spec, resolved, status = self.spec, self.resolved, self.status
        restart = (
            _restart_reason(self.prev_running) if self.prev_phase is Phase.RESTARTING else None
        )
        if spec.suspend:
            status["phase"] = Phase.SUSPENDED.value
            self.cond(ConditionType.RUNNING, False, Reason.SUSPENDED, "The job is suspended.")
        elif restart is not None:
            status["phase"] = Phase.RESTARTING.value
            self.cond(ConditionType.RUNNING, False, restart[0], restart[1])
        else:
            status["phase"] = Phase.PENDING.value
            ready = status["workers"]["ready"]
            what = (
                f"{ready}/{resolved.workers} workers running: training counts as Running once "
                "every worker runs."
                if job_exists
                else "Creating the worker group."
            )
            stuck = [p for p in self.i.pods if p.unschedulable]
            if stuck:
                what += (
                    f" {len(stuck)} worker pod(s) cannot be scheduled: {stuck[0].unschedulable}"
                    f" Each worker needs a node with {resolved.devices_per_worker} free "
                    f"{resolved.device_resource or 'cpu'} (and the spec's nodeSelector, "
                    "tolerations and affinity): free some, add nodes, or lower workers or "
                    "devicesPerWorker."
                )
            self.cond(ConditionType.RUNNING, False, Reason.WAITING_FOR_WORKERS, what)
        self.plan.requeue_after = SHORT_REQUEUE if not job_exists else None


# -- the policies: one concern each, in the order `plan` consults them ------------------------


def invalid_spec(d: Draft) -> Plan:
    """Valid=False with the reason; nothing is created and a running group is left as it is."""
    i, status = d.i, d.status
    error = i.error or SpecError("the spec could not be read")
    if i.job is None:
        tail = "Nothing was created: fix the spec (kubectl edit) and it is picked up."
    else:
        tail = (
            "The change was not applied: the running group is left as it is. Fix the "
            "spec or undo the edit."
        )
    d.cond(ConditionType.VALID, False, Reason.for_spec_error(error.reason), f"{error} {tail}")
    status["phase"] = (d.prev_phase or Phase.PENDING).value
    desired = (d.prev.get("workers") or {}).get("desired", i.requested_workers)
    status["workers"] = workers_status(desired, i.pods)
    if i.job is None and d.prev_phase in (None, Phase.PENDING):
        d.cond(ConditionType.CREATED, False, Reason.NOT_CREATED, "The spec is not valid.")
    return d.finish()


def spec_valid(d: ValidDraft) -> None:
    """Valid=True with the world size and batch arithmetic; the resolved config and workers."""
    i, resolved = d.i, d.resolved
    accumulation = resolved.gradient_accumulation_steps
    d.cond(
        ConditionType.VALID,
        True,
        Reason.SPEC_VALID,
        f"World size {resolved.world_size} ({resolved.workers} workers x "
        f"{resolved.devices_per_worker} devices), global batch {resolved.global_batch_size}, "
        f"micro-batch {resolved.micro_batch_size}, gradient accumulation "
        f"{accumulation if accumulation is not None else 'auto'}.",
    )
    d.status["resolved"] = resolved.model_dump(mode="json", by_alias=True, exclude_none=True)
    d.status["workers"] = workers_status(resolved.workers, i.pods)
    d.status["worldSize"] = i.job.world_size if i.job and i.job.world_size else resolved.world_size
    # Each worker starts a rank per device it sees: the trainer reports the true world size.
    ranks = ranks_report(i.status, config_hash(resolved))
    if ranks is not None:
        d.status["worldSize"] = ranks.world_size
        if not ranks.refused:
            message = counted_message(
                ranks, resolved.world_size, resolved.global_batch_size, resolved.micro_batch_size
            )
            d.cond(ConditionType.VALID, True, Reason.DEVICES_COUNTED, message)


def world_refused(d: ValidDraft) -> Plan | None:
    """The trainer refused the world size the workers started (it does not divide the global
    batch): Valid=False with its message and an Event; no restart, as a restart would start
    the same ranks again. A changed spec makes the report stale and the group restarts."""
    ranks = ranks_report(d.i.status, config_hash(d.resolved))
    if ranks is None or not ranks.refused:
        return None
    reason = Reason.for_spec_error(ranks.reason or "")
    d.cond(ConditionType.VALID, False, reason, refused_message(ranks))
    d.cond(ConditionType.RUNNING, False, reason, "Nothing trains until the spec is changed.")
    d.status["phase"] = Phase.PENDING.value
    return d.finish()


def retrying(d: ValidDraft) -> bool:
    """Failed is final unless spec.backoffLimit was raised above the restarts made."""
    return d.prev_phase is Phase.FAILED and d.spec.backoff_limit > d.restarts


def finished(d: ValidDraft) -> Plan | None:
    """Succeeded and Failed are final: kept; after ttlSecondsAfterFinished the worker Job and
    the Service are deleted (the FinetuneJob is kept)."""
    if d.prev_phase not in (Phase.SUCCEEDED, Phase.FAILED) or retrying(d):
        return None
    i = d.i
    d.status["phase"] = d.prev_phase.value
    ttl = d.spec.ttl_seconds_after_finished
    if ttl is not None:
        done_at = parse_time(d.prev.get("completionTime")) or i.now
        due = done_at + timedelta(seconds=ttl)
        if i.now >= due:
            if i.job is not None or i.service_exists:
                d.plan.cleanup = True
            d.cond(
                ConditionType.CREATED,
                False,
                Reason.CLEANED_UP,
                f"ttlSecondsAfterFinished ({ttl}s) passed: the worker pods, their Job and "
                "the Service were deleted. The FinetuneJob, its status and the output "
                "volume are kept.",
            )
        else:
            d.plan.requeue_after = (due - i.now).total_seconds()
    return d.finish()


def suspension(d: ValidDraft) -> None:
    """The Suspended condition follows spec.suspend (Resumed once, after a suspension)."""
    previous = get_condition(d.old_conditions, ConditionType.SUSPENDED)
    if d.spec.suspend:
        d.cond(
            ConditionType.SUSPENDED,
            True,
            Reason.SUSPENDED,
            "spec.suspend is true: the worker pods are stopped and the job is kept. Set it to "
            "false to resume from the last checkpoint.",
        )
        if d.i.queue is not None:
            d.cond(
                ConditionType.QUEUED,
                False,
                Reason.SUSPENDED,
                f"Out of Kueue queue {d.i.queue} while spec.suspend is true: the worker Job "
                "and its quota are released; resuming queues it again.",
            )
    elif previous and previous.get("status") == "True":
        d.cond(
            ConditionType.SUSPENDED,
            False,
            Reason.RESUMED,
            "Resumed: the workers start again from the last checkpoint.",
        )
    elif previous is None or previous.get("reason") != Reason.RESUMED.value:
        d.cond(ConditionType.SUSPENDED, False, Reason.NOT_SUSPENDED, "The job is not suspended.")


def backoff_raised(d: ValidDraft) -> Plan | None:
    """A Failed job whose backoffLimit was raised restarts the whole group, once more."""
    if not retrying(d):
        return None
    job, spec = d.i.job, d.spec
    d.restarts += 1
    d.status["restarts"] = d.restarts
    d.status["completionTime"] = None
    d.plan.apply_objects = True
    d.created()
    d.no_failure()
    if job is not None and not job.deleting:
        d.plan.delete_job = job.uid
    d.restarting(
        f"spec.backoffLimit was raised to {spec.backoff_limit}: restarting the whole group "
        f"from {d.from_where} (restart {d.restarts} of backoffLimit {spec.backoff_limit}).",
    )
    return d.finish()


def being_replaced(d: ValidDraft) -> Plan | None:
    """The worker Job is going (a restart, a new world size, or deleted by hand): wait until it
    is gone; past the grace period, let it go with its pods orphaned."""
    i, job = d.i, d.i.job
    if job is None or not job.deleting:
        return None
    since = parse_time(job.deletion_time)
    if since is not None and (i.now - since).total_seconds() > i.replace_grace_seconds:
        d.plan.orphan_job = job.uid
    d.plan.apply_objects = True
    d.created()
    d.no_failure()
    d.waiting(job_exists=False)
    d.plan.requeue_after = SHORT_REQUEUE
    return d.finish()


def training_done(d: ValidDraft) -> bool:
    """Training is over once every index has a Succeeded pod, whatever the Job says yet (its
    controller may be down, or not caught up): a pod lost after that restarts nothing."""
    job = d.i.job
    return job is not None and (
        job.complete
        or (
            job.template_hash == d.i.template_hash
            and set(range(d.resolved.workers))
            <= {p.index for p in d.i.pods if p.phase == "Succeeded"}
        )
    )


def worker_failure(d: ValidDraft) -> Plan | None:
    """A failed worker Job, or a worker pod that failed or went away while it should run: the
    whole group restarts from the last checkpoint, `restarts` + 1, up to backoffLimit; then
    Failed. `lastFailure.jobUid` makes the count exactly-once across operator restarts."""
    i, job, spec = d.i, d.i.job, d.spec
    broken = first_broken(i.pods)
    if broken is not None and job is not None and preemption_settling(i, job, broken):
        d.settling, broken = True, None
    if job is None or training_done(d) or not (job.failed or (broken and not job.suspended)):
        return None
    what = (
        broken.describe()
        if broken
        else (
            f"the worker Job failed ({job.failure_reason or 'Failed'}: "
            f"{job.failure_message or 'no message'})"
        )
    )
    last = dict(d.prev.get("lastFailure") or {})
    d.plan.apply_objects = True
    d.created()
    if last.get("jobUid") == job.uid:
        # Counted already (the operator stopped half way): finish the restart.
        d.plan.delete_job = job.uid
        d.no_failure()
        d.status["phase"] = Phase.RESTARTING.value
        restart = _restart_reason(d.prev_running) or (Reason.RESTARTING, what)
        d.cond(ConditionType.RUNNING, False, restart[0], restart[1])
        return d.finish()
    failure: Obj = {
        "pod": broken.name if broken else None,
        "reason": (broken.reason if broken else job.failure_reason) or "Failed",
        "message": (broken.message if broken else job.failure_message) or what,
        "exitCode": broken.exit_code if broken else None,
        "time": timestamp(i.now),
        "jobUid": job.uid,
    }
    d.status["lastFailure"] = {k: v for k, v in failure.items() if v is not None}
    if d.restarts >= spec.backoff_limit:
        d.status["phase"] = Phase.FAILED.value
        d.status["completionTime"] = timestamp(i.now)
        d.cond(
            ConditionType.FAILED,
            True,
            Reason.BACKOFF_LIMIT_EXCEEDED,
            f"{what}. The group was restarted {d.restarts} time(s) and backoffLimit is "
            f"{spec.backoff_limit}: read the pod's logs (kubectl logs {failure['pod'] or ''})"
            " and the Events, fix the cause, then re-create the FinetuneJob (or raise "
            "spec.backoffLimit).",
        )
        d.cond(ConditionType.RUNNING, False, Reason.WORKER_FAILED, what)
        return d.finish()
    d.restarts += 1
    d.status["restarts"] = d.restarts
    d.plan.delete_job = job.uid
    d.no_failure()
    d.restarting(
        f"{what}: restarting the whole group from {d.from_where} (restart {d.restarts} of "
        f"backoffLimit {spec.backoff_limit}).",
    )
    return d.finish()


def preemption_settling(i: Inputs, job: WorkerJob, pod: WorkerPod) -> bool:
    """A queued Job's pod that was asked to go moments ago, while the Job is not seen
    suspended: possibly Kueue's preemption, whose suspend has not reached us yet."""
    asked = parse_time(pod.deletion_asked)
    return (
        i.queue is not None
        and not job.suspended
        and pod.phase != "Failed"
        and asked is not None
        and (i.now - asked).total_seconds() < PREEMPTION_SETTLE_SECONDS
    )


def training_complete(d: ValidDraft) -> Plan | None:
    """Every worker finished: Succeeded, with where the results are."""
    i, job, resolved = d.i, d.i.job, d.resolved
    if job is None or not training_done(d):
        return None
    d.status["phase"] = Phase.SUCCEEDED.value
    d.status["completionTime"] = job.completion_time or timestamp(i.now)
    d.no_failure()
    d.conditions[:] = [c for c in d.conditions if c["type"] != ConditionType.SUCCEEDED.value]
    final = (d.prev.get("checkpoint") or {}).get("latest")
    d.cond(
        ConditionType.SUCCEEDED,
        True,
        Reason.TRAINING_COMPLETE,
        f"All {resolved.workers} workers finished training"
        + (f"; the latest checkpoint is {final}." if final else ".")
        + f" Results are in {resolved.output_path} on the output volume.",
    )
    d.cond(ConditionType.RUNNING, False, Reason.FINISHED, "Training finished.")
    if d.spec.ttl_seconds_after_finished is not None:
        d.plan.requeue_after = float(d.spec.ttl_seconds_after_finished)
    return d.finish()


def leave_queue(d: ValidDraft) -> Plan | None:
    """The user suspends a queued job: its worker Job is deleted, so its workload leaves the
    queue and frees the quota (Kueue owns the Job's suspend and would undo ours). Resuming
    creates the Job again, into the queue; the trainer resumes from the last checkpoint."""
    job = d.i.job
    if d.i.queue is None or not d.spec.suspend or job is None or job.deleting:
        return None
    d.plan.apply_objects = True
    d.plan.delete_job = job.uid
    d.created()
    d.no_failure()
    d.waiting(job_exists=False)
    d.plan.requeue_after = SHORT_REQUEUE
    return d.finish()


def held_by_kueue(d: ValidDraft) -> Plan | None:
    """A queued Job that Kueue keeps suspended: waiting for quota (Queued), or stopped by a
    preemption after it ran (Preempted; no failure, nothing counted). Kueue unsuspends it on
    admission."""
    i, job, resolved = d.i, d.i.job, d.resolved
    if i.queue is None or job is None or not job.suspended or d.spec.suspend:
        return None
    preempted = d.prev_phase in (Phase.RUNNING, Phase.PREEMPTED)
    need = (
        f"{resolved.workers} workers x {resolved.devices_per_worker} "
        f"{resolved.device_resource or 'cpu'}"
    )
    if preempted:
        reason, phase = Reason.PREEMPTED, Phase.PREEMPTED
        message = (
            f"Preempted: Kueue stopped the group to make room for other work. It waits in queue "
            f"{i.queue} again and resumes from {d.from_where} once re-admitted; this is not "
            "counted against backoffLimit."
        )
    else:
        reason, phase = Reason.QUEUED, Phase.QUEUED
        message = (
            f"Waiting in Kueue queue {i.queue} until its ClusterQueue has quota for the whole "
            f"group ({need}) at once."
        )
    d.status["phase"] = phase.value
    d.cond(ConditionType.QUEUED, True, reason, message)
    d.cond(ConditionType.RUNNING, False, reason, message)
    return d.finish()


def template_changed(d: ValidDraft) -> Plan | None:
    """A changed pod template (world size, image, ...): the group restarts with it (Scaling
    when the world size changed: the ConfigMap carries the recomputed accumulation)."""
    i, job, resolved = d.i, d.i.job, d.resolved
    if job is None or i.template_hash is None or job.template_hash == i.template_hash:
        return None
    d.plan.apply_objects = True
    d.plan.delete_job = job.uid
    d.created()
    d.no_failure()
    if job.world_size is not None and job.world_size != resolved.world_size:
        reason = Reason.SCALING
        message = (
            f"Scaling from world size {job.world_size} to {resolved.world_size} "
            f"({resolved.workers} workers x {resolved.devices_per_worker} devices): gradient "
            f"accumulation is now {resolved.gradient_accumulation_steps}, the global batch "
            f"{resolved.global_batch_size} is unchanged; the group restarts from "
            f"{d.from_where}."
        )
    else:
        reason = Reason.SPEC_CHANGED
        message = (
            f"The workers' pod template changed: the group restarts with it from {d.from_where}."
        )
    d.status["phase"] = (Phase.SUSPENDED if d.spec.suspend else Phase.RESTARTING).value
    d.cond(ConditionType.RUNNING, False, reason, message)
    return d.finish()


def steady(d: ValidDraft) -> Plan:
    """Every object applied (created, drift repaired; suspend follows the spec); Running only
    when every worker runs."""
    i, job, resolved, status = d.i, d.i.job, d.resolved, d.status
    d.plan.apply_objects = True
    # A queued job the user suspended has no Job (leave_queue): none is created until resumed.
    d.plan.apply_job = not (i.queue is not None and d.spec.suspend)
    d.created()
    d.no_failure()
    if job is None or d.spec.suspend:
        d.waiting(job_exists=job is not None)
        return d.finish()
    held = held_by_kueue(d)
    if held is not None:
        return held
    if i.queue is not None:
        d.cond(
            ConditionType.QUEUED,
            False,
            Reason.ADMITTED,
            f"Admitted by Kueue from queue {i.queue}: the whole group may run.",
        )
    ready = status["workers"]["ready"]
    done = sum(1 for p in i.pods if (p.phase == "Succeeded" or p.finished) and not p.deleting)
    # Workers that finished while the others still run (the Job completes with the last one;
    # a container that exited 0 counts before the kubelet writes Succeeded) keep the group
    # Running: nothing is waiting for them.
    finishing = done > 0 and ready + done >= resolved.workers and d.prev_phase is Phase.RUNNING
    if ready >= resolved.workers or finishing:
        status["phase"] = Phase.RUNNING.value
        status["startTime"] = d.prev.get("startTime") or timestamp(i.now)
        d.cond(
            ConditionType.RUNNING,
            True,
            Reason.ALL_WORKERS_RUNNING,
            f"All {resolved.workers} workers are running (world size {status['worldSize']})."
            if not finishing
            else f"{done} of {resolved.workers} workers finished; waiting for the rest.",
        )
        return d.finish()
    d.waiting(job_exists=True)
    return d.finish()


# The policies after the final phases, in order: the first that decides makes the plan.
ACTIVE_POLICIES = (
    world_refused,
    backoff_raised,
    being_replaced,
    worker_failure,
    training_complete,
    leave_queue,
    template_changed,
)


def plan(i: Inputs) -> Plan:
    if i.spec is None or i.resolved is None:
        return invalid_spec(Draft(i))
    d = ValidDraft(i, i.spec, i.resolved)
    spec_valid(d)
    decided = finished(d)
    if decided is not None:
        return decided
    suspension(d)
    d.cond(ConditionType.SUCCEEDED, False, Reason.NOT_FINISHED, "Training has not finished.")
    for policy in ACTIVE_POLICIES:
        decided = policy(d)
        if decided is not None:
            return _settle(d, decided)
    return _settle(d, steady(d))


def _settle(d: Draft, decided: Plan) -> Plan:
    if d.settling and (decided.requeue_after is None or decided.requeue_after > 1.0):
        decided.requeue_after = 1.0
    return decided


def job_update(desired_job: Obj, queue: str | None) -> Obj:
    """What the operator applies to an existing worker Job. For a queued Job: neither
    `spec.suspend` (Kueue admits and preempts through it) nor `spec.template` (Kueue injects
    its flavor's node selectors and tolerations on admission; a template change replaces the
    Job, by its hash, anyway). Server-side apply leaves fields it is not given to their owners."""
    if queue is None:
        return desired_job
    spec = {
        k: v for k, v in (desired_job.get("spec") or {}).items() if k not in ("suspend", "template")
    }
    return {**desired_job, "spec": spec}


# -- the service layer -----------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Reconciler:
    """Reads from `store` (the watch cache, filled by `cache.fill` before the first reconcile
    and kept current by the watches) and writes through `kube`: no GET, no LIST. Every write's
    answer goes back into the store, so the next pass sees its own writes even before their
    watch events arrive. Callers run at most one reconcile of a job at a time (the work queue
    guarantees it).

    Those watch events then change nothing in the store, so they no longer trigger the next
    pass; instead a pass whose writes changed something asks to be run again at once (0 s),
    until a pass changes nothing: the same convergence as when our own events triggered it.
    A write the API server answers unchanged (a no-op apply) asks nothing, so there is no loop.
    """

    kube: Kube
    settings: OperatorSettings
    store: Store
    identity: str = "finetune-operator"
    replace_grace_seconds: float = 120.0
    _pass: threading.local = field(default_factory=threading.local, repr=False)
    # Job uid -> when we resumed it (a suspend made by hand, undone): see _stopped_by_suspend.
    _resumed: dict[str, datetime] = field(default_factory=dict, repr=False)
    _resumed_guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _note_resumed(self, uid: str) -> None:
        now = _now()
        with self._resumed_guard:
            self._resumed[uid] = now
            for old, at in list(self._resumed.items()):
                if (now - at).total_seconds() > RESUMED_MEMORY_SECONDS:
                    del self._resumed[old]

    def reconcile_named(self, namespace: str, name: str) -> float | None:
        """Bring one FinetuneJob's objects and status in line. Returns seconds to look again
        (None: only when something changes)."""
        started = time.monotonic()
        body = self.store.get(API_VERSION, KIND, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        self._pass.changed = False
        try:
            again = self._reconcile(body)
            return 0.0 if self._pass.changed else again
        except KubeError as error:
            if error.namespace_terminating:
                log.info("%s/%s: its namespace is being deleted, nothing to do", namespace, name)
                return None
            metrics.RECONCILE_ERRORS.inc()
            raise
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def _seen(self, answer: Obj | None) -> None:
        """Read-your-writes: the object as the API server answered a write."""
        usable = answer and answer.get("kind") not in (None, "Status") and answer.get("metadata")
        if usable and self.store.observe("MODIFIED", answer or {}):
            self._pass.changed = True

    def _deleted(
        self, api_version: str, kind: str, namespace: str, name: str, answer: Obj | None
    ) -> None:
        """A DELETE's answer: the object marked for deletion (kept until its watch event says
        it is gone), or gone already."""
        if (
            answer
            and answer.get("kind") == kind
            and (answer.get("metadata") or {}).get("deletionTimestamp")
        ):
            self._seen(answer)
        elif answer is not None:
            self._pass.changed |= self.store.forget(
                {
                    "apiVersion": api_version,
                    "kind": kind,
                    "metadata": {"namespace": namespace, "name": name},
                }
            )

    def _reconcile(self, body: Obj) -> float | None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        ref = JobRef(
            name=name, namespace=namespace, uid=metadata["uid"], labels=metadata.get("labels")
        )
        names = Names(name)

        spec: FinetuneJobSpec | None = None
        resolved: ResolvedConfig | None = None
        error: SpecError | None = None
        raw_spec = body.get("spec") or {}
        try:
            spec = parse_spec(raw_spec)
            resolved = resolve(spec, self.settings.device_resources)
        except SpecError as caught:
            error, spec, resolved = caught, None, None

        desired: DesiredObjects | None = None
        if spec is not None and resolved is not None:
            desired = build_desired_objects(ref, spec, resolved, self.settings)

        live_job = self.store.get("batch/v1", "Job", namespace, names.workers)
        if live_job is not None and not _owned_by(live_job, ref.uid):
            live_job = None  # someone else's Job by that name: never touch it
        job = job_view(live_job) if live_job else None
        pods: tuple[WorkerPod, ...] = ()
        if job is not None:
            resumed = max(
                (t for t in (self._resumed.get(job.uid), parse_time(job.resumed_at)) if t),
                default=None,
            )
            pods = tuple(
                pod_view(p)
                for p in sorted(self.store.pods_of(namespace, name), key=_name)
                if _owned_by(p, job.uid) and not _stopped_by_suspend(p, resumed)
            )
        service = self.store.get("v1", "Service", namespace, names.service)

        current_status: Obj = dict(body.get("status") or {})
        decided = plan(
            Inputs(
                name=name,
                generation=int(metadata.get("generation") or 0),
                status=current_status,
                spec=spec,
                error=error,
                resolved=resolved,
                template_hash=desired.template_hash if desired else None,
                job=job,
                pods=pods,
                service_exists=service is not None,
                now=_now(),
                replace_grace_seconds=self.replace_grace_seconds,
                queue=queue_name(ref),
                requested_workers=int(raw_spec.get("workers") or 1)
                if isinstance(raw_spec.get("workers"), int)
                else 1,
            )
        )
        self._act(body, decided, desired, live_job, queue_name(ref))
        return decided.requeue_after

    def _act(
        self,
        body: Obj,
        decided: Plan,
        desired: DesiredObjects | None,
        live_job: Obj | None,
        queue: str | None = None,
    ) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        # Status first: a restart is counted (with the failed Job's uid) before the Job goes,
        # so a kill between the two neither loses nor double-counts it.
        patch = status_patch(body.get("status") or {}, decided.status)
        if patch:
            self._seen(self.kube.patch_status(namespace, name, patch))
            log.info("%s/%s status: %s", namespace, name, sorted(patch))
        for event in decided.events:
            self.kube.event(body, event.type, event.reason, event.message, self.identity)
        try:
            self._apply(namespace, name, decided, desired, live_job, queue)
        except KubeError as error:
            if error.status not in (400, 422):
                raise
            self._report_rejected(body, error)

    def _report_rejected(self, body: Obj, error: KubeError) -> None:
        """A child the API server refuses (a passed-through field only it checks, such as a
        priorityClassName that is not a DNS name) is the spec's fault: say so in the Created
        condition and an Event, instead of retrying silently."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        generation = int(metadata.get("generation") or 0)
        # The conditions as this pass just wrote them (the store holds its own writes), not
        # as the pass found them: the merge patch replaces the whole list.
        latest = self.store.get(API_VERSION, KIND, namespace, name) or body
        old = list((latest.get("status") or {}).get("conditions") or [])
        message = (
            f"The API server rejected an object this spec needs: {error}. Fix the spec field it "
            "names (kubectl edit ftj); nothing else was changed."
        )
        new = condition(
            ConditionType.CREATED,
            False,
            Reason.OBJECT_REJECTED,
            message,
            generation,
            datetime.now(timezone.utc),
        )
        current = get_condition(old, ConditionType.CREATED)
        if current is not None and all(
            current.get(k) == new[k] for k in ("status", "reason", "message")
        ):
            return
        self._seen(self.kube.patch_status(namespace, name, {"conditions": set_condition(old, new)}))
        self.kube.event(body, "Warning", Reason.OBJECT_REJECTED.value, message, self.identity)
        log.warning("%s/%s %s", namespace, name, message)

    def _delete_job(self, namespace: str, name: str, uid: str, propagation: str) -> None:
        """DELETE the worker Job with this uid (a newer one by that name is left alone)."""
        answer = self.kube.delete(
            "batch/v1", "Job", namespace, name, uid=uid, propagation=propagation
        )
        self._deleted("batch/v1", "Job", namespace, name, answer)

    def _apply(
        self,
        namespace: str,
        name: str,
        decided: Plan,
        desired: DesiredObjects | None,
        live_job: Obj | None,
        queue: str | None = None,
    ) -> None:
        names = Names(name)
        if decided.apply_objects and desired is not None:
            for obj in desired.children:
                live = self.store.get(
                    obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"]
                )
                answer = self.kube.apply(obj, live, check_live=False)
                if answer is not None:
                    self._seen(answer)
                    log.info(
                        "%s/%s applied %s %s", namespace, name, obj["kind"], obj["metadata"]["name"]
                    )
        if decided.delete_job:
            # Foreground: the Job goes only after its pods, so the next group never meets
            # the old one at the rendezvous.
            self._delete_job(namespace, names.workers, decided.delete_job, "Foreground")
            failure = decided.status.get("lastFailure") or {}
            log.info(
                "%s/%s replacing the worker group (Job uid %s): %s",
                namespace,
                name,
                decided.delete_job,
                failure.get("message") or "spec changed",
            )
        elif decided.orphan_job:
            # Same DELETE, orphan propagation: the Job goes now, its stuck pods stay behind
            # (owned by nothing, not counted: the pods the operator reads are the new Job's).
            self._delete_job(namespace, names.workers, decided.orphan_job, "Orphan")
            log.warning(
                "%s/%s the old worker group did not go within %ss: its Job is let go, its pods "
                "orphaned",
                namespace,
                name,
                self.replace_grace_seconds,
            )
        elif decided.apply_job and desired is not None:
            job = desired.job
            if live_job is None:
                try:
                    self._seen(self.kube.create(job))
                    log.info("%s/%s created Job %s", namespace, name, names.workers)
                except KubeError as error:
                    if error.status != 409:
                        raise
            else:
                answer = self.kube.apply(job_update(job, queue), live_job, check_live=False)
                if answer is not None:
                    self._seen(answer)
                    log.info("%s/%s applied Job %s", namespace, name, names.workers)
                    if (
                        queue is None
                        and (live_job.get("spec") or {}).get("suspend")
                        and not job["spec"].get("suspend")
                    ):
                        self._note_resumed(live_job["metadata"]["uid"])
        if decided.cleanup:
            answer = self.kube.delete(
                "batch/v1", "Job", namespace, names.workers, propagation="Background"
            )
            self._deleted("batch/v1", "Job", namespace, names.workers, answer)
            answer = self.kube.delete("v1", "Service", namespace, names.service)
            self._deleted("v1", "Service", namespace, names.service, answer)
            log.info("%s/%s TTL passed: deleted the worker Job and Service", namespace, name)


def _stopped_by_suspend(pod: Mapping[str, Any], resumed: datetime | None) -> bool:
    """A pod whose deletion was asked before we resumed its suspended Job: the Job controller
    stopped it for the suspend (its Job status may not say Suspended yet). It is going away
    and is no worker failure."""
    metadata = pod.get("metadata") or {}
    deleting = parse_time(metadata.get("deletionTimestamp"))
    if resumed is None or deleting is None:
        return False
    asked = deleting - timedelta(seconds=int(metadata.get("deletionGracePeriodSeconds") or 0))
    return asked <= resumed + timedelta(seconds=1)  # timestamps have whole seconds


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(
        ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )
