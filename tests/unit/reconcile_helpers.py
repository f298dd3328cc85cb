"""Values for the reconcile decision tests: a spec, the observed worker Job and pods, and the
`Inputs` that `plan` and its policies read."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from finetune_operator.reconcile import Inputs, Plan
from finetune_operator.resolve import SpecError, parse_spec, resolve
from finetune_operator.status import WorkerJob, WorkerPod

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
HASH = "h-current"


def spec(**fields: Any) -> dict[str, Any]:
    return {
        "model": {"name": "m"},
        "dataset": {"name": "d"},
        "workers": 2,
        "devicesPerWorker": 1,
        **fields,
    }


def job(
    uid: str = "job-1",
    world: int = 2,
    template: str = HASH,
    *,
    suspended: bool = False,
    complete: bool = False,
    failed: bool = False,
    deleting: bool = False,
) -> WorkerJob:
    return WorkerJob(
        uid=uid,
        world_size=world,
        config_hash="c",
        template_hash=template,
        suspended=suspended,
        complete=complete,
        failed=failed,
        deleting=deleting,
        completion_time="2026-01-01T11:59:00Z" if complete else None,
    )


def pod(index: int, phase: str = "Running", ready: bool = True, **extra: Any) -> WorkerPod:
    return WorkerPod(
        name=f"j-worker-{index}-x", index=index, phase=phase, ready=ready, deleting=False, **extra
    )


def inputs(
    raw: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    worker_job: WorkerJob | None = None,
    pods: tuple[WorkerPod, ...] = (),
    *,
    service: bool = True,
    now: datetime = NOW,
    generation: int = 1,
) -> Inputs:
    raw = raw if raw is not None else spec()
    try:
        parsed = parse_spec(raw)
        resolved = resolve(parsed)
        error = None
    except SpecError as caught:
        parsed, resolved, error = None, None, caught
    return Inputs(
        name="j",
        generation=generation,
        status=status or {},
        spec=parsed,
        error=error,
        resolved=resolved,
        template_hash=HASH if resolved else None,
        job=worker_job,
        pods=pods,
        service_exists=service,
        now=now,
        requested_workers=int(raw.get("workers", 1)),
    )


def cond(result: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in result.status["conditions"] if c["type"] == type_)


def reasons(result: Plan) -> list[str]:
    return [e.reason for e in result.events]
