"""Leader election on a coordination.k8s.io Lease, so that several replicas are safe.

Only the holder of the Lease runs kopf (in standalone mode: no KopfPeering CRD needed). The
holder renews the Lease every `duration / 3` seconds; a replica that cannot renew for
`duration` seconds exits at once (its pod restarts and queues for the Lease again), so two
operators never act at the same time for longer than the clock skew. A stopped operator hands
the Lease back; a killed one's Lease expires after `duration` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator.controller.kube import Kube, KubeError
from finetune_operator.settings import default_identity

log = logging.getLogger(__name__)

LEASE_NAME = "finetune-operator"


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def lease_is_free(spec: Mapping[str, Any], identity: str, now: datetime) -> bool:
    """The Lease may be taken: nobody holds it, we do, or the holder stopped renewing."""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 15)
    return renewed is None or renewed + timedelta(seconds=duration) < now


@dataclass
class LeaderElector:
    kube: Kube
    namespace: str
    identity: str = field(default_factory=default_identity)
    name: str = LEASE_NAME
    duration: int = 15
    on_lost: Callable[[], None] = lambda: os._exit(1)
    _stop: threading.Event = field(default_factory=threading.Event)

    def try_acquire(self) -> bool:
        now = datetime.now(timezone.utc)
        lease = self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro_time(now),
        }
        try:
            if lease is None:
                self.kube.create(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": _micro_time(now), "leaseTransitions": 0},
                    }
                )
                return True
            current = lease.get("spec") or {}
            if not lease_is_free(current, now=now, identity=self.identity):
                return False
            if current.get("holderIdentity") != self.identity:
                spec["acquireTime"] = _micro_time(now)
                spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
            # PUT with the resourceVersion read: a competing replica's write wins, ours fails.
            self.kube.replace({**lease, "spec": {**current, **spec}})
            return True
        except KubeError as error:
            if error.status == 409:
                return False
            raise

    def acquire(self) -> None:
        """Block until this replica holds the Lease."""
        announced = False
        while not self._stop.is_set():
            try:
                if self.try_acquire():
                    log.info(
                        "leader: %s holds lease %s/%s", self.identity, self.namespace, self.name
                    )
                    return
            except Exception as error:  # the API server may be restarting
                log.warning("leader election: %s", error)
            if not announced:
                log.info("leader: waiting for lease %s/%s", self.namespace, self.name)
                announced = True
            self._stop.wait(max(1.0, self.duration / 5))

    def keep(self) -> threading.Thread:
        """Renew in the background; call `on_lost` when the Lease could not be renewed."""

        def renew() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.duration / 3):
                try:
                    if self.try_acquire():
                        last = time.monotonic()
                        continue
                    log.error("leader: lease %s taken by another replica", self.name)
                except Exception as error:
                    log.warning("leader: renewing failed: %s", error)
                    if time.monotonic() - last < self.duration:
                        continue
                if not self._stop.is_set():
                    log.error("leader: lost lease %s: exiting", self.name)
                    self.on_lost()
                    return

        thread = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Hand the Lease back so that a successor need not wait for it to expire."""
        self._stop.set()
        try:
            lease = self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = {**lease["spec"], "holderIdentity": None}
                self.kube.replace({**lease, "spec": spec})
        except Exception as error:
            log.warning("leader: could not release the lease: %s", error)
