"""The reconcile work queue: dedupe while waiting, one worker per key, a rerun when a key is
added while it is being processed, delayed adds."""

from __future__ import annotations

import threading
import time
from collections import Counter

from finetune_operator.controller.workqueue import WorkQueue


def test_a_waiting_key_is_queued_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ["a", "b", "a", "a", "b", "c"]:
        queue.add(key)
    assert len(queue) == 3
    assert [queue.get(timeout=0), queue.get(timeout=0), queue.get(timeout=0)] == ["a", "b", "c"]
    assert queue.get(timeout=0) is None


def test_a_key_in_process_is_not_handed_out_again_but_rerun_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert queue.get(timeout=0) == "a"
    queue.add("a")  # dirtied while a worker has it
    queue.add("a")
    assert queue.get(timeout=0) is None  # not to a second worker
    queue.done("a")
    assert queue.get(timeout=0) == "a"  # once more, for the change
    queue.done("a")
    assert queue.get(timeout=0) is None


def test_no_two_workers_on_one_key_under_load() -> None:
    queue: WorkQueue[int] = WorkQueue()
    active: Counter[int] = Counter()
    runs: Counter[int] = Counter()
    overlap: list[int] = []
    guard = threading.Lock()

    def worker() -> None:
        while (key := queue.get(timeout=0.5)) is not None:
            with guard:
                active[key] += 1
                if active[key] > 1:
                    overlap.append(key)
                runs[key] += 1
            time.sleep(0.001)
            with guard:
                active[key] -= 1
            queue.done(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for i in range(2000):
        queue.add(i % 10)
    for thread in threads:
        thread.join()
    assert overlap == []
    assert set(runs) == set(range(10))
    assert sum(runs.values()) < 2000  # coalesced


def test_the_last_add_is_never_lost() -> None:
    """An add after the worker read its state must cause one more run."""
    queue: WorkQueue[str] = WorkQueue()
    seen: list[int] = []
    state = {"value": 0}

    queue.add("k")
    key = queue.get(timeout=0)
    assert key == "k"
    seen.append(state["value"])  # the worker reads ...
    state["value"] = 1  # ... the world changes
    queue.add("k")  # ... and its event arrives while the worker runs
    queue.done("k")
    key = queue.get(timeout=0)
    assert key == "k"
    seen.append(state["value"])
    queue.done("k")
    assert seen == [0, 1]


def test_add_after() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("late", 0.2)
    queue.add_after("late", 5.0)  # the earlier time wins
    queue.add_after("soon", 0.05)
    assert queue.get(timeout=0) is None
    started = time.monotonic()
    assert queue.get(timeout=2) == "soon"
    assert queue.get(timeout=2) == "late"
    assert 0.15 < time.monotonic() - started < 1.0
    assert queue.scheduled() == 0
    queue.done("soon")
    queue.done("late")
    assert queue.get(timeout=0.1) is None


def test_shutdown_releases_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    results: list[str | None] = []
    thread = threading.Thread(target=lambda: results.append(queue.get()))
    thread.start()
    time.sleep(0.05)
    queue.shutdown()
    thread.join(timeout=2)
    assert results == [None]
