"""`finetune-train` against an fp32 reference, on data a model can learn.

What a user runs (`python -m finetune_trainer JOB`), at the defaults (micro-batch 2, global
batch 128, lr 3e-5, cosine, max_grad_norm 0.3), on several paths that see the same examples in
every optimizer step:

* reference: fp32, `fusedKernels: false`
* plain: bf16, `fusedKernels: false` (the plain transformers+peft numerics)
* default: bf16, the default fast path
* other paths from PATHS (e.g. fp32 with the fast path)

The model is Llama-shaped with random weights (`--hidden`, `--layers`; the 7B shape by
default), saved once in bf16 so every path starts from the same weights. The data are alpaca
rows whose prompt template is shared by every row, and `trainOnInputs` is on (the default), so
the template's tokens are learnable within a few steps: a wrong update shows up as a loss that
falls faster or slower than the reference's.

The figure of merit per step is the distance to the reference: |loss - reference loss| and
|grad norm - reference grad norm|. A fast path passes where its distance is within the plain
bf16 path's distance plus a slack (`--slack`, relative to the reference's step-1 loss drop), at
every step: no closer than plain is required, and no further.

    python benchmarks/fp32_reference.py --layers 8 --steps 5 --out results/ref.json
    python benchmarks/fp32_reference.py --tiny --device cpu   # the same code on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

PATHS: dict[str, dict[str, Any]] = {
    "reference": {"training.bf16": False, "training.fusedKernels": False},
    "plain": {"training.bf16": True, "training.fusedKernels": False},
    "default": {},
    "fp32-default": {"training.bf16": False},
}


def make_model(directory: Path, hidden: int, layers: int, intermediate: int, heads: int) -> Path:
    """A Llama of the given shape (vocab 32000, random weights, seed 0) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.tiny import make_tokenizer

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    return directory


def make_data(path: Path, rows: int, dpo: bool = False, seed: int = 0) -> Path:
    """alpaca rows (the shared template, an instruction and a response of vocabulary words),
    or preference rows (a prompt and two responses)."""
    from finetune_trainer.tiny import _vocabulary

    words = [w for w in _vocabulary() if w.isalpha()]
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    data: list[dict[str, str]] = []
    for _ in range(rows):
        if dpo:
            data.append(
                {"prompt": text(60, 220), "chosen": text(40, 200), "rejected": text(40, 200)}
            )
        else:
            # about as long as the throughput benchmark's rows: lognormal lengths, median 140
            # tokens, clipped to 40..256 (the template is ~35 tokens, one word one token)
            length = min(max(int(rng.lognormvariate(math.log(140), 0.5)), 40), 256)
            instruction = rng.randint(5, 25)
            output = max(length - 35 - instruction, 5)
            data.append(
                {
                    "instruction": text(instruction, instruction),
                    "input": "",
                    "output": text(output, output),
                }
            )
    path.write_text(json.dumps(data))
    return path


def job(
    path: Path, model: Path, data: Path, device: str, steps: int, method: str, **overrides: Any
) -> Path:
    spec: dict[str, Any] = {
        "method": method,
        "model": {"name": str(model)},
        "dataset": {"name": str(data), "validationSize": 0},
        "device": device,
        "training": {"maxSteps": steps, "saveSteps": 10_000},
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": path.stem},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def train(job_file: Path, output: Path, timeout: float) -> dict[str, Any]:
    """Run finetune-train; per-step loss and grad norm from progress.jsonl."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", str(job_file), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    records = []
    progress = output / "progress.jsonl"
    if progress.exists():
        records = [json.loads(line) for line in progress.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "exit": result.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "loss": [r["loss"] for r in steps],
        "gradNorm": [r.get("gradNorm") for r in steps],
        "tokensPerSecond": [r.get("tokensPerSecond") for r in steps],
        "peakMemoryBytes": max((r.get("peakMemoryBytes") or 0 for r in steps), default=0),
        "stderr": result.stderr[-4000:] if result.returncode else "",
    }


def distances(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, list[float]]:
    return {
        key: [abs(a - b) for a, b in zip(run[key], reference[key], strict=False)]
        for key in ("loss", "gradNorm")
    }


def verdict(runs: dict[str, dict[str, Any]], slack: float) -> dict[str, bool]:
    """Each path (not reference/plain): every step within plain's distance + slack x the
    reference's first loss drop (loss), or + slack x the reference's grad norm (grad norm)."""
    reference, plain = runs["reference"], runs["plain"]
    drop = abs(reference["loss"][0] - reference["loss"][1]) if len(reference["loss"]) > 1 else 0
    plain_d = distances(plain, reference)
    out = {}
    for name, run in runs.items():
        if name in ("reference", "plain") or run["exit"] != 0:
            continue
        d = distances(run, reference)
        ok = all(a <= b + slack * drop for a, b in zip(d["loss"], plain_d["loss"], strict=False))
        ok &= all(
            a <= b + slack * g
            for a, b, g in zip(
                d["gradNorm"], plain_d["gradNorm"], reference["gradNorm"], strict=False
            )
        )
        out[name] = ok and len(run["loss"]) == len(reference["loss"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/fp32-reference")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers (CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "dpo"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--paths", default="reference,plain,default")
    parser.add_argument("--slack", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.intermediate, args.heads, args.layers = 64, 128, 4, 2
    work = Path(args.work)
    model = make_model(
        work / f"model-{args.hidden}x{args.layers}",
        args.hidden,
        args.layers,
        args.intermediate,
        args.heads,
    )
    data = make_data(work / f"data-{args.method}.json", args.rows, dpo=args.method == "dpo")
    runs: dict[str, dict[str, Any]] = {}
    for name in args.paths.split(","):
        output = work / f"run-{args.method}-{name}"
        subprocess.run(["rm", "-rf", str(output)], check=True)
        spec = job(
            work / f"{args.method}-{name}.yaml",
            model,
            data,
            args.device,
            args.steps,
            args.method,
            **PATHS[name],
        )
        runs[name] = train(spec, output, args.timeout)
        print(
            f"RESULT {name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'stderr'})}",
            flush=True,
        )
        if runs[name]["exit"]:
            print(runs[name]["stderr"], file=sys.stderr)
    summary: dict[str, Any] = {
        "method": args.method,
        "shape": [args.hidden, args.layers],
        "runs": runs,
    }
    if "reference" in runs and "plain" in runs:
        summary["distance"] = {n: distances(r, runs["reference"]) for n, r in runs.items()}
        summary["within"] = verdict(runs, args.slack)
        for name, d in summary["distance"].items():
            loss = " ".join(f"{x:.4f}" for x in d["loss"])
            grad = " ".join(f"{x:.4f}" for x in d["gradNorm"] if not math.isnan(x))
            print(f"DIST {name:14} loss {loss} | grad norm {grad}")
        print(f"WITHIN {json.dumps(summary['within'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0 if all(summary.get("within", {}).values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
