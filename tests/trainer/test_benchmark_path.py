"""benchmarks/train_throughput.py measures `finetune-train` itself: it assembles nothing of
the trainer's fast path, and what it reports ran with the plan the trainer makes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from trainer_helpers import REPO

from finetune_trainer.config import load_config
from finetune_trainer.plan import Capabilities, make_plan

BENCHMARK = REPO / "benchmarks" / "train_throughput.py"
# the trainer's performance machinery: only the trainer may put it together
FAST_PATH = {"perf", "plan", "cuda_graphs", "packed_dpo", "lean_lora", "data_parallel", "train"}


def test_the_benchmark_assembles_nothing_of_the_fast_path() -> None:
    tree = ast.parse(BENCHMARK.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    ours = {name.split(".")[1] for name in imported if name.startswith("finetune_trainer.")}
    assert not ours & FAST_PATH, ours & FAST_PATH


def test_the_benchmark_reports_the_plan_finetune_train_ran(tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [
        sys.executable,
        str(BENCHMARK),
        "--tiny",
        "--tiny-cpu",
        "--paths=finetune-train",
        "--methods=lora",
        "--steps=3",
        "--examples=64",
        "--global-batch=8",
        f"--work={tmp_path / 'work'}",
        f"--out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((out / "lora-finetune-train-w1.json").read_text())
    assert report["exit"] == 0 and report["tokens_per_s"] > 0
    assert sorted(report["logs"]) == ["1", "2", "3"]
    config = load_config(tmp_path / "work" / "lora-w1.yaml")
    plan = make_plan(config, "cpu", 1, Capabilities.detect("cpu"))
    assert report["plan"] == plan.describe()
