"""What an output folder holds: finished, complete checkpoints, and the spec it was started
with, so that a resume is explicit about what changed. No torch: the launcher reads it too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from finetune_operator.resolve import ResolvedConfig

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint-complete"
COMPLETE_MARKER = "COMPLETE"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MERGED_DIR = "merged"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def is_complete(output: Path) -> dict[str, Any] | None:
    marker = output / COMPLETE_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


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
