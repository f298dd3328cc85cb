"""`finetune-train` in a person's terminal and under signals.

In a terminal: one progress bar (transformers' dict lines and our JSON lines are not printed
onto it; the JSON lines still go to progress.jsonl). Piped: the JSON lines on stdout, with an
ETA. Ctrl-C, SIGTERM or SIGKILL of the launcher of a 2-process run stops every rank; the
first two with one line and the documented exit code.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from trainer_helpers import job, progress, train

pytestmark = pytest.mark.slow

ERROR = "finetune-train: error: "


def command(job_file: Path, output: Path, nproc: int) -> list[str]:
    where = ["--output", str(output), "--nproc", str(nproc)]
    return [sys.executable, "-m", "finetune_trainer", str(job_file), *where]


def test_terminal_shows_one_bar_without_dict_or_json_lines(tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = job(tmp_path / "job.yaml", **{"training.maxSteps": 3, "dataset.validationSize": 0})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        command(spec, output, 1),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process holding it has ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=600) == 0, seen[-3000:]
    text = seen.decode(errors="replace")
    assert "{'loss'" not in text and "'grad_norm'" not in text  # transformers' dict line
    assert '"step"' not in text  # JSON lines: in progress.jsonl, not on the bar
    assert "loss=" in text  # the bar's own postfix
    assert [r for r in progress(output) if "loss" in r]


def test_piped_output_is_json_lines_with_an_eta(tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = job(tmp_path / "job.yaml", **{"training.maxSteps": 3, "dataset.validationSize": 0})
    result = train(spec, output, 1)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all("etaSeconds" in r for r in steps[1:])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, list[int]]:
    """A 2-process run that trains long enough to be stopped after its first step."""
    output = tmp_path / "out"
    spec = job(
        tmp_path / "job.yaml",
        **{"training.maxSteps": 10000, "training.saveSteps": 5000, "dataset.validationSize": 0},
    )
    process = subprocess.Popen(
        command(spec, output, 2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (output / "progress.jsonl").exists() and any("loss" in r for r in progress(output)):
            break
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    workers = _children(process.pid)
    assert len(workers) == 2
    return process, output, workers


def _wait_gone(pids: list[int], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "workers outlived the launcher"


@pytest.mark.parametrize(
    "how, code",
    [("ctrl-c", 128 + signal.SIGINT), ("sigterm", 128 + signal.SIGTERM)],
)
def test_stopping_the_launcher_stops_every_rank_with_one_line(
    tmp_path: Path, how: str, code: int
) -> None:
    process, output, workers = _start_long_run(tmp_path)
    if how == "ctrl-c":  # a terminal sends SIGINT to the whole foreground group
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    _wait_gone(workers)
    assert process.returncode == code, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert not (output / "COMPLETE").exists()


def test_killed_launcher_leaves_no_workers(tmp_path: Path) -> None:
    process, _, workers = _start_long_run(tmp_path)
    process.kill()
    process.communicate(timeout=60)
    _wait_gone(workers)
