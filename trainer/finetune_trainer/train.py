"""The recipe, top to bottom: config -> device -> data -> model -> Trainer -> resume -> save.

Built on transformers' Trainer (TRL's DPOTrainer for dpo). What they already do right is
used as is, in particular the loss normalisation: with a model that accepts
`num_items_in_batch` (every causal LM here) the Trainer counts the label tokens of all
micro-batches of the optimizer step, sums that count over ranks
(`average_tokens_across_devices`, on by default) and each micro-batch's loss is
sum(token losses) / that count, times the world size to undo DDP's gradient mean. So the
gradient is the mean over every label token of the global batch, however the batch is split
(tests/trainer check it: world 1 x accumulation 4 == world 2 x accumulation 2).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers.trainer_callback import PrinterCallback

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig, SpecError
from finetune_trainer import perf
from finetune_trainer.checks import preflight
from finetune_trainer.config import World, check_batch_rule, format_table, reconcile_world
from finetune_trainer.data import build_collator, build_datasets
from finetune_trainer.device import OOM_ADVICE, DeviceInfo, importable, is_oom, select_device
from finetune_trainer.fetch import fetch_config_items
from finetune_trainer.model import load_tokenizer, lora_config, prepare_model
from finetune_trainer.plan import Capabilities, Plan, apply_plan, make_plan
from finetune_trainer.progress import ProgressCallback, StatusPatcher, use_terminal_bar
from finetune_trainer.resume import check_resume, remember_config
from finetune_trainer.save import (
    CheckpointMarker,
    is_complete,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
    save_final,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped for a reason a person can act on; the message says how."""


@dataclass(frozen=True)
class RunResult:
    output: Path
    summary: dict[str, Any]
    resumed_from: Path | None


# --------------------------------------------------------------------------------------------
# microBatchSize: auto
# --------------------------------------------------------------------------------------------

# Budget: this fraction of the device's total memory for the probe's worst-case peak. 0.8, as
# measured in benchmarks/train_throughput.py (ours-auto chose 32 for a 7B LoRA at cutoff 256
# on an H200, 50.5 GiB peak): the probe reads max_memory_allocated, which leaves out the caching
# allocator's fragmentation over the many row shapes of real batches, the CUDA/XPU context,
# cuBLAS workspaces and NCCL/oneCCL buffers, and the error of the linear extrapolation between
# measured sizes; 20% covers those with room to spare, 10% would not always.
MEMORY_FRACTION = 0.8
# Where no memory is measured (CPU; DPO, whose chosen+rejected pairs the probe does not
# model): the largest micro-batch up to this that divides the per-rank share. 4 is DPO's
# default micro-batch (4 pairs = 8 sequences), a size IPEX-LLM's DPO example runs on any device.
RULE_LIMIT = 4


@dataclass(frozen=True)
class MicroBatchChoice:
    """What `microBatchSize: auto` chose, and from what."""

    micro: int
    accumulation: int
    how: str  # "probe" or "rule"
    budget: int | None = None
    peaks: dict[int, int] = field(default_factory=dict)  # micro-batch -> peak bytes measured


def decide_micro_batch(
    global_batch: int,
    world_size: int,
    step: Callable[[int], None] | None,
    memory_budget: int = 0,
    device_type: str = "cuda",
    agree: Callable[[int], int] | None = None,
) -> MicroBatchChoice:
    """The micro-batch for `auto`: measured where `step` is given, else the rule.

    `step(m)`: one worst-case forward+backward at micro-batch m (`perf.probe_step`); with it,
    `perf.auto_micro_batch` picks the largest divisor of the per-rank share whose measured
    (and extrapolated, then confirmed) peak fits `memory_budget` bytes on `device_type`'s
    memory counters. Without it: the largest divisor up to RULE_LIMIT. `agree` makes the ranks
    agree (all-reduce min: a size that fits on every rank); a min of divisors of the same
    per-rank share is one of them, so the batch rule holds and the global batch is unchanged.
    """
    per_rank = global_batch // world_size
    peaks: dict[int, int] = {}
    if step is not None:
        micro, peaks = perf.auto_micro_batch(
            step, global_batch, world_size, memory_budget, start=2, device_type=device_type
        )
        how = "probe"
    else:
        micro = max(perf.candidate_micro_batches(global_batch, world_size, RULE_LIMIT) or [1])
        how = "rule"
    if agree is not None:
        micro = agree(micro)
    return MicroBatchChoice(
        micro=micro,
        accumulation=max(per_rank // micro, 1),
        how=how,
        budget=memory_budget if step is not None else None,
        peaks=peaks,
    )


def min_over_ranks(value: int, device: torch.device) -> int:
    """all-reduce(MIN) of one integer over the process group (itself when there is none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def probes_memory(config: ResolvedConfig, device: DeviceInfo) -> bool:
    """`auto` is measured on CUDA and XPU for lora/qlora/full; DPO and CPU take the rule."""
    return (
        config.micro_batch_size == "auto"
        and device.kind in ("cuda", "xpu")
        and config.method is not Method.DPO
    )


def _with_micro(config: ResolvedConfig, world: World, micro: int) -> ResolvedConfig:
    """The config at this micro-batch, accumulation recomputed by the batch rule."""
    return config.model_copy(update={"micro_batch_size": micro}).with_world(
        world.nodes, world.local_world_size
    )


def rule_micro_batch(config: ResolvedConfig, world: World, device: DeviceInfo) -> ResolvedConfig:
    """`auto` where no memory probe runs: CPU (host memory, not measured) and DPO (the probe
    is measured for single sequences, not chosen+rejected pairs). The largest micro-batch up
    to RULE_LIMIT that divides the per-rank share of the global batch; the same on every
    rank, so no collective is needed."""
    choice = decide_micro_batch(config.global_batch_size, world.world_size, None)
    why = (
        "dpo is not memory-probed: the probe models single sequences, not chosen+rejected pairs"
        if config.method is Method.DPO
        else f"no memory probe on {device.kind}"
    )
    if world.is_main:
        log.info(
            "microBatchSize auto: %d x accumulation %d (rule: %s; largest divisor of the "
            "per-rank share %d up to %d; globalBatchSize %d kept)",
            choice.micro,
            choice.accumulation,
            why,
            config.global_batch_size // world.world_size,
            RULE_LIMIT,
            config.global_batch_size,
        )
    return _with_micro(config, world, choice.micro)


def device_memory(device: DeviceInfo) -> int:
    """Total memory of this rank's CUDA/XPU device, bytes (torch.cuda and torch.xpu alike)."""
    accel: Any = getattr(torch, device.kind)
    return int(accel.get_device_properties(device.local_rank).total_memory)


def probe_micro_batch(
    config: ResolvedConfig, device: DeviceInfo, world: World, model: Any, collator: Any
) -> ResolvedConfig:
    """`auto` on CUDA/XPU (lora, qlora, full): the largest micro-batch that fits, measured.

    Runs after the model is built (and optimized) and the process group is up, with the
    collator training will use (without the host token counter, so probe tokens are not
    counted). Each probe step is a worst-case micro-batch (every example at cutoffLen, random
    ids) through one forward+backward in training mode (activation checkpointing on if the
    config asks, as the Trainer will set it), gradients dropped after. The budget is
    MEMORY_FRACTION of the device's memory, less what training adds beyond the probe: the
    optimizer's state (an AdamW-sized upper bound: two fp32 values per trainable parameter)
    and gradients kept across accumulation. Ranks agree on the minimum.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    reserve = sum(p.numel() * (8 + p.element_size()) for p in trainable)
    total = device_memory(device)
    budget = int(total * MEMORY_FRACTION) - reserve
    vocab = int(perf.causal_lm(model).config.vocab_size)
    where = model.device  # where the model is (this rank's device)

    def step(m: int) -> None:
        batch = perf.worst_case_batch(m, config.cutoff_len, vocab, collator, where)
        perf.probe_step(model, batch, bf16=config.bf16)

    was_training = model.training
    model.train()
    if config.gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    try:
        choice = decide_micro_batch(
            config.global_batch_size,
            world.world_size,
            step,
            budget,
            device_type=device.kind,
            agree=lambda m: min_over_ranks(m, device.torch_device),
        )
    except Exception as error:
        if is_oom(error):
            raise TrainingError(
                f"{OOM_ADVICE} (microBatchSize auto: the smallest probed micro-batch did not fit "
                f"at cutoffLen {config.cutoff_len}, gradientCheckpointing "
                f"{config.gradient_checkpointing})"
            ) from error
        raise
    finally:
        model.train(was_training)
        getattr(torch, device.kind).empty_cache()
    if world.is_main:
        gib = 2**30
        log.info(
            "microBatchSize auto: %d x accumulation %d (memory probe at cutoffLen %d, min over "
            "%d rank(s); budget %.2f GiB = %.0f%% of %.2f GiB less %.2f GiB optimizer state and "
            "gradients; measured peaks %s; globalBatchSize %d kept)",
            choice.micro,
            choice.accumulation,
            config.cutoff_len,
            world.world_size,
            budget / gib,
            MEMORY_FRACTION * 100,
            total / gib,
            reserve / gib,
            ", ".join(f"{m}: {p / gib:.2f} GiB" for m, p in sorted(choice.peaks.items()))
            or "none (a single candidate)",
            config.global_batch_size,
        )
    return _with_micro(config, world, choice.micro)


def init_distributed(device: DeviceInfo, world: World) -> None:
    """Start the process group ourselves so the backend is the seam's choice (ccl included)."""
    if world.world_size == 1 or dist.is_initialized():
        return
    getattr(torch, device.kind).set_device(device.local_rank)  # torch.cpu's does nothing
    dist.init_process_group(backend=device.backend)


def _checkpointing_argument() -> str:
    """transformers renamed gradient_checkpointing to activation_checkpointing (5.2x; the old
    name is a deprecated alias there, and TRL's configs set the old one to True): the name this
    transformers has."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )


_CHECKPOINTING = _checkpointing_argument()


def training_arguments(config: ResolvedConfig, device: DeviceInfo, world: World, plan: Plan) -> Any:
    """TrainingArguments (DPOConfig for dpo) from the resolved config and the plan."""
    from transformers import TrainingArguments

    evaluate = bool(config.validation_size)
    common: dict[str, Any] = {
        "output_dir": config.output_path,
        "per_device_train_batch_size": config.micro_batch_size,
        "per_device_eval_batch_size": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        "optim": config.optimizer,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "bf16": config.bf16,
        "logging_steps": config.logging_steps,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": config.eval_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "seed": config.seed,
        "data_seed": config.seed,
        "use_cpu": device.kind == "cpu",
        _CHECKPOINTING: config.gradient_checkpointing and not plan.graph_checkpointing,
        f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,
        # counted on the host as batches are collated (perf.HostTokenCounter): the Trainer's own
        # count syncs the device every micro-batch and does not know DPO's batches
        "include_num_input_tokens_seen": "no",
        "average_tokens_across_devices": True,
        "report_to": "none",
        "disable_tqdm": not (world.is_main and sys.stderr.isatty()),
        "log_level_replica": "error",
    } | plan.training_arguments(config.optimizer)
    if config.deepspeed_zero_stage is not None:
        if not importable("deepspeed"):
            raise TrainingError(
                f"training.deepspeedZeroStage {config.deepspeed_zero_stage} needs DeepSpeed, which "
                "is not installed in this image: install finetune-operator[deepspeed] or remove "
                "the setting (plain DDP)"
            )
        common["deepspeed"] = {
            "zero_optimization": {"stage": config.deepspeed_zero_stage},
            "bf16": {"enabled": config.bf16},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    if config.method is Method.DPO:
        from trl.trainer.dpo_config import DPOConfig

        assert config.dpo is not None
        return DPOConfig(
            **common,
            beta=config.dpo.beta,
            max_length=config.dpo.max_length,
            padding_free=False,  # TRL's own switch; right padding on every device
        )
    return TrainingArguments(**common, remove_unused_columns=False)


def training_collator(config: ResolvedConfig, tokenizer: Any, plan: Plan) -> Any:
    """The collator the plan asks for: packed rows with a block mask, or padded rows."""
    if config.method is Method.DPO:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        from finetune_trainer.packed_dpo import PackedPreferenceCollator

        assert config.dpo is not None
        if plan.packing:
            return PackedPreferenceCollator.for_training(
                tokenizer.pad_token_id, config.dpo.max_length, plan.graphs
            )
        return DataCollatorForPreference(  # TRL's defaults: keep the start, no multiple
            pad_token_id=tokenizer.pad_token_id, max_length=config.dpo.max_length
        )
    if plan.packing:
        return perf.PackingCollator(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=plan.row_multiple,
            row_tokens=plan.row_tokens,
        )
    return build_collator(tokenizer, config.pad_to_multiple_of, config.padding_free)


def token_count(config: ResolvedConfig) -> Callable[[dict[str, Any]], int]:
    """Non-padding tokens of one training example, as collated."""
    if config.method is Method.DPO:
        assert config.dpo is not None
        return perf.preference_tokens(config.dpo.max_length)
    return lambda feature: len(feature["input_ids"])


def _datasets(config: ResolvedConfig, tokenizer: Any, args: Any) -> tuple[Any, Any]:
    # Rank 0 tokenizes first and fills the datasets cache; the others then read it.
    with args.main_process_first(local=False, desc="tokenizing the data set"):
        return build_datasets(config, tokenizer)


@dataclass(frozen=True)
class Built:
    """What build_trainer makes: the Trainer, its tokenizer, the config as trained (`auto`
    resolved, the optimizer that runs) and the plan it applied."""

    trainer: Any
    tokenizer: Any
    config: ResolvedConfig
    plan: Plan


def build_trainer(
    config: ResolvedConfig, device: DeviceInfo, world: World, callbacks: list[Any]
) -> Built:
    """The Trainer for this config on this device and world, with its plan applied."""
    from transformers import Trainer, set_seed

    # Before the model: the LoRA A matrices are drawn at random, and every rank (and every
    # restart) must draw the same ones. The Trainer seeds only once it is built.
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    plan = make_plan(config, device.kind, world.world_size, Capabilities.detect(device.kind))
    collator = training_collator(config, tokenizer, plan)
    # The model's own checkpointing is off where the plan checkpoints inside the graphs.
    as_built = (
        config.model_copy(update={"gradient_checkpointing": False})
        if plan.graph_checkpointing
        else config
    )
    model = prepare_model(as_built, device)
    if probes_memory(config, device):  # `microBatchSize: auto`, measured on this model
        config = probe_micro_batch(config, device, world, model, collator)
    args = training_arguments(config, device, world, plan)
    train_data, eval_data = _datasets(config, tokenizer, args)
    count = token_count(config)
    counter = perf.HostTokenCounter(collator, count)
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": train_data,
        "eval_dataset": eval_data,
        "processing_class": tokenizer,
        "callbacks": [*callbacks, counter.callback(world.world_size)],
        "data_collator": counter,
    }
    trainer: Any
    if config.method is Method.DPO:
        from trl.trainer.dpo_trainer import DPOTrainer

        from finetune_trainer.packed_dpo import PackedDPOTrainer

        # LoRA adapter on the (optionally 4-bit) base; the reference is the base with the
        # adapter switched off, so no second model is held in memory.
        trainer_class = PackedDPOTrainer if plan.packing else DPOTrainer
        trainer = trainer_class(**common, peft_config=lora_config(config))
    else:
        trainer = Trainer(**common)
    return Built(apply_plan(trainer, plan, count), tokenizer, _as_run(config, args), plan)


def _as_run(config: ResolvedConfig, args: Any) -> ResolvedConfig:
    """The config with what the arguments changed on this device (the fused AdamW on CUDA),
    so the table of effective hyperparameters shows what runs."""
    optimizer = getattr(args.optim, "value", args.optim)
    return config.model_copy(update={"optimizer": optimizer})


def announce(config: ResolvedConfig, device: DeviceInfo, world: World) -> None:
    """Check the batch rule and log every effective hyperparameter (rank 0)."""
    check_batch_rule(config, world)
    if world.is_main:
        log.info(
            "finetune-train: %s on %d process(es), backend %s\n%s",
            config.method.value,
            world.world_size,
            device.backend,
            format_table(config),
        )


def run(config: ResolvedConfig, world: World | None = None) -> RunResult:
    """Train to the end (resuming if a complete checkpoint is there) and save."""
    world = world or World.from_env()
    output = Path(config.output_path)
    # Bad input is refused before the model loads and before anything is written to output.
    preflight(config)
    # What the output folder remembers: the spec as given, at the world size really started.
    given = config
    if config.world_size != world.world_size:
        given = config.with_world(world.nodes, world.local_world_size)
    changed = check_resume(given, output)
    done = is_complete(output)
    if done is not None:
        log.info(
            "%s already holds a finished run (step %s): nothing to do", output, done.get("step")
        )
        return RunResult(output, done, None)
    device = select_device(
        config.device.value,
        world.local_rank,
        world.local_world_size,
        os.environ.get("FINETUNE_DIST_BACKEND"),
    )
    config = reconcile_world(config, world)
    auto = config.micro_batch_size == "auto"
    how = "probe" if probes_memory(config, device) else "rule"
    if auto and how == "rule":
        config = rule_micro_batch(config, world, device)
    if config.micro_batch_size != "auto":
        check_batch_rule(config, world)  # before anything loads; the table once it is built
    init_distributed(device, world)

    patcher = None
    job = os.environ.get("FINETUNE_JOB_NAME")
    if world.is_main and job:
        patcher = StatusPatcher(job, os.environ.get("FINETUNE_JOB_NAMESPACE", "default"))
    # hub ids -> one local copy per job: rank 0 fetches, every other rank waits for it
    config = fetch_config_items(config, world.is_main)
    progress = ProgressCallback(output, patcher)
    callbacks = [progress, CheckpointMarker(progress.on_checkpoint_complete), *_test_hooks()]
    built = build_trainer(config, device, world, callbacks)
    trainer, tokenizer, config = built.trainer, built.tokenizer, built.config
    if world.is_main:  # the data and model were accepted: only now is output written
        output.mkdir(parents=True, exist_ok=True)
        remember_config(given, output)
        if changed:
            log.info("resuming with changes that keep the run the same: %s", changed)
    # as built: the micro-batch `auto` chose, the optimizer and switches this device runs
    announce(config, device, world)
    if world.is_main:
        progress.event({"event": "plan", **built.plan.describe()})
    if auto and world.is_main:
        progress.event(
            {
                "event": "microBatchSize",
                "how": how,
                "microBatchSize": config.micro_batch_size,
                "gradientAccumulationSteps": config.gradient_accumulation_steps,
                "globalBatchSize": config.global_batch_size,
                "worldSize": world.world_size,
            }
        )
    trainer.remove_callback(PrinterCallback)  # progress prints JSON lines instead
    use_terminal_bar(trainer, progress)  # in a terminal: one bar, no dict lines
    resume = latest_complete_checkpoint(output)
    if world.is_main:
        for partial in remove_incomplete_checkpoints(output):
            log.warning("removed incomplete checkpoint %s", partial)
    trainer.accelerator.wait_for_everyone()
    if resume is not None and world.is_main:
        log.info("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary = save_final(trainer, config, device, tokenizer)
    except Exception as error:
        if is_oom(error):
            raise TrainingError(
                f"{OOM_ADVICE} (microBatchSize {config.micro_batch_size}, cutoffLen {config.cutoff_len}, gradientCheckpointing {config.gradient_checkpointing})"
            ) from error
        raise
    finally:
        if patcher is not None:
            patcher.close()
    if world.is_main:
        where = summary.get("adapter") or summary.get("model")
        print(f"finetune-train: done at step {summary['step']}; saved to {where}", flush=True)
    return RunResult(output, summary, resume)


def _test_hooks() -> list[Any]:
    """FINETUNE_FAULT_AT_STEP=N: rank 0 SIGKILLs itself after step N, as a killed pod would."""
    step = os.environ.get("FINETUNE_FAULT_AT_STEP")
    if not step:
        return []
    from transformers import TrainerCallback

    fault_step = int(step)

    class Fault(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and state.global_step >= fault_step:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

    return [Fault()]


__all__ = ["RunResult", "SpecError", "TrainingError", "run"]
