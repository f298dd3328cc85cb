"""Checkpoints that are known complete, resume, and the final save with its completion marker.

A pod killed while writing checkpoint-N leaves a folder that looks like a checkpoint but is
not one. So once every rank has written its part, rank 0 drops CHECKPOINT_MARKER into the
folder, and resume only considers folders that have it. The run's own COMPLETE marker is
written last of all, after the adapter (and the merged model) are on the volume.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from finetune_operator.api import Method
from finetune_operator.resolve import ResolvedConfig
from finetune_trainer.device import DeviceInfo

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint-complete"
COMPLETE_MARKER = "COMPLETE"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MERGED_DIR = "merged"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_complete_checkpoint(output: Path) -> Path | None:
    """The highest-step checkpoint-N under output that carries the completion marker."""
    if not output.is_dir():
        return None
    found = []
    for child in output.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / CHECKPOINT_MARKER).exists():
            found.append((int(match.group(1)), child))
        elif match:
            log.warning("ignoring incomplete checkpoint %s (no %s)", child, CHECKPOINT_MARKER)
    return max(found)[1] if found else None


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


def is_complete(output: Path) -> dict[str, Any] | None:
    marker = output / COMPLETE_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


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


# --------------------------------------------------------------------------------------------
# The spec a run was started with, so that a resume is explicit about what changed
# --------------------------------------------------------------------------------------------

RUN_CONFIG = "finetune-config.json"
# What a resume may change and still be the same run: how the global batch is split over
# processes (world size, micro-batch, accumulation: the global batch itself stays), how long
# it runs, how often it saves/evaluates/logs, and where the folder is mounted.
MAY_CHANGE = frozenset(
    {
        "workers",
        "devicesPerWorker",
        "worldSize",
        "microBatchSize",
        "gradientAccumulationSteps",
        "maxSteps",
        "saveSteps",
        "evalSteps",
        "saveTotalLimit",
        "loggingSteps",
        "outputPath",
        "deviceResource",
    }
)
# The run's own files under output: what --restart removes (nothing else in the folder).
RUN_FILES = (COMPLETE_MARKER, RUN_CONFIG, "progress.jsonl", ADAPTER_DIR, MODEL_DIR, MERGED_DIR)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_changes(saved: dict[str, Any], config: ResolvedConfig) -> dict[str, tuple[Any, Any]]:
    """Field (camelCase, dotted) -> (saved value, new value), for every field that differs."""
    old, new = _flat(saved), _flat(config.model_dump(mode="json", by_alias=True))
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())


class SpecChanged(ValueError):
    """The output folder holds a run started with another spec. The message names the fields."""


def check_resume(config: ResolvedConfig, output: Path) -> str | None:
    """Compare the spec with the one the folder's run was started with.

    Returns a line to log when a resume continues with changes that may change (None when
    nothing changed or there is nothing to resume); raises SpecChanged when anything else
    differs, or when a finished run would be asked for more steps.
    """
    saved_file = output / RUN_CONFIG
    finished = is_complete(output)
    if not saved_file.is_file() or (
        finished is None and latest_complete_checkpoint(output) is None
    ):
        return None
    saved = json.loads(saved_file.read_text())
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in MAY_CHANGE}
    if finished is not None and "maxSteps" in changes:
        refused["maxSteps"] = changes["maxSteps"]
    how = (
        "run again with --restart to start over in this folder (its checkpoints are deleted), "
        "or choose another --output"
    )
    if refused:
        what = "finished" if finished is not None else "started"
        raise SpecChanged(
            f"output {output} holds a run {what} with another spec ({_describe(refused)}); "
            f"only {', '.join(sorted(MAY_CHANGE - {'outputPath', 'deviceResource'}))} may change "
            f"on resume: restore those fields, or {how}"
        )
    return _describe(changes) if changes else None


def remember_config(config: ResolvedConfig, output: Path) -> None:
    """Rank 0: the spec this folder's run trains with (compared on every resume)."""
    (output / RUN_CONFIG).write_text(config.to_json() + "\n")


def clear_run(output: Path) -> list[Path]:
    """--restart: remove the run's own files (checkpoints, adapter, markers, progress)."""
    removed = []
    if output.is_dir():
        for child in sorted(output.iterdir()):
            if _CHECKPOINT.match(child.name) or child.name in RUN_FILES:
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
                removed.append(child)
    return removed
