"""Hub items fetched once per job, and the hub's refusals said in one line.

A stand-in hub on 127.0.0.1 (hub_server.py, HF_ENDPOINT) serves the tiny model and the tiny
alpaca rows in the hub's layout; `finetune-train --nproc 2` trains on them by hub id.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Hub
from trainer_helpers import REPO, job, train

pytestmark = pytest.mark.slow

MODEL, DATA = "acme/tiny-llama", "acme/tiny-alpaca"


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from finetune_trainer.tiny import make_tiny_model

    source = tmp_path_factory.mktemp("hub")
    make_tiny_model(source / "model")
    (source / "model" / "pytorch_model.bin").write_bytes(b"the same weights, pickled")
    (source / "data").mkdir()
    shutil.copy(REPO / "trainer/finetune_trainer/examples/tiny-alpaca.json", source / "data")
    with Hub() as server:
        server.add("model", MODEL, source / "model")
        server.add("dataset", DATA, source / "data")
        yield server


def _env(hub: Hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        **extra,
    }


def _job(tmp_path: Path) -> Path:
    return job(
        tmp_path / "job.yaml",
        **{"model.name": MODEL, "dataset.name": DATA, "training.maxSteps": 2},
    )


def _copies(output: Path) -> list[Path]:
    root = output / ".cache" / "finetune-hub"
    return sorted(root.iterdir()) if root.exists() else []


def test_two_processes_request_each_file_once(hub: Hub, tmp_path: Path) -> None:
    output = tmp_path / "out"
    train(_job(tmp_path), output, nproc=2, env=_env(hub, tmp_path))
    gets = hub.file_gets()
    assert gets and set(gets.values()) == {1}, gets
    assert not any(path.endswith(".bin") for path in gets)  # safetensors are there
    assert {p.name.split("--")[0] for p in _copies(output)} == {"models", "datasets"}
    assert all((p / ".fetch-complete").exists() for p in _copies(output))

    # the same items on the same volume again: nothing fetched
    before = sum(hub.requests.values())
    rerun = train(_job(tmp_path), output, nproc=2, env=_env(hub, tmp_path), check=False)
    assert rerun.returncode in (0, 2)  # 0, or refused as an already finished run
    assert sum(hub.requests.values()) == before


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refusal_is_one_line_and_exit_2(hub: Hub, tmp_path: Path, status: int) -> None:
    hub.status = status
    output = tmp_path / "out"
    result = train(_job(tmp_path), output, nproc=2, env=_env(hub, tmp_path), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "finetune-train: error:" in line]
    assert len(errors) == 1 and MODEL in errors[0], result.stderr[-2000:]
    assert not any((p / ".fetch-complete").exists() for p in _copies(output))


def test_a_download_cut_short_leaves_no_copy(hub: Hub, tmp_path: Path) -> None:
    hub.cut_files = 10**6  # every file stops half way, however often it is asked for
    output = tmp_path / "out"
    env = _env(hub, tmp_path, FINETUNE_FETCH_RETRY_SECONDS="3")
    result = train(_job(tmp_path), output, nproc=2, env=env, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    copies = _copies(output)
    assert not any((p / ".fetch-complete").exists() for p in copies)
    assert not any(".partial-" in p.name for p in copies)
