"""`finetune-train` at its defaults against the fp32 reference, on a GPU.

Runs benchmarks/fp32_reference.py (a Llama 7B-wide, 8 layers deep, random weights, alpaca rows
with a learnable template; five optimizer steps of the default global batch on each path),
which exits 0 only when the default path is within the plain bf16 path's distance to the
fp32 reference (plus a tenth of the reference's first loss drop) in loss and grad norm at
every step. Results of the runs on an H200: benchmarks/results/fp32-reference/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_path_is_as_close_to_fp32_as_plain_bf16(method: str, tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fp32_reference.py"),
            "--layers=8",
            "--steps=5",
            f"--method={method}",
            f"--work={tmp_path}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads(out.read_text())
    assert all(run["exit"] == 0 for run in summary["runs"].values()), result.stderr[-3000:]
    assert summary["within"] == {"default": True}, summary["distance"]
    assert result.returncode == 0
