"""A work queue of FinetuneJob keys for the reconcile workers (client-go's workqueue, in small).

Why: a reconcile run inline in kopf's handler would back up kopf's per-object event queues
(and hold their memory) behind slow reconciles. So a handler only updates the cache and adds
the job's key here; `--worker-limit` threads take keys off the queue.

- a key waits at most once (the dirty set): any number of events while it waits cost one
  reconcile;
- a key is never handed to two workers at once: a key added while it is being reconciled is
  marked dirty and queued again when that worker calls `done`, so the change is not lost;
- `add_after(key, seconds)` queues it later (a plan's requeue-after, the retry after an
  error); a key scheduled twice keeps the earlier time.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}  # key -> earliest monotonic time it is to be added
        self._heap: list[tuple[float, int, K]] = []
        self._counter = 0  # heap tie-breaker: keys need not be ordered
        self._shutdown = False

    def add(self, key: K) -> None:
        with self._cond:
            self._add(key)

    def add_after(self, key: K, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        when = time.monotonic() + seconds
        with self._cond:
            if self._shutdown or self._due.get(key, float("inf")) <= when:
                return
            self._due[key] = when
            self._counter += 1
            heapq.heappush(self._heap, (when, self._counter, key))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> K | None:
        """The next key to reconcile (the caller then owns it until `done`); None after
        `shutdown`, or when `timeout` passed with nothing to do."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                now = time.monotonic()
                self._promote(now)
                if self._queue:
                    key = self._queue.popleft()
                    self._processing.add(key)
                    self._dirty.discard(key)
                    return key
                wait = self._heap[0][0] - now if self._heap else None
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        """The worker finished `key`; if it was added meanwhile, it is queued again."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys waiting (not counting those scheduled for later or being processed)."""
        with self._cond:
            return len(self._queue)

    def scheduled(self) -> int:
        with self._cond:
            return len(self._due)

    # -- under the lock --------------------------------------------------------------------
    def _add(self, key: K) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # `done` queues it again
        self._queue.append(key)
        self._cond.notify()

    def _promote(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            when, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == when:
                del self._due[key]
                self._add(key)
