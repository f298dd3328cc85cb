"""`finetune-operator run`: the kopf operator. Thin: handlers parse nothing and decide nothing,
they hand the FinetuneJob to `reconcile.Reconciler`.

Level-based: every FinetuneJob event, and every event of a worker Job or pod (labelled
`finetune.dev/job-name`, mapped back to its FinetuneJob), triggers a reconcile of that one
FinetuneJob; a resync thread reconciles every FinetuneJob every `--resync-seconds` and when a
reconcile asked to be looked at again (TTL due, restart in progress). Reconciles of one job are
serialized and coalesced. No kopf timers or daemons: they would put a finalizer on every
FinetuneJob, and deleting one would then hang while the operator is down.

kopf keeps its own bookkeeping (if any) in `finetune.dev/*` annotations, never in status;
handlers return nothing. Several replicas: a Lease (`leader.py`) lets exactly one run kopf.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import kopf

from finetune_operator import metrics
from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.kube import Kube
from finetune_operator.leader import LeaderElector, default_identity
from finetune_operator.objects import JOB_NAME_LABEL
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import OperatorSettings

log = logging.getLogger("finetune_operator")


@dataclass
class RunConfig:
    settings: OperatorSettings
    clusterwide: bool
    worker_limit: int = 8
    qps: float = 20.0
    resync_seconds: float = 30.0
    metrics_port: int = 8080
    log_format: str = "text"
    log_level: str = "INFO"
    leader_elect: bool = True
    lease_namespace: str = "default"
    lease_duration: int = 15
    replace_grace_seconds: float = 120.0
    identity: str = field(default_factory=default_identity)


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: Sequence[str]) -> RunConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="finetune-operator run",
        description="Run the FinetuneJob operator. Every flag has an FTO_* environment twin.",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="namespace to watch (repeat, or comma-separated; env FTO_NAMESPACES). "
        "Default: all namespaces.",
    )
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--trainer-image", default=env("FTO_TRAINER_IMAGE"), help="default trainer image"
    )
    parser.add_argument(
        "--xpu-resource",
        default=env("FTO_XPU_RESOURCE"),
        help="default device resource for device xpu (e.g. gpu.intel.com/xe)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=env("FTO_LOG_FORMAT", "text"),
        help="log lines as text or JSON (env FTO_LOG_FORMAT)",
    )
    parser.add_argument("--log-level", default=env("FTO_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("FTO_METRICS_PORT", "8080")),
        help="Prometheus /metrics port; 0 turns it off (env FTO_METRICS_PORT)",
    )
    parser.add_argument(
        "--worker-limit",
        type=int,
        default=int(env("FTO_WORKER_LIMIT", "8")),
        help="objects handled at once (kopf batching worker limit and thread pool)",
    )
    parser.add_argument(
        "--qps",
        type=float,
        default=float(env("FTO_API_QPS", "20")),
        help="most API requests a second the reconciler sends (env FTO_API_QPS)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(env("FTO_RESYNC_SECONDS", "30")),
        help="reconcile every FinetuneJob at least this often",
    )
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("FTO_LEADER_ELECT", True),
        help="hold a Lease so that only one replica acts (env FTO_LEADER_ELECT)",
    )
    parser.add_argument(
        "--leader-election-namespace",
        default=env("FTO_LEADER_ELECTION_NAMESPACE") or env("POD_NAMESPACE"),
        help="namespace of the Lease (default: the pod's, else the first watched, else default)",
    )
    parser.add_argument("--lease-duration", type=int, default=int(env("FTO_LEASE_DURATION", "15")))
    parser.add_argument(
        "--replace-grace-seconds",
        type=float,
        default=float(env("FTO_REPLACE_GRACE_SECONDS", "120")),
        help="how long a replaced worker group may take to go before its Job is let go and "
        "its pods orphaned (pods stuck Terminating on an unreachable node)",
    )
    parser.add_argument("--identity", default=None, help="replica identity (default: pod name)")
    args = parser.parse_args(list(argv))

    base = OperatorSettings.from_env()
    namespaces = list(base.namespaces)
    for item in args.namespace or []:
        namespaces += [n.strip() for n in item.split(",") if n.strip()]
    clusterwide = args.all_namespaces or not namespaces
    overrides: dict[str, Any] = {"namespaces": () if clusterwide else tuple(namespaces)}
    if args.trainer_image:
        overrides["trainer_image"] = args.trainer_image
    if args.xpu_resource:
        overrides["device_resources"] = {**base.device_resources, "xpu": args.xpu_resource}
    settings = replace(base, **overrides)
    lease_namespace = args.leader_election_namespace or (
        settings.namespaces[0] if settings.namespaces else "default"
    )
    return RunConfig(
        settings=settings,
        clusterwide=clusterwide,
        worker_limit=max(1, args.worker_limit),
        qps=args.qps,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        log_format=args.log_format,
        log_level=args.log_level.upper(),
        leader_elect=args.leader_elect,
        lease_namespace=lease_namespace,
        lease_duration=args.lease_duration,
        replace_grace_seconds=args.replace_grace_seconds,
        identity=args.identity or default_identity(),
    )


# -- the running operator's state: set once by run(), read by the handlers ----------------------


@dataclass
class _State:
    config: RunConfig
    kube: Kube
    reconciler: Reconciler
    due: dict[tuple[str, str], float] = field(default_factory=dict)
    dirty: set[tuple[str, str]] = field(default_factory=set)
    guard: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


STATE: _State | None = None


def _state() -> _State:
    if STATE is None:
        raise RuntimeError("the operator is not running")
    return STATE


def trigger(namespace: str, name: str) -> None:
    """Reconcile one FinetuneJob now; concurrent triggers for it collapse into one rerun."""
    state = _state()
    key = (namespace, name)
    with state.guard:
        state.dirty.add(key)
    lock = state.reconciler.lock(namespace, name)
    while True:
        if not lock.acquire(blocking=False):
            return  # the holder reruns: the key is dirty
        try:
            with state.guard:
                if key not in state.dirty:
                    return
                state.dirty.discard(key)
            _reconcile_locked(state, namespace, name)
        finally:
            lock.release()
        with state.guard:
            if key not in state.dirty:
                return


def _reconcile_locked(state: _State, namespace: str, name: str) -> None:
    key = (namespace, name)
    try:
        again = state.reconciler.reconcile_named(namespace, name, locked=True)
    except Exception:
        log.exception("reconcile of %s/%s failed; retrying in 5s", namespace, name)
        again = 5.0
    with state.guard:
        if again is None:
            state.due.pop(key, None)
        else:
            state.due[key] = time.monotonic() + again


def _watched_jobs(state: _State) -> list[dict[str, Any]]:
    if state.config.clusterwide:
        return state.kube.list(API_VERSION, KIND, None)
    bodies: list[dict[str, Any]] = []
    for namespace in state.config.settings.namespaces:
        bodies += state.kube.list(API_VERSION, KIND, namespace)
    return bodies


def _resync_loop(state: _State) -> None:
    """Level-based safety net: everything every resync period, and what asked for a requeue."""
    next_full = 0.0
    while not state.stop.wait(1.0):
        now = time.monotonic()
        keys: set[tuple[str, str]] = set()
        if now >= next_full:
            try:
                bodies = _watched_jobs(state)
                metrics.record_phases(bodies)
                keys |= {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in bodies}
            except Exception as error:
                log.warning("resync list failed: %s", error)
            next_full = now + state.config.resync_seconds
        with state.guard:
            keys |= {key for key, due in state.due.items() if due <= now}
        for namespace, name in sorted(keys):
            trigger(namespace, name)


# -- kopf handlers ----------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    config = _state().config
    # kopf's own bookkeeping goes to annotations (never status); with only event handlers it
    # writes none, but this keeps it out of status if a handler kind that needs it is added.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.peering.standalone = True  # one replica acts: the Lease (leader.py) decides
    # No cluster-wide scans of CRDs and namespaces: the watched namespaces are named (or all)
    # and the CRD is installed before the operator, so the RBAC stays namespaced.
    settings.scanning.disabled = True
    settings.posting.enabled = False  # users see our Events, not kopf's log lines
    settings.batching.worker_limit = config.worker_limit
    settings.execution.max_workers = config.worker_limit
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
    if type == "DELETED" or namespace is None:
        return  # owner references take the children with it
    trigger(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={JOB_NAME_LABEL: kopf.PRESENT})
def worker_job_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    if namespace is not None:
        trigger(namespace, labels[JOB_NAME_LABEL])


@kopf.on.event("", "v1", "pods", labels={JOB_NAME_LABEL: kopf.PRESENT})
def worker_pod_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    if namespace is not None:
        trigger(namespace, labels[JOB_NAME_LABEL])


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
    STATE = _State(
        config=config,
        kube=kube,
        reconciler=Reconciler(
            kube=kube,
            settings=config.settings,
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
    resync = threading.Thread(target=_resync_loop, args=(STATE,), name="resync", daemon=True)
    resync.start()
    try:
        kopf.run(
            standalone=True,
            clusterwide=config.clusterwide,
            namespaces=list(config.settings.namespaces),
        )
    finally:
        STATE.stop.set()
        if elector is not None:
            elector.release()
    return 0
