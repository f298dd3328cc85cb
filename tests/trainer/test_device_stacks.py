"""Workers start a rank per device they see: two worker "pods" on this machine, each given one
card that the device seam says has two stacks (FINETUNE_FAKE_DEVICE_COUNT=2, the one thing
faked), run the pod's real command (`python -m finetune_trainer.launch`), rendezvous through
torchrun and train on the CPU with gloo; rank 0 reports to a stand-in API server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import StandInApi, job

from finetune_operator.objects import config_hash
from finetune_operator.resolve import ResolvedConfig, resolve_manifest

pytest.importorskip("kubernetes")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[StandInApi]:
    server = StandInApi(tmp_path)
    yield server
    server.close()


def _config(tmp_path: Path, **spec: Any) -> tuple[Path, ResolvedConfig]:
    """The resolved config the operator would mount, for an xpu job of `spec`."""
    manifest = yaml.safe_load(job(tmp_path / "job.yaml", device="xpu", **spec).read_text())
    config = resolve_manifest(manifest).model_copy(update={"output_path": str(tmp_path / "out")})
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    return path, config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pods(config: Path, api: StandInApi, stacks: int, workers: int = 2) -> list[int]:
    """Every worker pod's command, as the operator writes it, each with `stacks` devices seen."""
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FINETUNE_FAKE_DEVICE_COUNT": str(stacks),
        "FINETUNE_JOB_NAME": "stacks",
        "FINETUNE_JOB_NAMESPACE": "ns",
        "KUBECONFIG": str(api.kubeconfig),
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    pods = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "finetune_trainer.launch",
                f"--nnodes={workers}",
                f"--node-rank={index}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "--config",
                str(config),
            ],
            env=env,
        )
        for index in range(workers)
    ]
    return [pod.wait(timeout=600) for pod in pods]


def _ranks_reports(api: StandInApi) -> list[dict[str, Any]]:
    return [p["status"]["ranks"] for p in api.patches if "ranks" in p.get("status", {})]


def test_two_stack_cards_start_twice_the_ranks_and_keep_the_global_batch(
    tmp_path: Path, api: StandInApi
) -> None:
    path, config = _config(
        tmp_path,
        workers=2,
        devicesPerWorker=1,
        **{"training.globalBatchSize": 8, "training.microBatchSize": 2, "training.maxSteps": 2},
    )
    assert config.world_size == 2 and config.gradient_accumulation_steps == 2

    assert _pods(path, api, stacks=2) == [0, 0]

    [report] = _ranks_reports(api)
    assert report["worldSize"] == 4 and report["workers"] == 2
    assert report["summary"] == "2 workers x 1 card x 2 stacks = 4 ranks"
    assert report["gradientAccumulationSteps"] == 1  # 8 = micro 2 x 1 x 4 ranks
    assert report["configHash"] == config_hash(config)
    assert report["reason"] is None and report["message"] is None
    ran = json.loads((tmp_path / "out" / "finetune-config.json").read_text())
    assert ran["worldSize"] == 4 and ran["globalBatchSize"] == 8
    assert ran["gradientAccumulationSteps"] == 1
    assert (tmp_path / "out" / "COMPLETE").exists()  # trained to the end


def test_a_world_that_does_not_divide_the_global_batch_is_refused_before_training(
    tmp_path: Path, api: StandInApi
) -> None:
    # 6 = micro 1 x accumulation 3 x 2 ranks as the spec says, but 2-stack cards make 4 ranks
    path, config = _config(
        tmp_path,
        workers=2,
        devicesPerWorker=1,
        **{"training.globalBatchSize": 6, "training.microBatchSize": 1, "training.maxSteps": 2},
    )
    assert config.gradient_accumulation_steps == 3

    codes = _pods(path, api, stacks=2)

    assert all(code != 0 for code in codes)
    [report] = _ranks_reports(api)
    assert report["reason"] == "BatchRule" and report["worldSize"] == 4
    assert report["gradientAccumulationSteps"] is None
    assert report["configHash"] == config_hash(config)
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written
    assert not [p for p in api.patches if "progress" in p.get("status", {})]


def test_single_stack_cards_start_one_rank_per_card(tmp_path: Path, api: StandInApi) -> None:
    path, _ = _config(
        tmp_path,
        workers=2,
        devicesPerWorker=1,
        **{"training.globalBatchSize": 8, "training.microBatchSize": 2, "training.maxSteps": 1},
    )
    assert _pods(path, api, stacks=1) == [0, 0]
    [report] = _ranks_reports(api)
    assert report["worldSize"] == 2 and report["gradientAccumulationSteps"] == 2
    assert report["summary"] == "2 workers x 1 card = 2 ranks"
