"""The local launcher's choices (`finetune-train --nproc N`), in process."""

from __future__ import annotations

import os

from finetune_trainer.cli import _forwarded, _threads_per_process


def test_cpu_threads_are_shared_by_the_processes() -> None:
    cores = len(os.sched_getaffinity(0))
    assert _threads_per_process(1) == str(cores)
    assert _threads_per_process(2) == str(max(1, cores // 2))
    assert _threads_per_process(cores * 4) == "1"  # never below one thread


def test_launcher_acts_on_nproc_and_restart_itself() -> None:
    argv = ["job.yaml", "--nproc", "2", "--restart", "--output", "o", "--nproc=2"]
    assert _forwarded(argv) == ["job.yaml", "--output", "o"]
