"""Checkpoints that are known complete, resume, and the final save with its completion marker.

A pod killed while writing checkpoint-N leaves a folder that looks like a checkpoint but is
not one. So once every rank has written its part, rank 0 drops CHECKPOINT_MARKER into the
folder, and resume only considers folders that have it. The run's own COMPLETE marker is
written last of all, after the adapter (and the merged model) are on the volume.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.device import DeviceInfo
from finetune_trainer.resume import (
    _CHECKPOINT,
    ADAPTER_DIR,
    CHECKPOINT_MARKER,
    COMPLETE_MARKER,
    MERGED_DIR,
    MODEL_DIR,
    is_complete,
    latest_complete_checkpoint,
)

log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def remove_incomplete_checkpoints(output: Path) -> list[Path]:
    """Delete checkpoint-N folders without the marker (a save cut short by a kill).

    Left in place, the Trainer's save_total_limit rotation would count such a folder as the
    newest and could delete the last complete checkpoint instead. Rank 0 only, before training.
    """
    removed = []
    if output.is_dir():
        for child in output.iterdir():
            if _CHECKPOINT.match(child.name) and not (child / CHECKPOINT_MARKER).exists():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


class CheckpointMarker(TrainerCallback):
    """After each save: wait for every rank, then rank 0 marks the checkpoint complete."""

    def __init__(self, on_complete: Any = None) -> None:
        self.on_complete = on_complete

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank has written its rng state and shards
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (path / CHECKPOINT_MARKER).write_text(json.dumps({"step": state.global_step}))
        if self.on_complete is not None:
            self.on_complete(state.global_step, path)


def save_final(
    trainer: Any, config: ResolvedConfig, device: DeviceInfo, tokenizer: Any
) -> dict[str, Any]:
    """Adapter (or full model), the optional merge, then COMPLETE, written last by rank 0."""
    output = Path(config.output_path)
    is_adapter = config.method is not Method.FULL
    target = output / (ADAPTER_DIR if is_adapter else MODEL_DIR)
    trainer.save_model(str(target))  # rank 0 writes; DeepSpeed gathers shards first
    summary: dict[str, Any] = {
        "method": config.method.value,
        "step": trainer.state.global_step,
        ADAPTER_DIR if is_adapter else MODEL_DIR: str(target),
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
        if is_adapter and config.merge_adapter:
            summary[MERGED_DIR] = str(
                merge_adapter(config, device, target, output / MERGED_DIR, tokenizer)
            )
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        summary["finalLoss"] = losses[-1] if losses else None
        summary["finishedAt"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    _barrier()
    if trainer.is_world_process_zero():
        (output / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def merge_adapter(
    config: ResolvedConfig, device: DeviceInfo, adapter: Path, target: Path, tokenizer: Any
) -> Path:
    """Base model (unquantized, even for qlora: merging into 4-bit weights would round) + adapter."""
    from peft import PeftModel

    from finetune_trainer.model import load_base_model

    base = load_base_model(config, device, quantize=False)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_MARKER",
    "COMPLETE_MARKER",
    "MERGED_DIR",
    "MODEL_DIR",
    "CheckpointMarker",
    "is_complete",
    "latest_complete_checkpoint",
    "remove_incomplete_checkpoints",
    "save_final",
]
