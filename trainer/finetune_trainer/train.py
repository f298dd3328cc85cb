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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers.trainer_callback import PrinterCallback

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig, SpecError
from finetune_trainer import perf
from finetune_trainer.config import World, check_batch_rule, format_table, reconcile_world
from finetune_trainer.data import build_collator, build_datasets
from finetune_trainer.device import OOM_ADVICE, DeviceInfo, importable, is_oom, select_device
from finetune_trainer.model import load_tokenizer, lora_config, prepare_model
from finetune_trainer.progress import ProgressCallback, StatusPatcher
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


def resolve_auto_micro_batch(config: ResolvedConfig, world: World) -> ResolvedConfig:
    """`microBatchSize: auto`: until the memory probe lands (issue 7), the largest micro-batch
    up to the method's default that divides the per-rank share of the global batch."""
    if config.micro_batch_size != "auto":
        return config
    per_rank = config.global_batch_size // world.world_size
    default = 4 if config.method is Method.DPO else 2
    micro = max(m for m in range(1, default + 1) if per_rank % m == 0) if per_rank else 1
    log.warning("microBatchSize auto: using %d (no memory probe yet)", micro)
    return config.model_copy(update={"micro_batch_size": micro}).with_world(
        world.nodes, world.local_world_size
    )


def init_distributed(device: DeviceInfo, world: World) -> None:
    """Start the process group ourselves so the backend is the seam's choice (ccl included)."""
    if world.world_size == 1 or dist.is_initialized():
        return
    if device.kind == "cuda":
        torch.cuda.set_device(device.local_rank)
    elif device.kind == "xpu":
        torch.xpu.set_device(device.local_rank)
    dist.init_process_group(backend=device.backend)


def training_arguments(config: ResolvedConfig, device: DeviceInfo, world: World) -> Any:
    """TrainingArguments (DPOConfig for dpo) from the resolved config, nothing else."""
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
        "activation_checkpointing": config.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,
        "include_num_input_tokens_seen": "non_padding",
        "average_tokens_across_devices": True,
        "report_to": "none",
        "disable_tqdm": not (world.is_main and sys.stderr.isatty()),
        "use_liger_kernel": config.fused_kernels
        and device.kind != "cpu"
        and importable("liger_kernel"),
        "log_level_replica": "error",
    }
    if device.kind == "cuda" and config.method is not Method.DPO:
        # issue 7 (benchmarks/README.md): no host syncs inside the accumulation loop (tokens
        # are counted on the host instead, see build_trainer), pinned non-blocking batches,
        # fused AdamW; Liger is applied by perf.optimize_model, as measured.
        common |= perf.training_argument_overrides(device.kind, config.optimizer)
        common["use_liger_kernel"] = False
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


def build_trainer(
    config: ResolvedConfig, device: DeviceInfo, world: World, callbacks: list[Any]
) -> tuple[Any, Any]:
    from transformers import set_seed

    # Before the model: the LoRA A matrices are drawn at random, and every rank (and every
    # restart) must draw the same ones. The Trainer seeds only once it is built.
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    args = training_arguments(config, device, world)
    # Rank 0 tokenizes first and fills the datasets cache; the others then read it.
    with args.main_process_first(local=False, desc="tokenizing the data set"):
        train_data, eval_data = build_datasets(config, tokenizer)
    if config.method is Method.DPO:
        from trl.trainer.dpo_trainer import DPOTrainer

        # LoRA adapter on the (optionally 4-bit) base; the reference is the base with the
        # adapter switched off, so no second model is held in memory.
        base = prepare_model(config, device)
        trainer: Any = DPOTrainer(
            model=base,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            peft_config=lora_config(config),
            callbacks=callbacks,
        )
        return trainer, tokenizer
    from transformers import Trainer

    model = prepare_model(config, device)
    collator: Any = build_collator(tokenizer, config.pad_to_multiple_of, config.padding_free)
    if device.kind == "cuda":
        # issue 7: compiled decoder layers + Liger's fused linear cross-entropy, packed rows
        # with a 4D block mask (no per-forward sync), tokens counted on the host.
        model = perf.optimize_model(
            model, perf.PerfOptions.for_device(device.kind, config.fused_kernels)
        )
        if config.padding_free:
            collator = perf.PackingCollator(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=64
            )
        collator = perf.HostTokenCounter(collator)
        callbacks = [*callbacks, collator.callback(world.world_size)]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, tokenizer


def run(config: ResolvedConfig, world: World | None = None) -> RunResult:
    """Train to the end (resuming if a complete checkpoint is there) and save."""
    world = world or World.from_env()
    output = Path(config.output_path)
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
    config = resolve_auto_micro_batch(reconcile_world(config, world), world)
    check_batch_rule(config, world)
    if world.is_main:
        output.mkdir(parents=True, exist_ok=True)
        log.info(
            "finetune-train: %s on %d process(es), backend %s\n%s",
            config.method.value,
            world.world_size,
            device.backend,
            format_table(config),
        )
    init_distributed(device, world)

    patcher = None
    job = os.environ.get("FINETUNE_JOB_NAME")
    if world.is_main and job:
        patcher = StatusPatcher(job, os.environ.get("FINETUNE_JOB_NAMESPACE", "default"))
    progress = ProgressCallback(output, patcher)
    callbacks = [progress, CheckpointMarker(progress.on_checkpoint_complete), *_test_hooks()]
    trainer, tokenizer = build_trainer(config, device, world, callbacks)
    trainer.remove_callback(PrinterCallback)  # progress prints JSON lines instead
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
