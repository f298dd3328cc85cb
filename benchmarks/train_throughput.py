"""Training throughput: the plain Hugging Face recipe vs `finetune-train` itself.

Model: Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000),
random weights (seed 0), bf16.

  baseline        the plain recipe, assembled here: LoRA r8 / alpha 16 / dropout 0.05 on the
                  seven projections (peft), or QLoRA (the same on bitsandbytes nf4 double-quant
                  weights), transformers Trainer, DataCollatorForSeq2Seq (right padding,
                  pad_to_multiple_of 8), adamw_torch, the TrainingArguments defaults, eager
                  sdpa; DPO: plain TRL DPOTrainer (its collator, its default checkpointing).
                  Data: 4096 synthetic alpaca-like examples (lengths lognormal, median 140
                  tokens, sigma 0.5, clipped to 40..256, ~45% prompt masked), or preference
                  pairs (prompt median 140, responses median 120).
  finetune-train  `python -m finetune_trainer JOB --nproc N` at its defaults on the same model
                  (saved once) and rows of the same lengths (DPO: the very same pairs): what a
                  user runs, with the trainer's own plan (recorded from its progress.jsonl).
                  Nothing of the trainer's fast path is assembled here (a test checks), so the
                  benchmark cannot measure what the trainer does not run.

Usage (results JSON per run under --out):
  python benchmarks/train_throughput.py --paths baseline,finetune-train --methods lora,qlora
  python benchmarks/train_throughput.py --paths finetune-train --methods lora --worlds 1,2
  python benchmarks/train_throughput.py --paths baseline,finetune-train --methods dpo \
      --global-batch 16 --micro-batch 4 --examples 512
Tiny CPU check: --tiny --tiny-cpu runs the same code on the CPU.

FLOPs per non-padding token (MFU, baseline): 4*N for the frozen base (forward 2N + backward
through the activations 2N), N = 6.61e9 non-embedding parameters incl. lm_head, plus attention
6*s*d*L for an example of length s, plus LoRA 6*N_lora. Peak: 989 TFLOP/s (H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "trainer"), str(REPO / "operator")]

PEAK_FLOPS = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NCCL_SAFE = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def model_config(tiny: bool, layers: int | None) -> Any:
    from transformers import LlamaConfig

    if tiny:
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
    if layers:
        cfg.num_hidden_layers = layers
    cfg.use_cache = False
    cfg.pad_token_id = 0
    return cfg


def synthetic_alpaca(
    n: int, cutoff: int, vocab: int, seed: int = 1234
) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(140) + 0.5 * torch.randn(n, generator=g)).round().clamp(40, cutoff)
    rows = []
    for length in lengths.long().tolist():
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(0.45 * length)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": [-100] * prompt + ids[prompt:],
            }
        )
    return rows


class ListDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


class Counting:
    """Wraps a collator: counts non-padding tokens and useful FLOPs of what it collates."""

    def __init__(self, inner: Any, flops_fn: Any) -> None:
        self.inner, self.flops_fn = inner, flops_fn
        self.tokens = 0
        self.flops = 0.0
        self.examples = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        for f in features:
            s = len(f["input_ids"])
            self.tokens += s
            self.flops += self.flops_fn(s)
        self.examples += len(features)
        return self.inner(features)


def tokenizer_stub(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "t5 t9" -> [5, 9] (DPO's text)
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t2"
    )
    t.padding_side = "right"
    return t


def quantize_linears(model: Any, compute_dtype: torch.dtype) -> None:
    """nf4 double-quant (bitsandbytes Linear4bit, bf16 storage) in place of the 7 projections."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    quant_storage=compute_dtype,
                    device="meta",
                )
                w = bnb.nn.Params4bit(
                    child.weight.data.contiguous(),
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                    quant_storage=compute_dtype,
                )
                q.weight = w.to(
                    child.weight.device
                )  # moving an unquantized Params4bit quantizes it
                setattr(parent, name, q)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    # what from_pretrained(quantization_config=...) leaves on the model, so Trainer/peft treat
    # it exactly as a loaded 4-bit checkpoint
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )
    model.hf_quantizer = Bnb4BitHfQuantizer(qconfig, pre_quantized=False)
    model.config.quantization_config = qconfig
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"


def lora_config(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=args.lora_dropout,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(
    args: argparse.Namespace, device: torch.device, wrap: bool = True
) -> tuple[Any, Any]:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    cfg = model_config(args.tiny, args.layers)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    if args.method == "qlora":
        quantize_linears(model, torch.bfloat16)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(42)  # the LoRA A matrices: the same on every rank and in every path
    if wrap:
        model = get_peft_model(model, lora_config(args))
    return model, cfg


def flops_per_example(cfg: Any, n_lora: int):  # type: ignore[no-untyped-def]
    d, L, V, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    n_base = L * (4 * d * d + 3 * d * f) + V * d  # projections + lm_head (embedding: no FLOPs)
    return (lambda s: 4 * n_base * s + 6 * s * s * d * L + 6 * n_lora * s), n_base


class Recorder:
    """Per optimizer step: wall time (synchronised at step end), loss, grad norm."""

    def __init__(self, counter: Counting, device: torch.device) -> None:
        from transformers import TrainerCallback

        rec = self
        self.counter, self.device = counter, device
        self.steps: list[dict[str, Any]] = []
        self.logs: dict[int, dict[str, float]] = {}
        self.profile_step: int | None = None
        self.profiler: Any = None
        self.cprofile_step: int | None = None
        self.profile_micro_batches = 1 << 30
        self.profiled_micro_batches = 0
        self.profile_t0 = 0.0
        self.cprofiler: Any = None

        class CB(TrainerCallback):
            def on_train_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.sync()
                rec.last = time.perf_counter()
                rec.mark = (counter.tokens, counter.flops, counter.examples)

            def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                if rec.profile_step is not None and state.global_step + 1 == rec.profile_step:
                    rec.sync()
                    rec.start_profiler()
                if rec.cprofile_step is not None and state.global_step + 1 == rec.cprofile_step:
                    rec.start_cprofile()

            def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.sync()
                now = time.perf_counter()
                if rec.profiler is not None:
                    rec.stop_profiler()
                if rec.cprofiler is not None:
                    rec.stop_cprofile(now - rec.last)
                tokens, flops, examples = counter.tokens, counter.flops, counter.examples
                rec.steps.append(
                    {
                        "step": state.global_step,
                        "seconds": now - rec.last,
                        "tokens": tokens - rec.mark[0],
                        "flops": flops - rec.mark[1],
                        "examples": examples - rec.mark[2],
                        **rec.step_peak(),
                    }
                )
                rec.last, rec.mark = now, (tokens, flops, examples)

            def on_substep_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                # the profiler's cost grows with the events: a few micro-batches tell enough
                if rec.profiler is not None:
                    rec.profiled_micro_batches += 1
                    if rec.profiled_micro_batches >= rec.profile_micro_batches:
                        rec.sync()
                        rec.stop_profiler()

            def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "loss" in logs:
                    rec.logs[state.global_step] = {
                        "loss": float(logs["loss"]),
                        "grad_norm": float(logs.get("grad_norm", float("nan"))),
                    }

        self.callback = CB()
        self.peak_gib = 0.0  # over every step (step_peak restarts torch's counters)
        self.last = 0.0
        self.mark = (0, 0.0, 0)

    def profiling(self, args: argparse.Namespace, rank: int) -> Recorder:
        """The profilers the command line asks for (torch.profiler on rank 0 only)."""
        if args.profile_step and rank == 0:
            self.profile_step = args.profile_step
        self.cprofile_step = args.cprofile_step
        self.profile_micro_batches = args.profile_micro_batches or self.profile_micro_batches
        return self

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step_peak(self) -> dict[str, float]:
        """This step's peak allocated and reserved GiB (where a peak comes from: the steps
        that capture CUDA graphs, or every step), then the peak counters restart."""
        if self.device.type != "cuda":
            return {}
        peaks = {
            "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
        }
        self.peak_gib = max(self.peak_gib, peaks["peak_gib"])
        torch.cuda.reset_peak_memory_stats(self.device)
        return {k: round(v, 2) for k, v in peaks.items()}

    def start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiled_micro_batches = 0
        self.profile_t0 = time.perf_counter()

        acts = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
        )
        self.profiler = profile(activities=acts)
        self.profiler.__enter__()

    def stop_profiler(self) -> None:
        wall_ms = (time.perf_counter() - self.profile_t0) * 1e3
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        self.profile_result = summarise_profile(prof, self.device) | {
            "wall_ms": round(wall_ms, 1),
            "micro_batches": self.profiled_micro_batches,
        }

    def start_cprofile(self) -> None:
        """Python-level host time of one optimizer step (cProfile), and the GC pauses in it."""
        import cProfile
        import gc

        self.gc_pauses: list[float] = []
        self.gc_started = 0.0

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                self.gc_started = time.perf_counter()
            else:
                self.gc_pauses.append(time.perf_counter() - self.gc_started)

        self.gc_callback = on_gc
        gc.callbacks.append(on_gc)
        self.cprofiler = cProfile.Profile()
        self.cprofiler.enable()

    def stop_cprofile(self, wall_s: float) -> None:
        import gc
        import io
        import pstats

        prof, self.cprofiler = self.cprofiler, None
        prof.disable()
        gc.callbacks.remove(self.gc_callback)
        text = {}
        for key, lines in (("tottime", 45), ("cumulative", 60)):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(lines)
            text[key] = buf.getvalue().splitlines()
        self.host_profile = {
            "wall_ms": round(wall_s * 1e3, 1),
            "gc_pauses": len(self.gc_pauses),
            "gc_ms": round(sum(self.gc_pauses) * 1e3, 1),
            "by_tottime": text["tottime"],
            "by_cumulative": text["cumulative"],
        }


def summarise_profile(prof: Any, device: torch.device) -> dict[str, Any]:
    """GPU time by category, kernel count, top kernels, over the profiled optimizer step."""
    events = prof.key_averages()
    kernels: list[tuple[str, float, int]] = []
    for e in events:
        t = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        if t > 0 and e.device_type.name == "CUDA":
            kernels.append((e.key, t / 1e3, e.count))
    cats: dict[str, float] = {}

    def category(name: str) -> str:
        n = name.lower()
        if "nccl" in n:
            return "nccl"
        if any(
            k in n for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "gemv")
        ):
            return "matmul (cuBLAS)"
        if any(k in n for k in ("fmha", "attention", "flash", "efficient")):
            return "attention"
        if "dequant" in n or "kdequant" in n or "4bit" in n:
            return "nf4 dequantize"
        if "triton" in n:
            return "triton (compiled/liger fusions)"
        if "adam" in n or "multi_tensor" in n:
            return "optimizer"
        if "memcpy" in n or "memset" in n:
            return "memcpy/memset"
        return "other elementwise/reduction"

    for name, ms, _ in kernels:
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    # GPU busy time: the union of the kernels' and copies' intervals (host-bound when far
    # below the step's wall time)
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    cpu_ops = sorted(
        (e for e in events if e.device_type.name == "CPU"),
        key=lambda e: -e.self_cpu_time_total,
    )
    return {
        "gpu_busy_ms": round(busy / 1e3, 1),
        "cpu_top_self": [
            (e.key[:70], round(e.self_cpu_time_total / 1e3, 1), e.count) for e in cpu_ops[:30]
        ],
        "gpu_ms_by_category": {
            k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])
        },
        "gpu_ms_total": round(sum(cats.values()), 1),
        "kernel_launches": int(sum(c for _, _, c in kernels)),
        "top_kernels": [(n[:90], round(ms, 1), c) for n, ms, c in kernels[:15]],
    }


def child(args: argparse.Namespace) -> None:
    if args.method == "dpo":
        child_dpo(args)
        return
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not args.tiny_cpu
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    t_build = time.perf_counter()
    model, cfg = build_model(args, device)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_fn, n_base = flops_per_example(cfg, n_lora)
    tokenizer = tokenizer_stub(cfg.vocab_size)
    micro = args.micro_batch
    inner = DataCollatorForSeq2Seq(
        tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True, label_pad_token_id=-100
    )
    build_s = time.perf_counter() - t_build
    per_rank = args.global_batch // world
    accumulation = per_rank // micro
    kwargs: dict[str, Any] = dict(
        output_dir=str(Path(args.out) / "trainer-tmp"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        seed=42,
        data_seed=42,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=True,
    )
    targs = TrainingArguments(**kwargs)
    _ = targs.device  # initialises the process group under torchrun
    counter = Counting(inner, flops_fn)
    rows = synthetic_alpaca(args.examples, args.cutoff, cfg.vocab_size)
    recorder = Recorder(counter, device).profiling(args, rank)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=ListDataset(rows),
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=[recorder.callback],
    )
    meta = {
        "micro_batch": micro,
        "accumulation": accumulation,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "n_base_flop_params": n_base,
        "n_lora": n_lora,
        "build_s": round(build_s, 1),
    }
    train_and_report(args, trainer, recorder, device, meta)


# --------------------------------------------------------------------------------------------
# DPO: plain TRL vs finetune_trainer.packed_dpo
# --------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, vocab: int, seed: int = 4321) -> list[dict[str, str]]:
    """Preference pairs as text ("t5 t9 ..." is token ids 5, 9 for `tokenizer_stub`): prompt
    lognormal median 140 tokens, chosen and rejected each median 120 (sigma 0.5, clipped)."""
    g = torch.Generator().manual_seed(seed)

    def lengths(median: float, low: int, high: int) -> list[int]:
        draw = torch.exp(math.log(median) + 0.5 * torch.randn(n, generator=g))
        return [int(x) for x in draw.round().clamp(low, high).tolist()]

    def text(length: int) -> str:
        return " ".join(f"t{i}" for i in torch.randint(3, vocab, (length,), generator=g).tolist())

    prompts, chosen, rejected = lengths(140, 16, 512), lengths(120, 8, 512), lengths(120, 8, 512)
    # leading space: TRL tokenizes prompt and prompt + completion; trailing space: it appends
    # the EOS text, which must stay a word of its own
    return [
        {"prompt": text(p), "chosen": " " + text(c) + " ", "rejected": " " + text(r) + " "}
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]


class PairCounting:
    """Wraps a preference collator: counts non-padding tokens (both sequences of each pair,
    truncated as the collators truncate) and useful FLOPs (6N per token + attention)."""

    def __init__(self, inner: Any, flops_fn: Any, max_length: int) -> None:
        self.inner, self.flops_fn, self.max_length = inner, flops_fn, max_length
        self.tokens, self.flops, self.examples = 0, 0.0, 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        for f in features:
            for key in ("chosen_ids", "rejected_ids"):
                s = min(len(f["prompt_ids"]) + len(f[key]), self.max_length)
                self.tokens += s
                self.flops += self.flops_fn(s)
        self.examples += len(features)
        return self.inner(features)


def lora_model_params(cfg: Any, args: argparse.Namespace) -> list[torch.Tensor]:
    """The LoRA parameters TRL will add (r 8 on the seven projections): shapes only."""
    d, f, r = cfg.hidden_size, cfg.intermediate_size, 8
    per_layer = 4 * (d * r + r * d) + 2 * (d * r + r * f) + (f * r + r * d)
    return [torch.empty(per_layer * cfg.num_hidden_layers, device="meta")]


def child_dpo(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not args.tiny_cpu
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    t_build = time.perf_counter()
    args.method = "lora"  # the bf16 base; TRL adds the LoRA adapter (reference: adapter off)
    model, cfg = build_model(args, device, wrap=False)
    args.method = "dpo"
    n_lora = sum(p.numel() for p in lora_model_params(cfg, args))
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    n_base = L * (4 * d * d + 3 * d * cfg.intermediate_size) + cfg.vocab_size * d

    def flops_fn(s: int) -> float:  # policy fwd+bwd 4N, reference fwd 2N; attention alike
        return 6 * n_base * s + 9 * s * s * d * L + 6 * n_lora * s

    tokenizer = tokenizer_stub(cfg.vocab_size)
    inner = DataCollatorForPreference(pad_token_id=0, max_length=args.dpo_max_length)
    build_s = time.perf_counter() - t_build
    micro = args.micro_batch
    accumulation = args.global_batch // world // micro
    kwargs: dict[str, Any] = dict(
        output_dir=str(Path(args.out) / "trainer-tmp"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        seed=42,
        data_seed=42,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=True,
        beta=0.1,
        max_length=args.dpo_max_length,
    )
    targs = DPOConfig(**kwargs)
    counter = PairCounting(inner, flops_fn, args.dpo_max_length)
    recorder = Recorder(counter, device).profiling(args, rank)  # type: ignore[arg-type]
    torch.manual_seed(42)  # the LoRA A matrices TRL draws
    trainer = DPOTrainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(synthetic_pairs(args.examples, cfg.vocab_size)),
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=[recorder.callback],
        peft_config=lora_config(args),
    )
    meta = {
        "micro_batch": micro,
        "accumulation": accumulation,
        "layers": L,
        "hidden": d,
        "n_base_flop_params": n_base,
        "n_lora": n_lora,
        "build_s": round(build_s, 1),
        "trainer": "DPOTrainer",
    }
    train_and_report(args, trainer, recorder, device, meta)


def train_and_report(
    args: argparse.Namespace,
    trainer: Any,
    recorder: Recorder,
    device: torch.device,
    meta: dict[str, Any],
    extra_seconds: float = 0.0,
) -> None:
    """Train, then report the timed steps (rank 0 writes the JSON and prints RESULT).

    `extra_seconds`: time spent outside the timed steps that belongs to them (none today)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = device.type == "cuda"
    path = args.path
    targs = trainer.args
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0
    peak = max(recorder.peak_gib, torch.cuda.max_memory_allocated(device) / 2**30) if cuda else 0.0
    timed = [
        s
        for s in recorder.steps
        if s["step"] > args.warmup_steps
        and s["step"] not in (args.profile_step, args.cprofile_step)
    ]  # profilers slow their steps
    if world > 1:  # sum tokens/flops over ranks (each rank counted what it collated)
        for s in recorder.steps:
            t = torch.tensor(
                [s["tokens"], s["flops"], s["examples"]], dtype=torch.float64, device=device
            )
            torch.distributed.all_reduce(t)
            s["tokens"], s["flops"], s["examples"] = int(t[0]), float(t[1]), int(t[2])
        t = torch.tensor([peak], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        peak = float(t.item())
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(s["flops"] for s in timed)
    seconds += extra_seconds
    result = {
        "path": path,
        "method": args.method,
        "world_size": world,
        "global_batch": args.global_batch,
        **meta,
        "optimizer": targs.optim if isinstance(targs.optim, str) else targs.optim.value,
        "train_s": round(total_s, 1),
        "steps": recorder.steps,
        "timed_steps": [s["step"] for s in timed],
        "s_per_step": seconds / len(timed) if timed else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "tokens_per_s_per_gpu": tokens / seconds / world if seconds else None,
        "examples_per_step": timed[0]["examples"] if timed else None,
        "mfu": flops / seconds / (PEAK_FLOPS * world) if seconds and cuda else None,
        "peak_gib": round(peak, 2),
        "logs": recorder.logs,
        "finite_grads": all(
            math.isfinite(v["grad_norm"]) and math.isfinite(v["loss"])
            for v in recorder.logs.values()
        ),
        "profile": getattr(recorder, "profile_result", None),
        "host_profile": getattr(recorder, "host_profile", None),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
    }
    if rank == 0:
        out = Path(args.out) / f"{args.tag or ''}{args.method}-{path}-w{world}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        brief = {
            k: result[k]
            for k in (
                "path",
                "method",
                "world_size",
                "micro_batch",
                "accumulation",
                "s_per_step",
                "tokens_per_s",
                "mfu",
                "peak_gib",
                "finite_grads",
            )
        }
        print(
            "RESULT",
            json.dumps(brief),
            {k: round(v["loss"], 5) for k, v in result["logs"].items()},
            flush=True,
        )
    # Exit here, without a barrier or process-group teardown: after the 2-GPU run those hung
    # (NCCL/TCPStore broken pipes) past the printed results until the driver's timeout. Every
    # collective is done above; each rank leaves on its own and torchrun sees exit code 0.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(cmd: list[str], env: dict[str, str], timeout: int) -> int:
    try:
        return subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"== timed out after {timeout} s", flush=True)
        return 124


def finetune_train(args: argparse.Namespace, world: int, method: str, env: dict[str, str]) -> int:
    """`finetune-train JOB --nproc world` on the benchmark's model and rows, at the trainer's
    defaults (the global and micro-batch as given, the seed's by default); its
    progress.jsonl read back: tokens/s after the warm-up steps, peak memory, losses, plan."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fp32_reference as reference  # model and rows on disk, the job file

    cfg = model_config(args.tiny, args.layers)
    work = Path(args.work)
    model = reference.make_model(
        work / f"model-{cfg.hidden_size}x{cfg.num_hidden_layers}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    )
    overrides: dict[str, Any] = {
        "training.globalBatchSize": args.global_batch,
        "training.microBatchSize": args.micro_batch,
    }
    if args.zero_stage is not None:
        overrides["training.deepspeedZeroStage"] = args.zero_stage
    if method == "dpo":  # the very pairs the baseline trains on, with its tokenizer
        model = stub_tokenizer_copy(model, cfg.vocab_size)
        data = work / f"pairs-{args.examples}.jsonl"
        rows = synthetic_pairs(args.examples, cfg.vocab_size)
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        overrides["dpo.maxLength"] = args.dpo_max_length
    else:
        data = reference.make_data(work / f"alpaca-{args.examples}.json", args.examples)
    device = "cpu" if args.tiny_cpu else "cuda"
    output = work / f"run-{method}-w{world}"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    spec = reference.job(
        work / f"{method}-w{world}.yaml", model, data, device, args.steps, method, **overrides
    )
    command = [sys.executable, "-m", "finetune_trainer", str(spec), "--output", str(output)]
    command += ["--nproc", str(world)]
    trainer_path = [str(REPO / "trainer"), str(REPO / "operator"), env.get("PYTHONPATH", "")]
    run_env = {**env, "PYTHONPATH": os.pathsep.join(trainer_path)}
    if world == 1:
        run_env["CUDA_VISIBLE_DEVICES"] = args.gpu
    started = time.perf_counter()
    rc = run(command, run_env, args.run_timeout)
    records = []
    if (output / "progress.jsonl").exists():
        records = [
            json.loads(line) for line in (output / "progress.jsonl").read_text().split("\n") if line
        ]
    steps = [r for r in records if "loss" in r]
    seconds = tokens = 0.0
    previous = 0
    last = steps[-1]["step"] if steps else 0
    for record in steps:
        delta = record.get("tokens", 0) - previous
        previous = record.get("tokens", 0)
        rate = record.get("tokensPerSecond")
        # timed: after the warm-up (compilation, graph captures), before the last step (the
        # end of training lands in it)
        if args.warmup_steps < record["step"] < last and rate:
            tokens += delta
            seconds += delta / rate
    plan: dict[str, Any] = next((r for r in records if r.get("event") == "plan"), {})
    result = {
        "path": "finetune-train",
        "method": method,
        "world_size": world,
        "exit": rc,
        "wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": tokens / seconds if seconds else None,
        "tokens_per_s_per_gpu": tokens / seconds / world if seconds else None,
        "peak_gib": round(max((r.get("peakMemoryBytes") or 0) for r in steps) / 2**30, 2)
        if steps
        else None,
        "logs": {r["step"]: {"loss": r["loss"], "grad_norm": r.get("gradNorm")} for r in steps},
        "plan": {k: v for k, v in plan.items() if k != "event"},
        "torch": torch.__version__,
    }
    name = f"{args.tag or ''}{method}-finetune-train-w{world}"
    out = (
        Path(args.out)
        / f"{name}{'' if args.zero_stage is None else f'-zero{args.zero_stage}'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: result[k] for k in ("method", "world_size", "exit", "tokens_per_s", "peak_gib")}
    print("RESULT", json.dumps(brief), json.dumps(result["logs"]), flush=True)
    return rc


def stub_tokenizer_copy(model: Path, vocab: int) -> Path:
    """The saved model with `tokenizer_stub` as its tokenizer ("t5 t9" is ids 5, 9), as the
    baseline's DPO pairs are written: links to the weights, nothing copied."""
    stub = model.with_name(model.name + "-stub")
    stub.mkdir(exist_ok=True)
    for item in model.iterdir():
        if item.suffix in (".safetensors", ".json") and "token" not in item.name:
            link = stub / item.name
            if not link.exists():
                link.symlink_to(item)
    tokenizer_stub(vocab).save_pretrained(str(stub))
    return stub


def driver(args: argparse.Namespace) -> int:
    env = {**os.environ, **NCCL_SAFE, "PYTHONUNBUFFERED": "1"}
    failures = 0
    for world in [int(w) for w in args.worlds.split(",")]:
        for method in args.methods.split(","):
            for path in args.paths.split(","):
                if path == "finetune-train":
                    print(f"== {method} finetune-train world {world}", flush=True)
                    failures += finetune_train(args, world, method, env) != 0
                    continue
                if path != "baseline":
                    raise SystemExit(f"unknown path {path}: baseline or finetune-train")
                base = [
                    f"--{k.replace('_', '-')}={v}"
                    for k, v in vars(args).items()
                    if k
                    not in (
                        "paths",
                        "methods",
                        "worlds",
                        "child",
                        "path",
                        "method",
                        "steps",
                        "profile_step",
                        "tiny",
                        "tiny_cpu",
                        "torchrun",
                        "gpu",
                    )
                    and v is not None
                ]
                flags = [
                    *base,
                    f"--path={path}",
                    f"--method={method}",
                    f"--steps={args.baseline_steps}",
                    "--child",
                ]
                flags += ["--tiny"] * args.tiny + ["--tiny-cpu"] * args.tiny_cpu
                if args.profile_step and world == 1:
                    flags.append(f"--profile-step={args.profile_step}")
                if world > 1 or args.torchrun:
                    cmd = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        f"--nproc-per-node={world}",
                        "--master-port=29533",
                        __file__,
                        *flags,
                    ]
                else:
                    cmd = [sys.executable, __file__, *flags]
                run_env = dict(env)
                if world == 1 and not args.torchrun:  # else Trainer takes every GPU (DataParallel)
                    run_env["CUDA_VISIBLE_DEVICES"] = args.gpu
                print(f"== {method} {path} world {world}: {' '.join(cmd[-6:])}", flush=True)
                t0 = time.perf_counter()
                rc = run(cmd, run_env, args.run_timeout)
                print(f"== rc {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
                failures += rc != 0
    return failures


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--paths", default="baseline,finetune-train")
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--worlds", default="1", help="driver: world sizes (torchrun --nproc-per-node)")
    p.add_argument(
        "--torchrun", action="store_true", help="driver: launch world 1 through torchrun too"
    )
    p.add_argument("--gpu", default="0", help="driver: the GPU for world-1 runs")
    p.add_argument("--child", action="store_true")
    p.add_argument("--path", default="baseline")
    p.add_argument("--work", default="/tmp/train-throughput", help="saved model, rows, runs")
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--baseline-steps", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--dpo-max-length", type=int, default=1536, help="DPO: prompt + response")
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument(
        "--zero-stage", type=int, default=None, help="finetune-train: deepspeedZeroStage (full)"
    )
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tiny-cpu", action="store_true")
    p.add_argument("--profile-step", type=int, default=None, help="torch.profiler over it")
    p.add_argument(
        "--profile-micro-batches",
        type=int,
        default=None,
        help="torch.profiler: stop after this many micro-batches of the profiled step",
    )
    p.add_argument("--cprofile-step", type=int, default=None, help="cProfile over it (host)")
    p.add_argument("--run-timeout", type=int, default=900)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "raw"))
    args = p.parse_args()
    if args.child:
        # the trainer's own lines (graph captures and what each kept, perf switches applied)
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("finetune_trainer").setLevel(logging.INFO)
        child(args)
    else:
        sys.exit(driver(args))


if __name__ == "__main__":
    main()
