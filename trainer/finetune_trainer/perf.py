"""Performance switches for the trainer, as library calls; which ones run is decided in plan.py.

`HostTokenCounter` keeps `state.num_input_tokens_seen` (read by progress.py for tokens/s)
without the per-micro-batch device sync. For `microBatchSize: auto`, after the model is built
and the process group is up: `auto_micro_batch(step, global, world, budget)` with
`step = lambda m: probe_step(model, worst_case_batch(m, cutoff, vocab, collator, device))`,
all-reduce(min) the result over ranks, then set per_device_train_batch_size and
gradient_accumulation_steps = global // (micro x world) (train.probe_micro_batch).

What each does, and why:

* Padding-free packing (`PackingCollator`): a micro-batch's examples are laid end to end in
  rows of at most `row_tokens` tokens (one row at the default micro-batch 2), position ids
  restart at 0 for each example, and a 4D block-diagonal causal mask keeps attention inside
  each example. The first label of every example is IGNORE_INDEX, so the last token of one
  example never learns to predict the first token of the next. Row lengths are rounded up to
  `pad_to_multiple_of` (a handful of shapes); the pad tail is its own segment (it attends to
  itself, never to real tokens, so no attention row is fully masked and no NaN comes from
  SDPA's backward). Why a 4D mask rather than transformers' position-id detection: that
  detection (`find_packed_sequence_indices`) does a `.all()` on a device tensor, a host sync
  in every forward, and it builds the same dense mask anyway; the 4D mask is built on the
  CPU in the collator, travels pinned and non-blocking, and SDPA uses it as is.
* Fused kernels: regional `torch.compile` of each decoder layer (one compiled graph shared by
  all layers, dynamic sequence length so the buckets need no recompiles) fuses RMSNorm, RoPE,
  SwiGLU, LoRA dropout/scale and the residual adds into a few Triton kernels and cuts the
  ~8,800 launches per micro-batch of the plain recipe by an order of magnitude; Liger's fused
  linear cross-entropy replaces the head + loss (no [tokens, vocab] logits in memory). Where
  compilation is off, Liger's RMSNorm/SwiGLU/RoPE kernels are used instead.
* No host syncs inside the accumulation loop: Trainer's NaN filter (`logging_nan_inf_filter`)
  and the input-token counter (`include_num_input_tokens_seen`) each force a device sync per
  micro-batch; both off. Batches are pinned and copied non-blocking.
* Fused optimizer: `adamw_torch` -> `adamw_torch_fused` (the same AdamW, one kernel).
* Lean LoRA forward (`lean_lora.py`, DPO under graphs): peft's per-adapter fp32 round trip
  of the input, and its scale and add, become dropout in bf16 plus one in-place GEMM; the
  elementwise third of a DPO micro-batch's GPU time mostly goes.
* CUDA graphs (`cuda_graphs.py`, where the plan has `graphs`): the whole decoder stack replayed as one
  forward and one backward graph per row width, the layers compiled inside; at micro-batch 2
  the step was launch- and Python-bound, and this makes it ~85% GPU-bound (5.8x LoRA, 6.7x
  QLoRA on an H200). `trim_repeated_host_work` removes the Trainer's own per-micro-batch
  walks over the model.
* `auto_micro_batch`: the largest micro-batch that fits the device's memory, measured with a
  worst-case (every example at cutoff length) forward+backward, among the sizes that divide
  the per-rank share of the global batch, so accumulation is recomputed and the global batch
  (and, with the token-normalised loss, the gradient) is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Padding-free packing
# --------------------------------------------------------------------------------------------


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Greedy in-order packing of examples (by index) into rows of at most row_tokens tokens.

    In order, so the examples of a micro-batch (and of a global batch) are the same ones the
    padded collator would see; an example longer than row_tokens gets a row of its own.
    """
    rows: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if rows and used + length <= row_tokens:
            rows[-1].append(index)
            used += length
        else:
            rows.append([index])
            used = length
    return rows


def pack_rows_tightly(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: the longest first, each into the first row with room. Fewer and
    fuller rows than `pack_rows` where the order of a micro-batch's examples does not matter
    (DPO's sequences are summed per segment id, wherever they lie)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, u in enumerate(used) if u + lengths[index] <= row_tokens), None)
        if row is None:
            rows.append([index])
            used.append(lengths[index])
        else:
            rows[row].append(index)
            used[row] += lengths[index]
    return rows


@dataclass
class PackingCollator:
    """Padding-free collator: packed rows, restarting position ids, block-diagonal 4D mask.

    Takes the tokenized features the trainer already makes (input_ids, labels, optionally
    attention_mask, all unpadded). `row_tokens` None packs the whole micro-batch into one row.
    `pad_token_id` fills the tail of each row (its labels are IGNORE_INDEX).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int = 64
    row_tokens: int | None = None
    return_4d_mask: bool = True

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        if self.row_tokens is None:
            rows = [list(range(len(features)))]
        else:
            rows = pack_rows(lengths, max(self.row_tokens, 1))
        longest = max(sum(lengths[i] for i in row) for row in rows)
        multiple = max(self.pad_to_multiple_of, 1)
        width = int(math.ceil(longest / multiple) * multiple)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        # segment id per token; the pad tail gets a segment of its own (-1)
        segments = torch.full((n, width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row):
                ids = features[i]["input_ids"]
                lab = features[i].get("labels", ids)
                length = lengths[i]
                input_ids[r, at : at + length] = torch.as_tensor(ids, dtype=torch.long)
                labels[r, at : at + length] = torch.as_tensor(lab, dtype=torch.long)
                labels[r, at] = IGNORE_INDEX  # never predicted: it starts a new example
                position_ids[r, at : at + length] = torch.arange(length)
                segments[r, at : at + length] = s
                at += length
            position_ids[r, at:] = torch.arange(width - at)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.return_4d_mask:
            batch["attention_mask"] = block_causal_mask(segments)
        return batch


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] bool: query i sees key j iff j <= i and both lie in the same segment."""
    width = segments.shape[-1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same & causal)[:, None]


# --------------------------------------------------------------------------------------------
# Trainer host work
# --------------------------------------------------------------------------------------------


def trim_repeated_host_work(trainer: Any) -> Any:
    """Work transformers' Trainer repeats every micro-batch, done once: exact, same values.

    Profiled on an H200 with the 7B-shaped LoRA model at micro-batch 2 (cProfile,
    benchmarks/README.md): `Trainer.floating_point_ops` recounts the parameters (a walk over
    every module) and `training_step` calls `model.train()` (another walk, ~2,700 modules),
    together ~70 ms of Python per micro-batch under the profiler: more than the GPU's work
    for ~300 tokens. The count is taken once; `train(mode)` returns at once when every module
    is already in that mode (checked on a flat list: ~0.1 ms), else does the full walk.
    """
    model = trainer.model
    main_input = getattr(model, "main_input_name", "input_ids")
    parameters = (
        model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
    )

    def floating_point_ops(inputs: dict[str, Any]) -> int:
        # Trainer's own formula (6 x tokens x non-embedding parameters), counted once
        if main_input in inputs and parameters:
            return int(6 * inputs[main_input].numel() * parameters)
        return 0

    trainer.floating_point_ops = floating_point_ops
    modules = list(model.modules())
    full_train = model.train

    def train(mode: bool = True) -> Any:
        if all(m.training == mode for m in modules):
            return model
        return full_train(mode)

    model.train = train
    return trainer


def preference_tokens(max_length: int | None) -> Callable[[dict[str, Any]], int]:
    """Non-padding tokens of one tokenized preference pair (TRL's prompt_ids, chosen_ids,
    rejected_ids): prompt + chosen and prompt + rejected, each cut at max_length as the
    collators cut them."""

    def count(feature: dict[str, Any]) -> int:
        prompt = len(feature["prompt_ids"])
        total = 0
        for key in ("chosen_ids", "rejected_ids"):
            length = prompt + len(feature[key])
            total += min(length, max_length) if max_length else length
        return total

    return count


class HostTokenCounter:
    """Counts non-padding input tokens on the host, at collation: no device sync.

    Wraps a collator (`collate = HostTokenCounter(collator)`), and as a TrainerCallback
    (`callbacks=[..., collate.callback(world_size)]`) writes the count into
    `state.num_input_tokens_seen` at each optimizer step, so progress reporting that reads
    it keeps working with `include_num_input_tokens_seen="no"`. Each rank counts what it
    collates; the count is scaled by the world size (ranks get equal numbers of examples,
    lengths differ a little, so it is an estimate within a few percent, like the per-step
    rate itself). accelerate prefetches one micro-batch, so the count runs one micro-batch
    ahead.
    """

    def __init__(
        self,
        collator: Callable[[Sequence[dict[str, Any]]], Any],
        count: Callable[[dict[str, Any]], int] | None = None,
    ) -> None:
        self.collator = collator
        self.count = count or (lambda feature: len(feature["input_ids"]))
        self.tokens = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> Any:
        self.tokens += sum(self.count(f) for f in features)
        return self.collator(features)

    def callback(self, world_size: int = 1) -> Any:
        from transformers import TrainerCallback

        counter = self

        class _Tokens(TrainerCallback):
            # Evaluation collates with the same collator, after a step ends and before the
            # next training batch is fetched: what it counted is taken back when it ends.
            at_step_end = 0

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                state.num_input_tokens_seen = counter.tokens * world_size
                self.at_step_end = counter.tokens

            def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                counter.tokens = self.at_step_end

        return _Tokens()


# --------------------------------------------------------------------------------------------
# Model: fused kernels and compilation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfOptions:
    compile_layers: bool = True
    liger_loss: bool = True  # Liger's fused linear cross-entropy (CUDA/XPU, needs liger_kernel)
    liger_layers: bool = False  # Liger's RMSNorm/SwiGLU/RoPE (used when compile_layers is off)
    # CUDA graphs over the decoder stack, captured by hand per row width (cuda_graphs.py): one
    # forward and one backward replay per micro-batch. With compile_layers the layers are
    # compiled inside the graphs; without, liger_layers applies. Needs StableGradients as a
    # callback, and the model's own gradient checkpointing off: `graph_checkpointing` does it
    # inside the graphs instead (torch's checkpoint keeps RNG state on the host, which a
    # capture forbids; cuda_graphs.LayerRng says how this one stays exact).
    cuda_graphs: bool = False
    graph_checkpointing: bool = False
    # peft's LoRA forward without its per-adapter fp32 round trip, the scale and add inside
    # the adapter's GEMM (lean_lora.py; exact up to bf16 rounding, under autocast only)
    lean_lora: bool = False


# DPO under CUDA graphs: rows of exactly this many tokens, so a micro-batch's shape is its row
# count: a few graph sets. Measured on an H200 (benchmarks/README.md): attention
# over rows of 4096 took 2.8x the time of rows of 1024 for the same tokens. A micro-batch with
# a longer sequence has rows of that length rounded up to DPO_GRAPH_ROW_BUCKET (rows of 1536
# for DPO's max_length 1536, not of 2048: the widest set sets the peak memory).
DPO_GRAPH_ROW_TOKENS = 1024
DPO_GRAPH_ROW_BUCKET = 512


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside DDP and peft wrappers (or the model itself).

    Not `hasattr(model, "lm_head")`: peft wrappers forward attribute lookups to the wrapped
    model, so they answer yes too.
    """
    inner = model
    for _ in range(5):
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):  # peft's PeftModelForCausalLM too
            inner = inner.get_base_model()
        elif type(inner).__name__.endswith("ForCausalLM"):
            return inner
        elif isinstance(getattr(inner, "model", None), torch.nn.Module):
            inner = inner.model
        else:
            break
    return inner


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def apply_liger(model: Any, layers: bool, loss: bool) -> bool:
    """Liger kernels on a (peft-wrapped) Llama instance; False if liger or the model won't."""
    if not (layers or loss):
        return False
    lm = causal_lm(model)
    if getattr(lm.config, "model_type", None) != "llama" or not liger_available():
        return False
    from types import MethodType

    from liger_kernel.transformers import monkey_patch as liger

    # The patches of apply_liger_kernel_to_llama(model=...), done here on the unwrapped
    # LlamaForCausalLM (a peft wrapper forwards attribute lookups, so handing liger the
    # wrapper makes it look for the decoder on the wrong object). This is what was measured.
    if layers:
        from transformers.models.llama import modeling_llama

        modeling_llama.apply_rotary_pos_emb = liger.liger_rotary_pos_emb
        liger._patch_rms_norm_module(lm.model.norm)
        for layer in lm.model.layers:
            liger._patch_swiglu_module(layer.mlp, liger.LigerSwiGLUMLP)
            liger._patch_rms_norm_module(layer.input_layernorm)
            liger._patch_rms_norm_module(layer.post_attention_layernorm)
    if loss:
        lm.forward = MethodType(liger.llama_lce_forward, lm)
    return True


def _compile_settings() -> None:
    """Inductor settings for compiled decoder layers, set before the first compile.

    * Room in dynamo's cache: every layer module is its own guard target, and each length
      bucket may add one.
    * Eager numerics under bf16 autocast (`emulate_precision_casts`): by default inductor drops
      the bf16 round trips between the ops it fuses. In a LoRA layer that keeps the adapter's
      small contribution in fp32 in some fused consumers and not in others, and the loss then
      falls two to three times as fast as the fp32 reference's after the first update
      (benchmarks/README.md, "closeness to fp32"). With the round trips kept, compiled layers
      compute what the eager layers compute. fp32 training is unaffected (no casts to keep).
    """
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._inductor.config.emulate_precision_casts = True


def compile_decoder_layers(model: Any, dynamic: bool | None = True) -> int:
    """Regional torch.compile: each decoder layer compiled in place (one graph for all)."""
    _compile_settings()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def optimize_model(model: Any, options: PerfOptions) -> Any:
    """Apply the fused-kernel switches in place; returns the model for chaining."""
    applied = []
    if apply_liger(
        model, layers=options.liger_layers and not options.compile_layers, loss=options.liger_loss
    ):
        applied.append("liger")
    if options.lean_lora:
        from finetune_trainer import lean_lora

        applied.append(f"lean LoRA forward on {lean_lora.install(model)} projections")
    if options.cuda_graphs:
        from finetune_trainer.cuda_graphs import GraphedLayers

        if options.compile_layers:  # compiled inside the graphs
            _compile_settings()
        graphed = GraphedLayers(
            decoder_layers(model),
            compile_layers=options.compile_layers,
            checkpoint=options.graph_checkpointing,
        )
        applied.append(
            f"CUDA graphs over {len(graphed.layers)} decoder layers"
            + (" (compiled inside)" if options.compile_layers else "")
            + (" (checkpointed inside)" if options.graph_checkpointing else "")
        )
    elif options.compile_layers:
        count = compile_decoder_layers(model)
        applied.append(f"compiled {count} decoder layers")
    log.info("perf: %s", ", ".join(applied) or "nothing applied")
    return model


class StableGradients:
    """Keeps every trainable parameter's `.grad` in one preallocated buffer, zeroed in place.

    Why: under CUDA graphs (`cuda_graphs`) the graphed backward writes each gradient into
    graph-owned memory that the next replay overwrites. With `.grad` None, autograd's
    AccumulateGrad adopts that tensor as `.grad` (no copy), and the next micro-batch of the
    same optimizer step would overwrite the gradient accumulated so far. With a `.grad` already
    there, AccumulateGrad adds into it. Trainer sets `.grad` to None after each optimizer step
    (`model.zero_grad()`), so this TrainerCallback (`callbacks=[..., StableGradients(model)]`)
    puts the views back and zeroes the buffer (one kernel) before each step's first backward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.views: list[torch.Tensor] = []
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in self.params:
            key = (p.device, p.dtype)
            sizes[key] = sizes.get(key, 0) + p.numel()
        offsets = dict.fromkeys(sizes, 0)
        for key, size in sizes.items():
            self.buffers[key] = torch.zeros(size, device=key[0], dtype=key[1])
        for p in self.params:
            key = (p.device, p.dtype)
            start = offsets[key]
            self.views.append(self.buffers[key][start : start + p.numel()].view_as(p))
            offsets[key] = start + p.numel()

    def attach(self) -> None:
        """Point each `.grad` at its view and zero the buffers (if the Trainer dropped them)."""
        if all(p.grad is not None for p in self.params):
            return
        for buffer in self.buffers.values():
            buffer.zero_()
        for p, view in zip(self.params, self.views, strict=True):
            p.grad = view

    def callback(self) -> Any:
        from transformers import TrainerCallback

        owner = self

        class _Attach(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                owner.attach()

        return _Attach()


# --------------------------------------------------------------------------------------------
# microBatchSize: auto
# --------------------------------------------------------------------------------------------


def candidate_micro_batches(
    global_batch: int, world_size: int, limit: int | None = None
) -> list[int]:
    """Micro-batch sizes that keep the batch rule whole: divisors of the per-rank share."""
    per_rank = global_batch // world_size
    sizes = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    return [m for m in sizes if limit is None or m <= limit]


def auto_micro_batch(
    train_step: Callable[[int], None],
    global_batch: int,
    world_size: int,
    memory_budget: int,
    start: int = 2,
    device_type: str = "cuda",
) -> tuple[int, dict[int, int]]:
    """The largest candidate micro-batch whose worst-case step fits memory_budget bytes.

    `train_step(m)` runs one forward+backward of a worst-case micro-batch of m examples (all at
    cutoff length) on the real model and leaves no gradients behind. Peak memory is read for
    two sizes and extrapolated linearly (activations grow with the tokens), then the chosen
    size is run once to confirm; an out-of-memory there steps down. Returns the size and the
    measured peaks. Every rank must call it with the same arguments (same device kind) so
    all ranks pick the same size; the caller may all-reduce(min) the result to be sure.
    `device_type` "cuda" or "xpu": torch.cuda and torch.xpu have the same memory API.
    """
    sizes = candidate_micro_batches(global_batch, world_size)
    measured: dict[int, int] = {}
    accel: Any = getattr(torch, device_type)

    def peak(m: int) -> int:
        accel.empty_cache()
        accel.reset_peak_memory_stats()
        train_step(m)
        accel.synchronize()
        measured[m] = int(accel.max_memory_allocated())
        return measured[m]

    small = max([s for s in sizes if s <= start] or [sizes[0]])
    bigger = [s for s in sizes if s > small]
    if not bigger:
        return small, measured
    p1 = peak(small)
    second = bigger[0]
    p2 = peak(second)
    slope = max((p2 - p1) / (second - small), 1.0)
    fits = [s for s in sizes if p1 + (s - small) * slope <= memory_budget]
    choice = max(fits) if fits else small
    while choice > second:
        try:
            if peak(choice) <= memory_budget:
                break
        except torch.OutOfMemoryError:
            log.warning("auto micro-batch: %d ran out of memory, stepping down", choice)
        accel.empty_cache()
        choice = max(s for s in sizes if s < choice)
    return choice, measured


def worst_case_batch(
    micro_batch: int,
    cutoff_len: int,
    vocab_size: int,
    collator: Callable[[list[dict[str, Any]]], Any],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """A micro-batch of `micro_batch` examples at cutoff length (random ids), collated."""
    generator = torch.Generator().manual_seed(0)
    features = []
    for _ in range(micro_batch):
        ids = torch.randint(3, vocab_size, (cutoff_len,), generator=generator).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * cutoff_len, "labels": ids})
    batch = collator(features)
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def probe_step(model: Any, batch: dict[str, torch.Tensor], bf16: bool = True) -> None:
    """One forward+backward as training does it (autocast bf16), gradients dropped after."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


__all__ = [
    "IGNORE_INDEX",
    "HostTokenCounter",
    "PackingCollator",
    "PerfOptions",
    "StableGradients",
    "auto_micro_batch",
    "block_causal_mask",
    "candidate_micro_batches",
    "compile_decoder_layers",
    "optimize_model",
    "pack_rows",
    "probe_step",
    "worst_case_batch",
]
