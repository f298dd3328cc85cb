"""`finetune-operator run`: the kopf operator. Thin: kopf is the watch layer, nothing more.

- Watches: FinetuneJobs, and the objects labelled `finetune.dev/job-name` (worker Jobs, pods,
  and the children: ServiceAccount, Role, RoleBinding, ConfigMap, Service), with that label as
  a server-side selector. A handler only puts the event into the cache (`cache.Store`) and,
  when that changed anything, adds the FinetuneJob's key to the work queue (`workqueue`):
  handlers are cheap, so kopf's per-object queues never back up.
- `--worker-limit` threads take keys off the queue and run `reconcile.Reconciler`, which reads
  the cache and only writes (level-based: observe, decide, act). A key is reconciled by one
  worker at a time; events while it waits or runs collapse into one more pass.
- Before the first reconcile the cache is filled by one LIST per kind and namespace (a
  half-filled cache would show a running group's pods as gone). Every job is then reconciled
  once (a pending TTL is rescheduled after a restart).
- A resync thread re-queues every job not in a final phase every `--resync-seconds` (from the
  cache: no request), the jobs whose requeue-after is due (the queue's own timer), and
  re-LISTs into the cache after kopf re-listed a kind (a watch that reconnected may have
  missed deletions) and every `--relist-seconds` as a safety net.

No kopf timers or daemons: they would put a finalizer on every FinetuneJob, and deleting one
would then hang while the operator is down. kopf keeps its own bookkeeping (if any) in
`finetune.dev/*` annotations, never in status; handlers return nothing. Several replicas: a
Lease (`controller/leader.py`) lets exactly one run kopf.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from finetune_operator import metrics
from finetune_operator.api import API_VERSION, GROUP, KIND, Phase
from finetune_operator.controller.cache import WATCHED, Store, fill, job_key
from finetune_operator.controller.kube import Kube
from finetune_operator.controller.leader import LeaderElector
from finetune_operator.controller.workqueue import WorkQueue
from finetune_operator.objects import JOB_NAME_LABEL
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import RunConfig, parse_args

log = logging.getLogger("finetune_operator")

FINAL_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)


# -- the running operator's state: set once by run(), used by the handlers and threads --------

JobKey = tuple[str, str]

# After kopf re-lists a kind (start-up, or a watch that had to reconnect), re-LIST into the
# cache this many seconds after the last listed object, so that deletions are not missed.
RELIST_AFTER_KOPF_LIST = 5.0


@dataclass
class _State:
    config: RunConfig
    kube: Kube
    store: Store
    queue: WorkQueue[JobKey]
    reconciler: Reconciler
    ready: threading.Event = field(default_factory=threading.Event)  # the cache is filled
    stop: threading.Event = field(default_factory=threading.Event)
    kopf_listed_at: float | None = None  # monotonic time of kopf's last re-listed object


STATE: _State | None = None


def _state() -> _State:
    if STATE is None:
        raise RuntimeError("the operator is not running")
    return STATE


def _namespaces(config: RunConfig) -> list[str | None]:
    return [None] if config.clusterwide else list(config.settings.namespaces)


def observed(event_type: str | None, body: Mapping[str, Any]) -> None:
    """One watch event: into the cache; the FinetuneJob it belongs to into the queue when the
    cache changed (a re-listed object that is already known changes nothing)."""
    state = _state()
    if state.store.observe(event_type, body):
        key = job_key(body)
        if key is not None:
            state.queue.add(key)
    if event_type is None and state.ready.is_set():
        state.kopf_listed_at = time.monotonic()


def fill_cache(state: _State) -> None:
    """LIST everything into the cache; queue the jobs whose objects changed."""
    for key in fill(state.store, state.kube, _namespaces(state.config)):
        state.queue.add(key)


def _work(state: _State) -> None:
    """A reconcile worker: one key at a time, off the queue."""
    while True:
        key = state.queue.get()
        if key is None:
            return
        try:
            again = state.reconciler.reconcile_named(*key)
        except Exception:
            log.exception("reconcile of %s/%s failed; retrying in 5s", *key)
            again = 5.0
        finally:
            state.queue.done(key)
        if again is not None:
            state.queue.add_after(key, again)


def _unfinished(state: _State) -> list[JobKey]:
    keys = []
    for body in state.store.objects(API_VERSION, KIND):
        if (body.get("status") or {}).get("phase") not in FINAL_PHASES:
            metadata = body["metadata"]
            keys.append((metadata["namespace"], metadata["name"]))
    return keys


def _resync_loop(state: _State) -> None:
    """Level-based safety nets: unfinished jobs every resync period, from the cache; the cache
    re-LISTed after kopf re-listed, and every relist period."""
    config = state.config
    next_resync = time.monotonic() + config.resync_seconds
    next_relist = time.monotonic() + config.relist_seconds if config.relist_seconds > 0 else None
    while not state.stop.wait(1.0):
        now = time.monotonic()
        listed = state.kopf_listed_at
        due = listed is not None and now - listed >= RELIST_AFTER_KOPF_LIST
        if due or (next_relist is not None and now >= next_relist):
            state.kopf_listed_at = None
            try:
                fill_cache(state)
                log.debug("re-listed into the cache: %d objects", len(state.store))
            except Exception as error:
                log.warning("re-list failed: %s", error)
            if next_relist is not None:
                next_relist = now + config.relist_seconds
        if now >= next_resync:
            for key in _unfinished(state):
                state.queue.add(key)
            metrics.record_phases(state.store.objects(API_VERSION, KIND))
            metrics.QUEUE_DEPTH.set(len(state.queue))
            next_resync = now + config.resync_seconds


def start(state: _State) -> list[threading.Thread]:
    """Fill the cache (retrying until the API answers), queue every job once, then start the
    workers and the resync thread."""
    delay = 1.0
    while True:
        try:
            fill_cache(state)
            break
        except Exception as error:
            log.warning("filling the cache failed, retrying in %.0fs: %s", delay, error)
            if state.stop.wait(delay):
                return []
            delay = min(delay * 2, 30.0)
    for body in state.store.objects(API_VERSION, KIND):
        state.queue.add((body["metadata"]["namespace"], body["metadata"]["name"]))
    state.ready.set()
    log.info(
        "cache filled: %d objects, %d FinetuneJobs",
        len(state.store),
        len(state.store.objects(API_VERSION, KIND)),
    )
    threads = [
        threading.Thread(target=_work, args=(state,), name=f"reconcile-{i}", daemon=True)
        for i in range(state.config.worker_limit)
    ]
    threads.append(threading.Thread(target=_resync_loop, args=(state,), name="resync", daemon=True))
    for thread in threads:
        thread.start()
    return threads


# -- kopf handlers ----------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own bookkeeping goes to annotations (never status); with only event handlers it
    # writes none, but this keeps it out of status if a handler kind that needs it is added.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.peering.standalone = True  # one replica acts: controller/leader.py decides
    # No cluster-wide scans of CRDs and namespaces: the watched namespaces are named (or all)
    # and the CRD is installed before the operator, so the RBAC stays namespaced.
    settings.scanning.disabled = True
    settings.posting.enabled = False  # users see our Events, not kopf's log lines
    # The children are watched through the label, server-side: kopf never sees (nor keeps
    # memory for) anyone else's pods or ConfigMaps.
    for watched in WATCHED:
        if watched.selector:
            settings.watching.label_selectors[watched.group, watched.version, watched.plural] = (
                watched.selector
            )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


async def watch_event(event: Mapping[str, Any], **_: Any) -> None:
    """Every watched kind: into the cache, the job into the queue. Never blocks."""
    observed(event.get("type"), event["object"])


for _watched in WATCHED:
    kopf.on.event(
        _watched.group,
        _watched.version,
        _watched.plural,
        id=f"watch-{_watched.plural}",
        labels={JOB_NAME_LABEL: kopf.PRESENT} if _watched.labelled else None,
    )(watch_event)


# -- entry point ------------------------------------------------------------------------------


def _configure_logging(config: RunConfig) -> None:
    kopf.configure(
        verbose=config.log_level == "DEBUG",
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger().setLevel(config.log_level)
    # kopf's per-event chatter at INFO is noise here: our reconciler logs what it does.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().level))


def run(argv: Sequence[str]) -> int:
    global STATE
    config = parse_args(argv)
    _configure_logging(config)
    kube = Kube.from_environment(qps=config.qps)
    store = Store()
    STATE = _State(
        config=config,
        kube=kube,
        store=store,
        queue=WorkQueue(),
        reconciler=Reconciler(
            kube=kube,
            settings=config.settings,
            store=store,
            identity=config.identity,
            replace_grace_seconds=config.replace_grace_seconds,
        ),
    )
    metrics.serve(config.metrics_port)
    elector: LeaderElector | None = None
    if config.leader_elect:
        elector = LeaderElector(
            kube=kube,
            namespace=config.lease_namespace,
            identity=config.identity,
            duration=config.lease_duration,
        )
        elector.acquire()
        elector.keep()
    log.info(
        "finetune-operator %s watching %s",
        config.identity,
        "all namespaces" if config.clusterwide else ", ".join(config.settings.namespaces),
    )
    start(STATE)
    try:
        kopf.run(
            standalone=True,
            clusterwide=config.clusterwide,
            namespaces=list(config.settings.namespaces),
        )
    finally:
        STATE.stop.set()
        STATE.queue.shutdown()
        if elector is not None:
            elector.release()
    return 0
