"""What runs: every optimisation decided once, from (resolved config, device, world).

`make_plan` is pure (tests check its decisions per device); `Plan.training_arguments` are the
switches the Trainer's arguments carry, and `apply_plan` does the rest on the built Trainer.
Nothing else in the trainer branches on the device or on a performance switch.

What each device gets (speed and closeness to an fp32 reference: benchmarks/README.md):

| optimisation | cuda | xpu | cpu |
|---|---|---|---|
| packed rows, block mask (paddingFree) | yes | yes | no (transformers' flattening collator) |
| no host syncs per micro-batch, pinned non-blocking batches | yes | yes | no |
| fused AdamW (`adamw_torch` -> `adamw_torch_fused`) | yes | yes | no |
| host-side token count | yes | yes | yes |
| compiled decoder layers (fusedKernels) | yes | experimental | no |
| graphs of the decoder stack (fixed micro-batch, row <= 1024 tokens) | yes | experimental | no |
| Liger kernels where installed | yes | experimental | no |
| steps' examples dealt to ranks by tokens (packed rows, fixed micro-batch) | yes | yes | dpo |
| one all-reduce per optimizer step, no DDP wrapper (world > 1) | yes | yes | yes |

"experimental": written against the device module (`torch.xpu.graph`, `torch.compile`),
never run on Intel hardware here, so off unless FINETUNE_XPU_EXPERIMENTAL=1.
DeepSpeed (training.deepspeedZeroStage) owns the gradients: no graphs and no own all-reduce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pydantic.alias_generators import to_camel

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer import perf

log = logging.getLogger(__name__)

# The one switch for what is written for XPU but not proven on Intel hardware.
XPU_EXPERIMENTAL_ENV = "FINETUNE_XPU_EXPERIMENTAL"

# Rows are rounded up to this many tokens under graphs (one graph set per width), to 64
# otherwise (a few compiled shapes). With `microBatchSize: auto`, rows hold up to
# AUTO_ROW_TOKENS tokens: a large micro-batch in one row would make attention quadratic in it.
GRAPH_BUCKET = 128
GRAPH_ROW_LIMIT = 1024
COMPILED_BUCKET = 64
AUTO_ROW_TOKENS = 1024


@dataclass(frozen=True)
class Capabilities:
    """What the installed software offers on this device (detected, or given by tests)."""

    liger: bool = False
    graphs: bool = False  # the device module can capture graphs (torch.cuda / torch.xpu)
    xpu_experimental: bool = False

    @classmethod
    def detect(cls, device_kind: str) -> Capabilities:
        module = getattr(torch, device_kind, None)
        return cls(
            liger=perf.liger_available(),
            graphs=device_kind != "cpu"
            and all(hasattr(module, n) for n in ("graph", "graph_pool_handle")),
            xpu_experimental=os.environ.get(XPU_EXPERIMENTAL_ENV, "") not in ("", "0"),
        )


@dataclass(frozen=True)
class Plan:
    """The optimisations one run applies. Every field is exact (the loss and gradient of the
    plain recipe up to bf16 rounding) unless its comment says otherwise."""

    device_kind: str
    world_size: int
    packing: bool = False  # padding-free rows with a 4D block mask (perf.PackingCollator)
    row_multiple: int = COMPILED_BUCKET  # packed rows rounded up to this many tokens
    row_tokens: int | None = None  # rows of at most this many tokens; None: one row
    no_host_syncs: bool = False  # no NaN filter, pinned non-blocking batches
    fused_optimizer: bool = False  # adamw_torch runs as adamw_torch_fused
    compile_layers: bool = False
    graphs: bool = False
    graph_checkpointing: bool = False  # checkpointing inside the graphs (the model's off)
    liger_loss: bool = False
    liger_layers: bool = False
    lean_lora: bool = False
    balanced_ranks: bool = False  # data_parallel.BalancedSampler
    one_all_reduce: bool = False  # data_parallel.OneAllReduce, the model not wrapped in DDP

    @property
    def stable_gradients(self) -> bool:
        """`.grad` kept in one preallocated buffer: graphs add into it, the all-reduce reads it."""
        return self.graphs or self.one_all_reduce

    def options(self) -> perf.PerfOptions:
        return perf.PerfOptions(
            compile_layers=self.compile_layers,
            liger_loss=self.liger_loss,
            liger_layers=self.liger_layers,
            cuda_graphs=self.graphs,
            graph_checkpointing=self.graph_checkpointing,
            lean_lora=self.lean_lora,
        )

    def training_arguments(self, optimizer: str) -> dict[str, Any]:
        """What the Trainer's arguments carry for this plan."""
        arguments: dict[str, Any] = {"use_liger_kernel": False}  # apply_plan applies Liger
        if self.no_host_syncs:
            arguments |= {
                "logging_nan_inf_filter": False,
                "dataloader_pin_memory": True,
                "accelerator_config": {"non_blocking": True},
            }
        if self.fused_optimizer and optimizer == "adamw_torch":
            arguments["optim"] = "adamw_torch_fused"
        return arguments

    def describe(self) -> dict[str, Any]:
        """The fields that are on, camelCase (as progress.jsonl records are)."""
        fields = asdict(self)
        if not self.packing:
            del fields["row_multiple"]
        return {to_camel(k): v for k, v in fields.items() if v not in (False, None)}


def make_plan(
    config: ResolvedConfig, device_kind: str, world_size: int, capabilities: Capabilities
) -> Plan:
    """The plan for this run. Pure: the same inputs give the same plan on every rank."""
    accelerated = device_kind in ("cuda", "xpu")
    proven = device_kind == "cuda" or (device_kind == "xpu" and capabilities.xpu_experimental)
    fused = config.fused_kernels and proven
    fixed_micro = isinstance(config.micro_batch_size, int)
    deepspeed = config.deepspeed_zero_stage is not None
    dpo = config.method is Method.DPO
    packing = config.padding_free and (accelerated or dpo)
    if dpo:
        graphs = fused and packing and fixed_micro and capabilities.graphs and not deepspeed
    else:
        graphs = (
            fused
            and packing
            and capabilities.graphs
            and not deepspeed
            and isinstance(config.micro_batch_size, int)
            and config.micro_batch_size * config.cutoff_len <= GRAPH_ROW_LIMIT
            and not config.gradient_checkpointing
        )
    data_parallel = world_size > 1 and not deepspeed
    return Plan(
        device_kind=device_kind,
        world_size=world_size,
        packing=packing,
        row_multiple=GRAPH_BUCKET if graphs else COMPILED_BUCKET,
        row_tokens=None if fixed_micro else max(AUTO_ROW_TOKENS, config.cutoff_len),
        no_host_syncs=accelerated and (packing or not dpo),
        fused_optimizer=accelerated and (packing or not dpo),
        # DPO: eager layers inside the graphs (compiled, its later losses parted from every
        # other path's), Liger's layers and the lean LoRA forward instead
        compile_layers=fused and not dpo,
        graphs=graphs,
        graph_checkpointing=graphs and dpo and config.gradient_checkpointing,
        liger_loss=fused and not dpo and not graphs and capabilities.liger,
        liger_layers=graphs and dpo and capabilities.liger,
        lean_lora=graphs and dpo,
        # at every world size, so that each step's examples are the same at any world size
        balanced_ranks=packing and fixed_micro,
        one_all_reduce=data_parallel,
    )


def apply_plan(trainer: Any, plan: Plan, token_count: Any) -> Any:
    """Everything the plan does to a built Trainer (or TRL DPOTrainer), in one place:
    the model's kernels and graphs, the gradient buffer, the all-reduce, the sampler, and
    the Trainer's repeated host work done once."""
    from finetune_trainer.data_parallel import (
        BalancedSampler,
        OneAllReduce,
        dataset_lengths,
    )

    model = trainer.model
    perf.optimize_model(model, plan.options())
    if plan.stable_gradients:
        gradients = perf.StableGradients(model)
        trainer.add_callback(gradients.callback())
        if plan.one_all_reduce:
            trainer.one_all_reduce = OneAllReduce(gradients)
            trainer.one_all_reduce.install(trainer)
    if plan.balanced_ranks and trainer.train_dataset is not None:
        args = trainer.args
        micro = args.per_device_train_batch_size
        sampler = BalancedSampler(
            dataset_lengths(trainer.train_dataset, token_count),
            window=micro * args.gradient_accumulation_steps * plan.world_size,
            world=plan.world_size,
            micro=micro,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        trainer._get_train_sampler = lambda *a, **k: sampler
    log.info("plan: %s", ", ".join(f"{k}={v}" for k, v in plan.describe().items()))
    return perf.trim_repeated_host_work(trainer)


__all__ = ["Capabilities", "Plan", "apply_plan", "make_plan"]
