"""Helpers for trainer tests: the tiny model, job files, and launching real (torchrun) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The bundled tiny model is built into a per-session cache, not ~/.cache."""
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def job(path: Path, **spec_overrides: Any) -> Path:
    """The tiny example with spec fields replaced ("training.maxSteps": 8 style keys)."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    for dotted, value in spec_overrides.items():
        node = manifest["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(manifest))
    return path


def train(
    job_file: Path, output: Path, nproc: int, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run finetune-train as a user would: `python -m finetune_trainer JOB --output DIR --nproc N`."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            str(job_file),
            "--output",
            str(output),
            "--nproc",
            str(nproc),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def progress(output: Path) -> list[dict[str, Any]]:
    lines = (output / "progress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(output: Path) -> dict[int, float]:
    """Training loss per step (the last value logged for a step wins, as after a resume)."""
    return {r["step"]: r["loss"] for r in progress(output) if "loss" in r}


def tiny_llama(seed: int = 0, attn: str = "sdpa", **config: Any) -> Any:
    """A tiny random fp32 Llama (vocab 97, hidden 64, 2 layers) in eval mode, no KV cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
    } | config
    llama_config = LlamaConfig(**settings)
    llama_config._attn_implementation = attn
    llama_config.use_cache = False  # as in training (test_position_id_packing_needs_use_cache_off)
    return LlamaForCausalLM(llama_config).float().eval()


def examples(n: int, seed: int = 1, low: int = 5, high: int = 40) -> list[dict[str, Any]]:
    """Tokenized rows of random ids, the first third of each masked as a prompt."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        prompt = length // 3
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def rel(a: Any, b: Any) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class StandInApi:
    """A stand-in Kubernetes API server on 127.0.0.1 that records every PATCH (path, content
    type, body) and answers `status_code`; `kubeconfig` points a client at it."""

    def __init__(self, directory: Path, status_code: int = 200) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.calls: list[dict[str, Any]] = []
        self.status_code = status_code
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.calls.append(
                    {"path": self.path, "type": self.headers["Content-Type"], "body": body}
                )
                self.send_response(api.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.kubeconfig = directory / "kubeconfig"
        cluster = {"server": f"http://127.0.0.1:{self.server.server_port}"}
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": cluster}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )

    @property
    def patches(self) -> list[dict[str, Any]]:
        return [call["body"] for call in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
