"""Prometheus metrics of the operator (served by `finetune-operator run --metrics-port`).

- `finetune_jobs{phase}`: FinetuneJobs per phase, counted from the cache at every resync;
- `finetune_workqueue_depth`: FinetuneJobs waiting for a reconcile worker, at every resync;
- `finetune_reconcile_seconds`: how long one reconcile of one FinetuneJob takes;
- `finetune_reconcile_errors_total`: reconciles that raised (they are retried).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram, start_http_server

from finetune_operator.api import Phase

JOBS = Gauge("finetune_jobs", "FinetuneJobs by phase.", ["phase"])
QUEUE_DEPTH = Gauge("finetune_workqueue_depth", "FinetuneJobs waiting for a reconcile worker.")
RECONCILE_SECONDS = Histogram(
    "finetune_reconcile_seconds",
    "Duration of one reconcile of one FinetuneJob.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = PromCounter(
    "finetune_reconcile_errors", "Reconciles that failed with an error (retried)."
)


def count_phases(bodies: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Jobs per phase, every phase present (0 when none); no phase yet counts as Pending."""
    counts: Counter[str] = Counter(
        ((body.get("status") or {}).get("phase") or Phase.PENDING.value) for body in bodies
    )
    return {phase.value: counts.get(phase.value, 0) for phase in Phase}


def record_phases(bodies: Iterable[Mapping[str, Any]]) -> None:
    for phase, count in count_phases(bodies).items():
        JOBS.labels(phase=phase).set(count)


def serve(port: int) -> None:
    """Serve /metrics on `port` (0: off)."""
    if port:
        start_http_server(port)
