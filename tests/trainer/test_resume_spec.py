"""Resume is explicit about its spec: the output folder remembers the spec it was started with.

A rerun that changes only what may change (world size, maxSteps, save/eval cadence) resumes
and says so; any other change is refused (exit 2, one line naming the fields) unless the
user asks to start over with --restart; a finished folder refuses a changed spec likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import assert_refused
from trainer_helpers import job, progress, train

pytestmark = pytest.mark.slow

BASE = {"training.maxSteps": 4, "training.saveSteps": 2, "dataset.validationSize": 0}


def spec(path: Path, **changes: object) -> Path:
    return job(path, **{**BASE, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    train(spec(folder / "job.yaml", **{"training.maxSteps": 2}), folder / "out", 1)
    return folder / "out"


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Killed after step 3 of 4: checkpoint-2 on disk, not finished."""
    folder = tmp_path_factory.mktemp("killed")
    output = folder / "out"
    result = train(
        spec(folder / "job.yaml"), output, 1, env={"FINETUNE_FAULT_AT_STEP": "3"}, check=False
    )
    assert result.returncode != 0 and (output / "checkpoint-2" / "checkpoint-complete").exists()
    assert not (output / "COMPLETE").exists()
    return output


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "out"))


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_output_folder_remembers_the_spec(finished: Path) -> None:
    saved = json.loads((finished / "finetune-config.json").read_text())
    assert saved["learningRate"] == 0.005 and saved["maxSteps"] == 2


def test_finished_run_refuses_another_learning_rate(finished: Path, tmp_path: Path) -> None:
    before = snapshot(finished)
    changed = spec(tmp_path / "job.yaml", **{"training.learningRate": 0.001})
    result = train(changed, finished, 1, check=False)
    assert_refused(result, "learningRate", "--restart")
    assert snapshot(finished) == before


def test_finished_run_refuses_more_steps(finished: Path, tmp_path: Path) -> None:
    result = train(spec(tmp_path / "job.yaml"), finished, 1, check=False)  # maxSteps 2 -> 4
    assert_refused(result, "maxSteps")


def test_finished_run_at_another_world_size_has_nothing_to_do(
    finished: Path, tmp_path: Path
) -> None:
    before = snapshot(finished)
    same = spec(tmp_path / "job.yaml", **{"training.maxSteps": 2})
    result = train(same, finished, 2)
    assert "nothing to do" in result.stdout + result.stderr
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "field, value",
    [("training.learningRate", 0.001), ("training.globalBatchSize", 16), ("lora.r", 4)],
)
def test_resume_refuses_a_changed_spec(
    killed: Path, tmp_path: Path, field: str, value: object
) -> None:
    output = copy(killed, tmp_path)
    before = snapshot(output)
    result = train(spec(tmp_path / "job.yaml", **{field: value}), output, 1, check=False)
    line = assert_refused(result, "--restart")
    assert field.split(".")[-1] in line
    assert snapshot(output) == before


def test_resume_at_another_world_size_and_length_continues_and_says_so(
    killed: Path, tmp_path: Path
) -> None:
    output = copy(killed, tmp_path)
    longer = spec(tmp_path / "job.yaml", **{"training.maxSteps": 6, "training.saveSteps": 3})
    result = train(longer, output, 2)
    said = [line for line in result.stderr.splitlines() if "resuming with changes" in line]
    assert len(said) == 1 and "maxSteps" in said[0] and "worldSize" in said[0]
    assert "saveSteps" in said[0]
    resumed = [r for r in progress(output) if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == 2
    assert json.loads((output / "COMPLETE").read_text())["step"] == 6
    assert json.loads((output / "finetune-config.json").read_text())["maxSteps"] == 6


def test_restart_starts_over_with_the_new_spec(killed: Path, tmp_path: Path) -> None:
    output = copy(killed, tmp_path)
    (output / "notes.txt").write_text("mine")  # not the run's: --restart leaves it
    changed = spec(tmp_path / "job.yaml", **{"training.learningRate": 0.001})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            str(changed),
            "--output",
            str(output),
            "--restart",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [r for r in progress(output) if r.get("event") == "resumed"]
    assert min(r["step"] for r in progress(output) if "loss" in r) == 1
    assert json.loads((output / "finetune-config.json").read_text())["learningRate"] == 0.001
    assert (output / "notes.txt").read_text() == "mine"
